"""Loading, inputs, rollout and scoring of Qwen2-VL (tiny preset, CPU, fp32)."""
import logging

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from training import data
from training import sampling_copy as SC
import model as M
from conftest import with_head_bias
import rollout as R


def grid_image(colors, cell=28):
    """A row of solid colour cells; different colour lists give different images (and sizes)."""
    im = Image.new("RGB", (cell * len(colors), cell * 2), "white")
    for i, c in enumerate(colors):
        im.paste(c, (i * cell, 0, (i + 1) * cell, cell))
    return im


IMAGES = [grid_image(["red", "blue"]), grid_image(["green", "yellow", "red", "blue"])]
QUESTIONS = ["How many red cells?", "Which colour is in the third cell of the top row?"]


def sampled_rollout(tiny, seed=0, m=3, max_new_tokens=24):
    policy, tok, ip = tiny
    torch.manual_seed(seed)
    return R.generate(policy, tok, ip, IMAGES, QUESTIONS, num_samples=m, temperature=1.3, max_new_tokens=max_new_tokens)


def score(tiny, ro, temperature=1.3):
    with torch.no_grad():
        return M.completion_logprobs(tiny[0], ro.prompt, ro.completion_ids, temperature, ro.suppress_ids)


def test_rollout_has_left_padding_and_aligned_groups(tiny):
    ro = sampled_rollout(tiny)
    mask = ro.prompt["attention_mask"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()     # left padded, different prompt lengths
    assert ro.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert ro.completion_ids.shape == ro.completion_mask.shape == ro.logprobs.shape
    assert len(ro.texts) == 6


def test_scoring_logprobs_match_generation(tiny):
    ro = sampled_rollout(tiny)
    gap = ((score(tiny, ro) - ro.logprobs) * ro.completion_mask).abs().max().item()
    assert gap <= 1e-4


def test_parity_check_detects_swapped_images(tiny):
    ro = sampled_rollout(tiny)
    swapped = [IMAGES[1], IMAGES[0]]         # same questions, images exchanged between the groups
    batch = M.build_inputs(tiny[1], tiny[2], swapped, QUESTIONS)
    batch.pop("kept")
    prompt = M.select_rows(batch, ro.group)
    with torch.no_grad():
        lp = M.completion_logprobs(tiny[0], prompt, ro.completion_ids, 1.3, ro.suppress_ids)
    assert ((lp - ro.logprobs) * ro.completion_mask).abs().max().item() > 1e-2


def test_a_repeated_prompt_runs_once_with_the_same_logprobs_and_gradients(tiny, monkeypatch):
    """score_tokens' shared prompt (one trunk pass per distinct prompt, its keys and values repeated for the group)
    gives the log-probs and gradients of scoring every row in full; a question asked of another image is another
    prompt."""
    policy = tiny[0]
    ro = sampled_rollout(tiny)
    batch = M.build_inputs(tiny[1], tiny[2], [IMAGES[0], IMAGES[1]], [QUESTIONS[0]] * 2)
    batch.pop("kept")
    assert M.shared_prompts(ro.prompt) == ([0, 3], [0, 0, 0, 1, 1, 1])
    assert M.shared_prompts(M.select_rows(batch, [0, 1, 0])) == ([0, 1], [0, 1, 0])   # same text, other image
    assert M.shared_prompts(M.select_rows(batch, [0, 1])) is None

    def run(share):
        monkeypatch.setattr(M, "shares_prompts", lambda model: share)
        policy.zero_grad()
        lp = M.completion_logprobs(policy, ro.prompt, ro.completion_ids, 1.3, ro.suppress_ids)
        (lp * ro.completion_mask).sum().backward()
        return lp.detach() * ro.completion_mask, [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    (shared, g_shared), (full, g_full) = run(True), run(False)
    assert torch.allclose(shared, full, atol=1e-5)
    assert len(g_shared) == len(g_full) and all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_shared, g_full))
    policy.zero_grad()


def test_parity_check_detects_wrong_temperature(tiny):
    ro = sampled_rollout(tiny)
    assert ((score(tiny, ro, temperature=1.0) - ro.logprobs) * ro.completion_mask).abs().max().item() > 1e-2


def test_scoring_is_batch_invariant(tiny):
    ro = sampled_rollout(tiny)
    full = score(tiny, ro)
    for row in (0, 4):
        prompt, ids, mask = ro.rows([row])
        pad = int((prompt["attention_mask"][0] == 0).sum())       # strip this row's own left padding
        alone = {k: (v[:, pad:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                 for k, v in prompt.items()}
        with torch.no_grad():
            lp = M.completion_logprobs(tiny[0], alone, ids, 1.3, ro.suppress_ids)
        assert torch.allclose(lp * mask, full[row:row + 1, :mask.shape[1]] * mask, atol=1e-5)
        assert mask.shape[1] == int(ro.completion_mask[row].sum())        # cut to the row's own length


def test_greedy_decoding_matches_transformers_generate(tiny):
    policy, tok, ip = tiny
    ro = R.generate(policy, tok, ip, IMAGES, QUESTIONS, num_samples=1, greedy=True, max_new_tokens=12)
    batch = M.build_inputs(tok, ip, IMAGES, QUESTIONS)
    batch.pop("kept")
    suppress, _ = M.special_ids(tok)
    out = policy.generate(**batch, do_sample=False, max_new_tokens=12, suppress_tokens=suppress,
                          eos_token_id=-1, pad_token_id=tok.pad_token_id)
    n = ro.completion_ids.shape[1]
    assert torch.equal(out[:, batch["input_ids"].shape[1]:][:, :n], ro.completion_ids)


@pytest.fixture()
def biased(tiny):
    """A copy of the tiny model whose output layer favours vision tokens strongly and EOS mildly."""
    suppress, stop = M.special_ids(tiny[1])
    # vision tokens: without suppression they would be sampled almost always; EOS after a few tokens,
    # at different places per sample
    return with_head_bias(tiny, {**{t: 20.0 for t in suppress}, stop[0]: 4.0})


def test_no_vision_token_is_ever_sampled(biased):
    policy, tok, ip = biased
    suppress, _ = M.special_ids(tok)
    torch.manual_seed(0)
    ro = R.generate(policy, tok, ip, IMAGES, QUESTIONS, num_samples=4, temperature=1.5, max_new_tokens=30)
    assert not torch.isin(ro.completion_ids, torch.tensor(suppress)).any()


def test_mask_ends_at_first_eos(biased):
    policy, tok, ip = biased
    _, stop = M.special_ids(tok)
    torch.manual_seed(1)
    ro = R.generate(policy, tok, ip, IMAGES, QUESTIONS, num_samples=4, temperature=1.0, max_new_tokens=30)
    ended = ~ro.truncated
    assert ended.any()
    for ids, mask, done in zip(ro.completion_ids, ro.completion_mask, ended):
        if done:
            first = int(torch.isin(ids, torch.tensor(stop)).nonzero()[0])
            assert mask[:first + 1].all() and not mask[first + 1:].any()
            assert (ids[first + 1:] == tok.pad_token_id).all()
        else:
            assert mask.all()


@pytest.mark.parametrize("ids, mask, truncated", [
    ([5, 6, 2, 9], [1, 1, 1, 0], False),     # stop kept, tokens after it dropped
    ([2, 2, 2, 2], [1, 0, 0, 0], False),     # pad == EOS: only the first counts
    ([5, 6, 7, 8], [1, 1, 1, 1], True),      # no stop: truncated, everything counts
])
def test_first_stop_mask(ids, mask, truncated):
    m, t = R.first_stop_mask(torch.tensor([ids]), [2])
    assert m.tolist() == [mask] and t.item() == truncated


def test_top_p_keeps_only_the_nucleus():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    seen = {R.sample(logp, 0.7).item() for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = R.sample(probs.log().expand(20000, 4).contiguous(), generators=[torch.Generator().manual_seed(0)],
                     group_size=20000)
    assert torch.allclose(torch.bincount(draws, minlength=4) / 20000, probs, atol=0.015)


def test_save_load_round_trip_gives_identical_logits(tiny, tmp_path):
    policy, tok, ip = tiny
    for part in tiny:
        part.save_pretrained(tmp_path)
    policy2 = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    tok2, ip2 = AutoTokenizer.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)
    batch = M.build_inputs(tok2, ip2, IMAGES, QUESTIONS)
    assert torch.equal(batch["input_ids"], M.build_inputs(tok, ip, IMAGES, QUESTIONS)["input_ids"])
    batch.pop("kept")
    with torch.no_grad():
        a, b = policy(**batch).logits, policy2(**batch).logits
    assert torch.equal(a, b)
    reloaded = M.load(str(tmp_path), device="cpu")
    # a checkpoint directory gets the paper's range for Qwen2-VL (4 to 510.2 visual tokens of 28 x 28 px)
    assert reloaded[2].size == {"shortest_edge": 3136, "longest_edge": 400_000}


def test_prompt_is_the_qwen2_vl_chat_format_with_its_default_system_turn(tiny):
    q = M.R1VL_INSTRUCTION.format(question="How many?")
    assert M.prompt_text(tiny[1], "How many?") == (
        f"<|im_start|>system\n{M.SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        f"{q}<|im_end|>\n<|im_start|>assistant\n")


def test_image_tokens_expand_by_grid(tiny):
    _, tok, ip = tiny
    batch = M.build_inputs(tok, ip, IMAGES, QUESTIONS)
    per_row = batch["mm_token_type_ids"].sum(-1).tolist()
    assert per_row == (batch["image_grid_thw"].prod(-1) // 4).tolist() == [4, 8]


def test_overlong_prompt_is_skipped_and_counted(tiny, caplog):
    policy, tok, ip = tiny
    with caplog.at_level(logging.WARNING):
        ro = R.generate(policy, tok, ip, IMAGES, ["word " * 2000, QUESTIONS[1]], num_samples=2, max_new_tokens=4)
    assert ro.kept == [1] and len(ro.texts) == 2
    assert "skipped 1 of 2 prompts" in caplog.text
    assert int(ro.prompt["mm_token_type_ids"].sum()) == 2 * 8     # the kept row keeps its own image


def test_missing_image_gives_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read image .*nope.png"):
        data.load_image(str(tmp_path / "nope.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        data.load_image(str(tmp_path / "bad.png"))


def test_large_image_is_resized_within_the_pixel_limit(tiny):
    _, tok, ip = tiny
    big = data.load_image(Image.new("RGB", (4000, 3000), "red"), max_pixels=ip.size["longest_edge"])
    batch = M.build_inputs(tok, ip, [big], ["q"])
    assert int(batch["image_grid_thw"].prod()) * 14 * 14 <= ip.size["longest_edge"]


def test_text_only_question_needs_no_image(tiny):
    policy, tok, ip = tiny
    ro = R.generate(policy, tok, ip, [None, IMAGES[0]], QUESTIONS, num_samples=1, greedy=True, max_new_tokens=6)
    assert ro.prompt["image_grid_thw"].shape[0] == 1
    gap = ((score(tiny, ro, 1.0) - ro.logprobs) * ro.completion_mask).abs().max().item()
    assert gap <= 1e-4


def test_several_images_in_one_prompt_stand_where_their_tags_are_and_score_as_sampled(tiny):
    """A row of two images (tags placed in the question), one without an image, one with one: each row keeps
    its own pixel blocks through the group repeat and a row taken alone; swapping the two images matters."""
    policy, tok, ip = tiny
    question = "Left <image> and right <image>: which has more cells?"
    text = M.prompt_text(tok, question, image=2)
    assert "Question: Left <|vision_start|><|image_pad|><|vision_end|> and right <|vision_start|>" in text
    assert M.prompt_text(tok, "q", image=2).count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    images, questions = [IMAGES, None, IMAGES[1]], [question, QUESTIONS[0], QUESTIONS[1]]
    torch.manual_seed(0)
    ro = R.generate(policy, tok, ip, images, questions, num_samples=2, temperature=1.3, max_new_tokens=8)
    assert ro.prompt["image_grid_thw"].shape[0] == 2 * 3 and ro.group.tolist() == [0, 0, 1, 1, 2, 2]
    full = score(tiny, ro)
    assert ((full - ro.logprobs) * ro.completion_mask).abs().max().item() <= 1e-4
    prompt, ids, mask = ro.rows([1])
    pad = int((prompt["attention_mask"][0] == 0).sum())
    alone = {k: (v[:, pad:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in prompt.items()}
    assert alone["image_grid_thw"].shape[0] == 2
    with torch.no_grad():
        lp = M.completion_logprobs(policy, alone, ids, 1.3, ro.suppress_ids)
    assert torch.allclose(lp * mask, full[1:2, :mask.shape[1]] * mask, atol=1e-5)
    swapped = M.build_inputs(tok, ip, [IMAGES[::-1]] + images[1:], questions)
    swapped.pop("kept")
    with torch.no_grad():
        lp = M.completion_logprobs(policy, M.select_rows(swapped, ro.group), ro.completion_ids, 1.3, ro.suppress_ids)
    assert ((lp - ro.logprobs) * ro.completion_mask)[:2].abs().max().item() > 1e-2


def cast_equal(copy, master):
    """Every weight of `copy` is the master's (gathered if sharded) cast to the dtype `copy` holds it in."""
    masters = dict(master.named_parameters())
    for name, p in copy.named_parameters():
        q = masters[name].full_tensor() if hasattr(masters[name], "full_tensor") else masters[name]
        if not torch.equal(p, q.detach().to(p.dtype)):
            return False
    return True


@pytest.mark.parametrize("name, dtype", [
    ("model.language_model.layers.0.self_attn.q_proj.weight", torch.bfloat16),   # matrices autocast would cast
    ("model.language_model.layers.0.self_attn.q_proj.bias", torch.bfloat16),
    ("model.language_model.layers.0.mlp.down_proj.weight", torch.bfloat16),
    ("model.visual.patch_embed.proj.weight", torch.bfloat16),
    ("model.language_model.embed_tokens.weight", torch.float32),                 # = the tied LM head
    ("model.language_model.layers.0.input_layernorm.weight", torch.float32),
    ("model.language_model.norm.weight", torch.float32),
])
def test_inference_copy_holds_matrices_in_the_compute_dtype(tiny, name, dtype):
    assert SC.inference_copy(tiny[0], torch.bfloat16).get_parameter(name).dtype == dtype


def test_inference_copy_holds_the_cast_master_weights_after_a_step(tiny):
    import copy
    policy = copy.deepcopy(tiny[0])
    sampler = SC.inference_copy(policy, torch.bfloat16)
    assert cast_equal(sampler, policy)
    assert sampler.lm_head.weight is sampler.model.language_model.embed_tokens.weight    # still tied
    ro = sampled_rollout(tiny)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    M.completion_logprobs(policy, ro.prompt, ro.completion_ids, 1.3, ro.suppress_ids).sum().backward()
    optimizer.step()
    assert not cast_equal(sampler, policy)                        # a separate copy: the step did not reach it
    SC.refresh_inference_copy(sampler, policy)
    assert cast_equal(sampler, policy)


def test_fp32_inference_copy_samples_exactly_like_the_policy(tiny):
    policy, tok, ip = tiny
    sampler = SC.inference_copy(policy, torch.float32)
    kw = dict(num_samples=2, temperature=1.3, max_new_tokens=16, seeds=[3, 4])
    a, b = R.generate(policy, tok, ip, IMAGES, QUESTIONS, **kw), R.generate(sampler, tok, ip, IMAGES, QUESTIONS, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)


def test_bf16_copy_computes_what_the_fp32_policy_computes_under_autocast(tiny):
    """Same bf16 matmuls, fp32 residual stream and fp32 head: the copy's samples and log-probs are
    the fp32 policy's under the same autocast, and close to its scoring."""
    policy, tok, ip = tiny
    sampler = SC.inference_copy(policy, torch.bfloat16)
    kw = dict(num_samples=2, temperature=1.0, max_new_tokens=24, seeds=[3, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = R.generate(policy, tok, ip, IMAGES, QUESTIONS, **kw), R.generate(sampler, tok, ip, IMAGES, QUESTIONS, **kw)
        with torch.no_grad():
            scored = M.completion_logprobs(policy, b.prompt, b.completion_ids, 1.0, b.suppress_ids)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert ((scored - b.logprobs) * b.completion_mask).abs().max() < 0.02


def run_sharded(tmp_path, body):
    """Run `body` in a fresh one-process gloo group with `policy` the tiny model sharded by FSDP2
    (its decoder layers' weights are DTensors); the process prints "ok" when `body` passes."""
    import os
    import subprocess
    import sys
    import textwrap
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r}); sys.path.insert(0, {os.path.join(root, "tests")!r})
import model as M, rollout as R
from qwen.tiny import builder
from training import parallel, sampling_copy as SC
from test_model import IMAGES, QUESTIONS, cast_equal
from torch.distributed.tensor import DTensor
dist.init_process_group("gloo", init_method="file://{tmp_path}/pg", rank=0, world_size=1)
plain, tok, ip = M.load("tiny", device="cpu", build=builder("tiny"))
policy = parallel.shard(M.load("tiny", device="cpu", build=builder("tiny"))[0])
assert isinstance(policy.get_parameter("model.language_model.layers.0.mlp.up_proj.weight"), DTensor)
""" + textwrap.dedent(body) + "\ndist.destroy_process_group()\nprint('ok')\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_refresh_gathers_fsdp2_shards(tmp_path):
    run_sharded(tmp_path, """
        sampler = SC.inference_copy(policy, torch.bfloat16)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        for p in policy.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        SC.refresh_inference_copy(sampler, policy)
        assert cast_equal(sampler, policy)
    """)


def test_the_sharded_policys_inference_copy_generates_what_the_plain_policy_does(tmp_path):
    run_sharded(tmp_path, """
        kw = dict(num_samples=2, temperature=1.3, max_new_tokens=12, seeds=[1, 2])
        a, b = (R.generate(net, tok, ip, IMAGES, QUESTIONS, **kw) for net in (plain, SC.inference_copy(policy, torch.float32)))
        assert torch.equal(a.completion_ids, b.completion_ids)
    """)


def test_every_sharded_weight_is_a_dtensor_and_adamws_fused_and_foreach_steps_run(tmp_path):
    """On CUDA train.py's AdamW is fused; the batched foreach path (CUDA's default) refuses a mix of plain tensors
    and DTensors. CPU loops tensor by tensor unless told foreach kernels exist, as here; its fused kernel is
    the CUDA one's twin."""
    run_sharded(tmp_path, """
        import types, train
        from torch.optim import optimizer as adam_support
        adam_support._get_foreach_kernels_supported_devices = lambda: ["cuda", "cpu"]
        assert all(isinstance(q, DTensor) for q in policy.parameters())
        for device in ("cuda", "cpu"):              # "cuda": fused (the parameters stay on the CPU)
            run = types.SimpleNamespace(policy=policy, device=torch.device(device))
            optimizer, _ = train.make_optimizer(run, 1e-3, 0.0, 10, 0.0, False)
            assert optimizer.defaults["fused"] is (True if device == "cuda" else None)
            for q in policy.parameters():
                q.grad = torch.zeros_like(q)
            optimizer.step()
    """)


def test_clipping_sharded_gradients_gives_the_plain_norm_and_scale(tmp_path):
    run_sharded(tmp_path, """
        ro = R.generate(plain, tok, ip, IMAGES, QUESTIONS, num_samples=2, max_new_tokens=8, seeds=[1, 2])
        for net in (plain, policy):
            M.completion_logprobs(net, ro.prompt, ro.completion_ids, 1.0, ro.suppress_ids).sum().backward()
            parallel.sync_gradients(list(net.parameters()), 1)
        norms = [parallel.clip_gradients(list(net.parameters()), 1e-3) for net in (plain, policy)]
        assert abs(norms[0] - norms[1]) <= 1e-4 * norms[0]
        sharded = dict(policy.named_parameters())
        for name, q in plain.named_parameters():
            assert torch.allclose(q.grad, sharded[name].grad.full_tensor(), atol=1e-9, rtol=1e-4), name
    """)
