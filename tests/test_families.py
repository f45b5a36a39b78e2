"""Qwen2.5-VL, Qwen3-VL and Qwen3.5 through the code written for Qwen2-VL, each as a tiny random model on CPU
(fp32): the prompt from its own chat template, the visual token budget, sampling M > 1 completions, log-prob
parity with scoring, batch invariance, greedy decoding equal to transformers' generate, the decoder each
family takes, save/load, and a two-step SFT + RL run of train.py."""
import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer

import model as M
import rewards
import rollout as R
import train as T
from qwen import tiny as qwen_tiny
from toy import task as toy
from training import sampling_copy as SC
from test_model import IMAGES, QUESTIONS

FAMILIES = ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-qwen3.5"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    torch.manual_seed(0)
    return M.load(request.param, device="cpu", build=qwen_tiny.builder(request.param))


def peaked(tiny, scale=3.0):
    """The model with its LM head scaled up: confident, peaked next-token distributions, as a trained
    model has, where sampling and scoring disagree most."""
    policy = AutoModelForImageTextToText.from_config(tiny[0].config)
    policy.load_state_dict(tiny[0].state_dict())
    with torch.no_grad():
        policy.lm_head.weight.mul_(scale)
    return policy.eval(), tiny[1], tiny[2]


def test_prompt_comes_from_the_models_own_chat_template(tiny):
    policy, tok, _ = tiny
    text = M.prompt_text(tok, "How many?")
    user = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + M.R1VL_INSTRUCTION.format(question="How many?")
    if policy.config.model_type == "qwen2_5_vl":      # Qwen2-VL's format: a default system turn
        assert text == f"<|im_start|>system\n{M.SYSTEM}<|im_end|>\n{user}<|im_end|>\n<|im_start|>assistant\n"
    elif policy.config.model_type == "qwen3_vl":      # no system turn at all
        assert text == f"{user}<|im_end|>\n<|im_start|>assistant\n"
    else:                                     # thinking switched off: an empty, closed think block
        assert text == f"{user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_the_pixel_range_is_the_same_visual_token_budget_for_every_family(tiny):
    """Qwen3 models merge 32 x 32 px into a token (16-px patches), Qwen2.5-VL 28 x 28: the same range in
    tokens, so a large image becomes at most MAX_TOKENS tokens whatever the family."""
    _, tok, ip = tiny
    unit = (ip.patch_size * ip.merge_size) ** 2
    assert ip.size == {"shortest_edge": qwen_tiny.MIN_TOKENS * unit, "longest_edge": qwen_tiny.MAX_TOKENS * unit}
    batch = M.build_inputs(tok, ip, [Image.new("RGB", (2000, 1500), "red")], ["?"])
    assert 0.8 * qwen_tiny.MAX_TOKENS <= int(batch["mm_token_type_ids"].sum()) <= qwen_tiny.MAX_TOKENS
    probe = type(ip)(patch_size=ip.patch_size, merge_size=ip.merge_size)
    M.set_pixel_range(probe, M.MIN_TOKENS, M.MAX_TOKENS)     # what a checkpoint of the family gets
    assert probe.size["longest_edge"] == round(M.MAX_TOKENS * unit)


def test_sampled_log_probs_match_scoring(tiny):
    """Sampling and scoring agree to 1e-4 on peaked distributions, Qwen3.5 included although its linear-
    attention layers decode with the recurrent form of the gated delta rule and score with the chunked form
    (the same sums in another order: 3e-6 apart here over 200 tokens; a trained model's gap is logged as
    logp_diff_max at every RL step)."""
    policy, tok, ip = peaked(tiny)
    ro = R.generate(policy, tok, ip, IMAGES, QUESTIONS, num_samples=3, temperature=1.0, max_new_tokens=32, seeds=[1, 2])
    assert len(ro.texts) == 6 and ro.group.tolist() == [0, 0, 0, 1, 1, 1] and len(set(ro.texts)) > 2
    with torch.no_grad():
        lp = M.completion_logprobs(policy, ro.prompt, ro.completion_ids, 1.0, ro.suppress_ids)
    assert ((lp - ro.logprobs) * ro.completion_mask).abs().max().item() <= 1e-4
    assert ro.logprobs[ro.completion_mask.bool()].mean() > -4.0          # peaked (uniform: -log 1024 = -6.9)


@pytest.mark.parametrize("name", ["tiny", *FAMILIES])
def test_a_prompts_samples_do_not_depend_on_the_batch(name):
    """Seeded per prompt, a group's samples are the same alone or beside another (left-padded) prompt,
    and so are their scores; Qwen2-VL ("tiny") included."""
    policy, tok, ip = M.load(name, device="cpu", build=qwen_tiny.builder(name))
    kw = dict(num_samples=2, temperature=1.3, max_new_tokens=16)
    both = R.generate(policy, tok, ip, IMAGES, QUESTIONS, seeds=[11, 22], **kw)
    alone = R.generate(policy, tok, ip, IMAGES[1:], QUESTIONS[1:], seeds=[22], **kw)
    assert both.texts[2:] == alone.texts
    with torch.no_grad():   # the padded row scores as it does alone
        prompt, ids, mask = both.rows([2])
        padded = M.completion_logprobs(policy, prompt, ids, 1.3, both.suppress_ids)
        prompt, ids, _ = alone.rows([0])
        single = M.completion_logprobs(policy, prompt, ids, 1.3, alone.suppress_ids)
    assert torch.allclose(padded * mask, single[:, :mask.shape[1]] * mask, atol=1e-5)


def test_greedy_decoding_matches_transformers_generate(tiny):
    policy, tok, ip = tiny
    ro = R.generate(policy, tok, ip, IMAGES, QUESTIONS, num_samples=1, greedy=True, max_new_tokens=12)
    batch = M.build_inputs(tok, ip, IMAGES, QUESTIONS)
    batch.pop("kept")
    out = policy.generate(**batch, do_sample=False, max_new_tokens=12, suppress_tokens=M.special_ids(tok)[0],
                          eos_token_id=-1, pad_token_id=tok.pad_token_id)
    assert torch.equal(out[:, batch["input_ids"].shape[1]:][:, :ro.completion_ids.shape[1]], ro.completion_ids)


def test_each_family_takes_its_decoder(tiny, monkeypatch, caplog):
    """Qwen2.5-VL and Qwen3-VL run the static-cache step (written out for their layers): it decodes what the
    model's own forward and cache decode. Qwen3.5's hybrid cache has no static form here: it always takes
    the model's own path, even when a CUDA graph is asked for (said once in the log)."""
    policy, tok, ip = peaked(tiny)
    kw = dict(num_samples=2, temperature=1.0, max_new_tokens=12, seeds=[5, 6])
    ro = R.generate(policy, tok, ip, IMAGES, QUESTIONS, **kw)
    if policy.config.model_type == "qwen3_5":
        assert not R.static_cache_fits(policy)
        caplog.set_level("WARNING")
        again = R.generate(policy, tok, ip, IMAGES, QUESTIONS, compile=True, **kw)
        assert "decodes eagerly with its own cache" in caplog.text
    else:
        assert R.static_cache_fits(policy)
        monkeypatch.setattr(R, "static_cache_fits", lambda model: False)
        again = R.generate(policy, tok, ip, IMAGES, QUESTIONS, **kw)
    assert torch.equal(ro.completion_ids, again.completion_ids)
    assert torch.allclose(ro.logprobs, again.logprobs, atol=1e-4)


def test_the_sampling_copy_is_the_policy(tiny):
    """sampling_copy.inference_copy rebuilds any family from its config (Qwen3.5's linear-attention parameters too):
    in fp32 it samples exactly what the policy samples; in bf16 it holds the policy's weights cast."""
    policy, tok, ip = tiny
    kw = dict(num_samples=2, temperature=1.0, max_new_tokens=12, seeds=[3, 4])
    a = R.generate(policy, tok, ip, IMAGES, QUESTIONS, **kw)
    b = R.generate(SC.inference_copy(policy, torch.float32), tok, ip, IMAGES, QUESTIONS, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    half = SC.inference_copy(policy, torch.bfloat16)
    assert all(torch.equal(q, policy.get_parameter(name).to(q.dtype)) for name, q in half.named_parameters())
    assert {q.dtype for q in half.parameters()} == {torch.bfloat16, torch.float32}


def test_save_load_round_trip(tiny, tmp_path):
    policy, tok, ip = tiny
    for part in tiny:
        part.save_pretrained(tmp_path)
    loaded = M.load(str(tmp_path), device="cpu")
    assert type(loaded[0]) is type(policy) and loaded[1].chat_template == tok.chat_template
    batch = M.build_inputs(tok, ip, IMAGES, QUESTIONS)
    batch.pop("kept")
    with torch.no_grad():
        assert torch.equal(policy(**batch).logits, loaded[0](**batch).logits)
    assert AutoTokenizer.from_pretrained(tmp_path)("### Step 1:")["input_ids"] == tok("### Step 1:")["input_ids"]


def test_reasoning_in_a_think_block_is_never_rewarded():
    """Rewards judge the visible reply: what follows the last </think>, up to a <think> never closed."""
    s = toy.dataset("train", n=1)[0]
    reply = s["solution"]
    full = rewards.reward(reply, s)["total"]
    assert full > 2.0
    assert rewards.reward(f"<think>\nhmm\n</think>\n\n{reply}", s)["total"] == full
    assert rewards.reward(f"hmm\n</think>\n\n{reply}", s)["total"] == full          # the prompt opened the block
    for hidden in (f"<think>\n{reply}\n</think>\n\nI am not sure.", f"I am not sure.<think>\n{reply}"):
        assert rewards.reward(hidden, s)["total"] == 0.0
        assert rewards.extract_answer(hidden) is None and rewards.step_rvr(hidden) == 0.0
    assert rewards.visible_reply("a<think>b</think>c<think>d") == "c"


@pytest.mark.parametrize("name", FAMILIES)
def test_two_step_warm_up_and_stepgrpo_run(name, tmp_path):
    T.main(["--model", name, "--data", "toy", "--out_dir", str(tmp_path), "--sft_steps", "2", "--sft_batch", "2",
            "--max_steps", "2", "--prompts_per_step", "2", "--max_new_tokens", "16", "--eval_n", "0"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["stage"] for r in rows].count("sft") == 2 and [r["stage"] for r in rows].count("rl") == 2
    assert all(r["loss"] == r["loss"] for r in rows)        # finite: no NaN
    assert type(M.load(str(tmp_path / "final"), device="cpu")[0]).__name__.startswith(
        {"tiny-qwen2.5-vl": "Qwen2_5_VL", "tiny-qwen3-vl": "Qwen3VL", "tiny-qwen3.5": "Qwen3_5"}[name])
