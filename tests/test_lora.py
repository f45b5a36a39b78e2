"""What trains: LoRA adapters on a frozen base (the reference is the base), a frozen vision tower, and the
preset a pretrained model gets on the toy task. Tiny models, a few steps each."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import model as M
import train as T
from qwen import tiny
from toy import task as toy
from training import logs, lora
from training.setup import paper_sft_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = ["--stage", "rl", "--data", "toy", "--prompts_per_step", "2", "--num_generations", "4", "--max_new_tokens", "16",
      "--micro_batch", "8", "--eval_n", "0", "--lr", "1e-2"]
LORA = ["--lora_rank", "4"]
SFT = ["--data", "toy", "--stage", "sft", "--sft_steps", "2", "--sft_batch", "2", "--sft_lr", "1e-2", "--eval_n", "0",
       "--save_every", "1", *LORA]


def make_run(out, *flags):
    run = T.setup(T.parse_args(["--out_dir", str(out), *RL, *flags]))
    run.reference = T.load_reference(run)
    return run


def rl_step(run, step=0):
    """One RL step with advantages that vary (a random tiny model earns no reward, so its own would all be 0)."""
    batch = T.collect(run, step)
    batch.advantages = torch.linspace(-1, 1, len(batch.rewards))
    optimizer, scheduler = T.make_optimizer(run, run.args.lr, 0.0, 10, 0.0, False)
    return T.update(run, batch, optimizer, scheduler), optimizer


def snapshot(net):
    return {n: q.detach().clone() for n, q in net.named_parameters()}


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    """A LoRA run after one RL step: (run, its weights before, the step's result, the optimizer)."""
    run = make_run(tmp_path_factory.mktemp("lora_rl"), *LORA)
    before = snapshot(run.policy)
    result, optimizer = rl_step(run)
    return run, before, result, optimizer


def test_a_lora_step_changes_only_the_adapters(stepped):
    run, before, _, optimizer = stepped
    changed = {n for n, q in run.policy.named_parameters() if not torch.equal(before[n], q)}
    assert changed and all(".lora_B." in n for n in changed)         # A moves from the next step: B was 0
    adapters = [q for n, q in run.policy.named_parameters() if ".lora_" in n]
    assert {id(q) for q in optimizer.state} == {id(q) for q in adapters}
    assert all(q.dtype == torch.float32 for q in adapters)


def test_the_reference_is_the_policy_with_adapters_off_and_kl_is_exactly_0_at_step_0(stepped):
    run, _, result, _ = stepped
    assert run.reference is run.policy and result["micro"][0]["kl"] == 0.0
    batch = T.collect(run, 1)
    prompt, ids, _ = batch.rollout.rows(list(range(len(batch.rewards))))
    base = M.load("tiny", device="cpu", build=tiny.builder("tiny"))[0]
    with torch.no_grad():
        with lora.adapters_off(run.reference):
            ref = M.completion_logprobs(run.reference, prompt, ids)
        assert torch.equal(ref, M.completion_logprobs(base, prompt, ids))     # the base never moved
        assert not torch.equal(M.completion_logprobs(run.policy, prompt, ids), ref)


def sampling_vs_scoring(run, step):
    """max |sampled - scored| log-prob over a fresh rollout's completion tokens, scored as update() scores."""
    batch = T.collect(run, step)
    prompt, ids, mask = batch.rollout.rows(list(range(len(batch.rewards))))
    with torch.no_grad(), run.amp:
        scored = M.completion_logprobs(run.policy, prompt, ids, run.args.temperature, batch.rollout.suppress_ids)
    return float(((scored - batch.rollout.logprobs[:, :ids.shape[1]]).abs() * mask).max())


def test_sampling_agrees_with_scoring_through_the_adapters(stepped):
    run = stepped[0]
    assert run.sampler is run.policy and sampling_vs_scoring(run, 2) < 1e-4     # fp32: through its peft layers


def held_bytes(*nets):
    """Bytes of the distinct tensors the nets hold (a tensor shared by two nets counts once)."""
    tensors = {q.data_ptr(): q for net in nets for q in net.parameters()}
    return sum(q.numel() * q.element_size() for q in tensors.values())


def test_under_bf16_lora_samples_as_close_to_its_scores_as_full_fine_tuning_with_one_base(tmp_path):
    """bf16 autocast: after several updates the sampled log-probs are the scored ones as closely as for full
    fine-tuning (whose sampler is the cast copy, bit for bit), and the base is held once (no merged copy)."""
    gaps = {}
    for name, flags in (("full", []), ("lora", LORA)):
        run = make_run(tmp_path / name, "--dtype", "bf16", "--lr", "1e-5", *flags)
        optimizer, scheduler = T.make_optimizer(run, run.args.lr, 0.0, 10, 0.0, False)
        for step in range(4):
            batch = T.collect(run, step)
            batch.advantages = torch.linspace(-1, 1, len(batch.rewards))
            T.update(run, batch, optimizer, scheduler)
        gaps[name] = sampling_vs_scoring(run, 4)
        if name == "lora":
            base = sum(q.numel() * q.element_size() for n, q in run.policy.named_parameters() if ".lora_" not in n)
            adapters = held_bytes(run.policy) - base
            assert run.sampler is run.policy and run.reference is run.policy
            assert held_bytes(run.policy, run.sampler, run.reference) == base + adapters
            assert any(q.dtype == torch.bfloat16 for q in run.policy.parameters())
            moved = [q for n, q in run.policy.named_parameters() if ".lora_B." in n and q.abs().max() > 0]
            assert moved
    # measured, 2-core CPU: LoRA 4.2e-3 (three bf16 matmuls per projection), full 0.5e-3 to 1.7e-3 by thread count
    assert gaps["lora"] < 1e-2 and gaps["full"] < 1e-2, gaps


@pytest.fixture(scope="module")
def sft_lora(tmp_path_factory):
    """Two LoRA warm-up steps, uninterrupted."""
    out = tmp_path_factory.mktemp("lora_full")
    T.main(["--out_dir", str(out), *SFT])
    return out


def adapter(out):
    return load_file(os.path.join(out, "final", "adapter", "adapter_model.safetensors"))


def test_a_lora_checkpoint_holds_the_adapters_and_resume_continues_exactly(sft_lora, tmp_path):
    T.main(["--out_dir", str(tmp_path), *SFT, "--stop_after", "1"])
    saved = torch.load(tmp_path / "checkpoint" / "ckpt.pt", weights_only=False)
    assert saved["model"] and all(".lora_" in k for k in saved["model"])
    T.main(["--out_dir", str(tmp_path), *SFT, "--resume"])
    a, b = adapter(sft_lora), adapter(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_final_is_a_merged_model_transformers_loads_equal_to_base_plus_adapter_deltas(sft_lora):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    merged = AutoModelForImageTextToText.from_pretrained(sft_lora / "final").state_dict()
    base = M.load("tiny", device="cpu", build=tiny.builder("tiny"))[0]
    with_adapter = PeftModel.from_pretrained(base, str(sft_lora / "final" / "adapter")).merge_and_unload().state_dict()
    delta, scale = adapter(sft_lora), 8 / 4                                  # alpha = 2 x rank by default
    q = "model.language_model.layers.0.self_attn.q_proj"
    expected = base_q = M.load("tiny", device="cpu", build=tiny.builder("tiny"))[0].state_dict()[q + ".weight"]
    expected = base_q + scale * delta[f"base_model.model.{q}.lora_B.weight"] @ delta[f"base_model.model.{q}.lora_A.weight"]
    assert not torch.equal(merged[q + ".weight"], base_q)
    torch.testing.assert_close(merged[q + ".weight"], expected, atol=1e-6, rtol=0)
    assert merged.keys() == with_adapter.keys()
    assert all(torch.allclose(merged[k], with_adapter[k], atol=1e-6, rtol=0) for k in merged)


def test_two_ranks_train_the_same_adapters_as_one(sft_lora, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    flags = [f if f != "2" or i != SFT.index("--sft_batch") + 1 else "1" for i, f in enumerate(SFT)]   # per rank
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                          "--out_dir", str(tmp_path), *flags], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = adapter(sft_lora), adapter(tmp_path)
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)
    # Equal up to float summation order (one padded batch of 2 rows against one row per rank). Adam's first steps
    # move an entry by ~lr whatever its gradient's size, so an entry whose gradient is ~0 (of the order of Adam's
    # eps) may land anywhere within 2 lr x steps: a handful may; every other entry agrees within a tenth of the lr.
    lr, steps = float(SFT[SFT.index("--sft_lr") + 1]), int(SFT[SFT.index("--sft_steps") + 1])
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert diff.max() <= 2 * lr * steps and int((diff > lr / 10).sum()) <= max(3, diff.numel() // 10_000)
    losses = [[round(json.loads(line)["loss"], 5) for line in open(out / "metrics.jsonl")] for out in (sft_lora, tmp_path)]
    assert losses[0] == losses[1]


def test_freeze_vision_keeps_the_vision_tower_bit_identical_through_both_stages(tmp_path):
    run = make_run(tmp_path, "--freeze_vision", "--sft_steps", "2", "--sft_batch", "2", "--sft_lr", "1e-3")
    before = snapshot(run.policy)
    T.sft(run)
    rl_step(run)
    frozen = {id(q) for q in lora.vision_tower(run.policy)}
    for n, q in run.policy.named_parameters():
        assert torch.equal(before[n], q) == (id(q) in frozen), n   # everything else moved, the merger too
        assert (q.grad is None) or id(q) not in frozen


def test_a_pretrained_model_on_the_toy_task_gets_the_pretrained_preset(tmp_path):
    net, tokenizer, image_processor = tiny.load_tiny(mlp=320)     # not the tiny shape: stands in for a hub checkpoint
    for part in (net, tokenizer, image_processor):
        part.save_pretrained(tmp_path / "model")
    args = T.parse_args(["--model", str(tmp_path / "model"), "--out_dir", str(tmp_path / "out")])
    assert all(getattr(args, k) == v for k, v in toy.PRETRAINED.items())
    assert (args.lr, args.beta, args.temperature, args.prompts_per_step, args.grad_accum) == (1e-6, 0.04, 1.2, 1, 4)
    assert T.parse_args(["--model", "tiny-qwen3-vl"]).sft_lr == toy.PRESET["sft_lr"]
    assert T.setup(args).args.sft_lr == 2e-5 and paper_sft_lr(8.3e9) == 5e-6


def test_lora_under_fsdp_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")                  # as torchrun sets it: --fsdp alone is refused without
    with pytest.raises(SystemExit) as err:
        T.main(["--out_dir", str(tmp_path / "out"), "--fsdp", *LORA])
    assert "use data parallel" in str(err.value) and "\n" not in str(err.value)


# A warm-up this short leaves the model less sure than the preset's 600 x 32 paths: it samples at T = 0.1 in RL.
BOTH = ["--lora_rank", "16", "--sft_steps", "150", "--sft_batch", "8", "--sft_lr", "3e-3", "--max_steps", "2", "--temperature", "0.05",
        "--prompts_per_step", "4", "--max_new_tokens", "100", "--eval_n", "0", "--save_every", "1000"]


def test_lora_rates_are_set_by_lora_rank_unless_given(tmp_path, capsys):
    tiny_lora = T.parse_args(["--lora_rank", "16"])
    assert all(getattr(tiny_lora, k) == v for k, v in toy.LORA_PRESET.items()) and tiny_lora.temperature < 1
    assert T.parse_args(["--lora_rank", "16", "--lr", "1e-3"]).lr == 1e-3 and T.parse_args([]).lr == toy.PRESET["lr"]
    net, tokenizer, image_processor = tiny.load_tiny(mlp=320)     # not the tiny shape: stands in for a hub checkpoint
    for part in (net, tokenizer, image_processor):
        part.save_pretrained(tmp_path / "model")
    args = T.parse_args(["--model", str(tmp_path / "model"), "--data", "toy", "--lora_rank", "8",
                         "--out_dir", str(tmp_path / "out")])
    assert args.lr == lora.RATES["lr"] and args.temperature == 1.2
    assert T.setup(args).args.sft_lr == lora.SFT_LR_FACTOR * 2e-5
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--lora_rank sets, unless given: --lr 1e-05" in shown and "--temperature 0.25" in shown


def test_rl_after_a_lora_warm_up_samples_the_warm_up_and_earns_rewards_and_final_adapter_fits_model(tmp_path):
    """--stage both with LoRA: the RL stage starts from the warm-up's model (KL 0 at its first step) and its
    samples earn rewards; final/adapter is for --model and says so."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    T.main(["--out_dir", str(tmp_path), *BOTH])
    rl = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"stage": "rl"' in line]
    sft = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl") if '"stage": "sft"' in line]
    assert rl[0]["kl"] == 0.0 and max(r["reward"] for r in rl) > 0, (sft[::10], rl)
    config = json.load(open(tmp_path / "final" / "adapter" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == "tiny" and config["r"] == 32       # warm-up's and RL's, side by side
    base = M.load("tiny", device="cpu", build=tiny.builder("tiny"))[0]
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "final" / "adapter")).merge_and_unload().state_dict()
    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "final").state_dict()
    warmup = AutoModelForImageTextToText.from_pretrained(tmp_path / "warmup").state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(final[q], warmup[q], atol=1e-6)                   # the RL adapters moved it
    assert all(torch.allclose(final[k], with_adapter[k], atol=1e-5, rtol=0) for k in final)


def test_a_run_whose_first_rl_steps_earn_nothing_says_so(tmp_path, capsys):
    T.main(["--out_dir", str(tmp_path), *RL, "--max_steps", str(logs.NO_REWARD_STEPS), "--log_rollouts_every", "100"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "earned any reward" in line]
    assert len(lines) == 1 and str(tmp_path / "rollouts.jsonl") in lines[0]
    rows = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    assert rows and all(r["step"] == logs.NO_REWARD_STEPS and r["total"] == 0 for r in rows)
