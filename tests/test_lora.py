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
from training import lora
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


def test_sampling_agrees_with_scoring_with_adapters_and_in_the_merged_copy(stepped):
    run = stepped[0]
    batch = T.collect(run, 2)                             # fp32: the policy samples through its peft layers
    prompt, ids, mask = batch.rollout.rows(list(range(len(batch.rewards))))
    copy = M.inference_copy(run.policy, torch.float32)    # the sampler under bf16: adapters merged into it
    with torch.no_grad():
        scored = M.completion_logprobs(run.policy, prompt, ids, run.args.temperature, batch.rollout.suppress_ids)
        merged = M.completion_logprobs(copy, prompt, ids, run.args.temperature, batch.rollout.suppress_ids)
    sampled = batch.rollout.logprobs[:, :ids.shape[1]]
    assert ((scored - sampled).abs() * mask).max() < 1e-4 and ((merged - scored).abs() * mask).max() < 1e-4


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
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py",
                          "--out_dir", str(tmp_path), *flags], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = adapter(sft_lora), adapter(tmp_path)
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)
    # equal up to float summation order, which Adam amplifies where gradients are ~0: a tenth of the lr
    assert all(torch.allclose(one[k], two[k], atol=1e-3, rtol=0) for k in one)
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
    net, tokenizer, image_processor = tiny.load_tiny()
    for part in (net, tokenizer, image_processor):               # stands in for a hub checkpoint
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
