"""The training loop end to end: SFT learns, RL learns a trivial reward, DDP and resume are exact;
and the step itself, called directly: train.py imports without side effects."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint, logs
import model as M
import rollout as R
import train as T
from stepgrpo import group_advantages, policy_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = ["--stage", "rl", "--data", "toy", "--prompts_per_step", "4", "--num_generations", "4", "--max_new_tokens", "128",
      "--micro_batch", "8", "--lr", "1e-4", "--eval_n", "0", "--log_rollouts_every", "1"]


def train(out, *flags, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    res = subprocess.run(launcher + [os.path.join(ROOT, "train.py"), "--out_dir", str(out), *flags],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def metrics(out, stage="rl"):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if r["stage"] == stage]


def weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A tiny model after a short SFT warm-up on the toy task (its outputs get non-constant rewards)."""
    out = tmp_path_factory.mktemp("warm")
    res = train(out, "--stage", "sft", "--sft_steps", "150", "--sft_batch", "16", "--eval_n", "0")
    assert json.loads(res.stdout.strip().splitlines()[-1])["seconds"] > 0
    return out


def test_sft_loss_falls(warm):
    losses = [r["loss"] for r in metrics(warm, "sft")]
    assert len(losses) == 150
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


@pytest.fixture(scope="module")
def one_rank(warm, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train(out, "--model", str(warm / "final"), *RL, "--max_steps", "2")
    return out


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["data-parallel", "fsdp"])
def test_two_ranks_give_the_same_update_as_one(warm, one_rank, tmp_path, mode):
    model = str(warm / "final")
    train(tmp_path, "--model", model, *RL, "--max_steps", "2", "--prompts_per_step", "2", *mode, nproc=2)
    start, one, two = load_file(os.path.join(model, "model.safetensors")), weights(one_rank), weights(tmp_path)
    step = max((one[k] - start[k]).abs().max().item() for k in one)
    assert step > 1e-5                                                             # the update is not empty
    for k in one:   # equal up to float summation order, which Adam amplifies where gradients are ~0
        assert torch.allclose(one[k], two[k], atol=0.05 * step, rtol=0), k
    m1, m2 = metrics(one_rank), metrics(tmp_path)
    assert [r["frac_reward_zero_std"] for r in m1] != [1.0, 1.0]                    # rewards did vary
    assert [round(r["reward"], 6) for r in m1] == [round(r["reward"], 6) for r in m2]


def test_resume_continues_exactly(warm, tmp_path):
    model = str(warm / "final")
    flags = ["--model", model, *RL, "--max_steps", "4", "--save_every", "2"]
    train(tmp_path / "full", *flags)
    res = train(tmp_path / "split", *flags, "--stop_after", "2")
    assert "; continue with: python " in res.stderr and res.stderr.strip().endswith("--resume")
    assert len(metrics(tmp_path / "split")) == 2
    train(tmp_path / "split", *flags, "--resume")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds", "tokens_per_s")}
    assert [drop(r) for r in metrics(tmp_path / "full")] == [drop(r) for r in metrics(tmp_path / "split")]
    rollouts = [json.loads(line) for line in open(tmp_path / "full" / "rollouts.jsonl")]
    assert {"completion", "total", "step_rar", "step_rvr", "matched"} <= set(rollouts[0])
    resumed = [json.loads(line) for line in open(tmp_path / "split" / "rollouts.jsonl")]
    assert [(r["step"], r["completion"]) for r in resumed] == [(r["step"], r["completion"]) for r in rollouts]
    assert (tmp_path / "full" / "training_curves.png").exists()


def test_rl_raises_a_trivially_learnable_reward(tiny):
    """The loop's pieces (rollout → group advantages → scoring → Eq. 5 loss) push up a simple reward."""
    import copy
    policy, tok, ip = copy.deepcopy(tiny[0]), tiny[1], tiny[2]
    from PIL import Image
    images, questions = [Image.new("RGB", (56, 56), c) for c in ("red", "blue")], ["q1", "q2"]
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    torch.manual_seed(0)
    means = []                    # reward: how many of the 8 new tokens have an even id (about half at random init)
    for _ in range(15):
        ro = R.generate(policy, tok, ip, images, questions, num_samples=8, max_new_tokens=8)
        r = ((ro.completion_ids % 2 == 0) & ro.completion_mask.bool()).float().sum(1)
        means.append(r.mean().item())
        adv, _ = group_advantages(r, 8)
        lp = M.completion_logprobs(policy, ro.prompt, ro.completion_ids, 1.0, ro.suppress_ids)
        loss, _ = policy_loss(lp, None, None, adv, ro.completion_mask, beta=0.0)
        opt.zero_grad(), loss.backward(), opt.step()
    assert sum(means[-3:]) / 3 > sum(means[:3]) / 3 + 1.0


def test_default_run_in_miniature(tmp_path):
    """`python train.py` with no arguments runs warm-up then StepGRPO; here with the same code at toy size:
    held-out accuracy after each stage, the curves, and the JSON summary as the last line."""
    res = train(tmp_path, "--sft_steps", "6", "--sft_batch", "4", "--max_steps", "2", "--prompts_per_step", "2",
                "--max_new_tokens", "32", "--eval_n", "4")
    assert "held-out accuracy after warm-up" in res.stdout and "held-out accuracy after StepGRPO" in res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"accuracy_warmup", "accuracy_rl", "reward_first", "reward_last", "seconds"} <= set(summary)
    assert 0 <= summary["accuracy_warmup"] <= 1 and 0 <= summary["accuracy_rl"] <= 1
    assert [len(metrics(tmp_path, s)) for s in ("sft", "rl")] == [6, 2]
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "warmup" / "config.json").exists() and (tmp_path / "final" / "config.json").exists()


def test_ablation_runs_every_arm_from_one_warmup(warm, tmp_path):
    """scripts/ablation.py end to end at one step per arm, an RL arm and the SFT control (tests/test_ablation.py
    checks every arm's flags): each trains from the given warm-up, is scored on the same held-out questions, and
    lands in results.json and the chart."""
    ablation = lambda *flags: subprocess.run(
        [sys.executable, "-m", "scripts.ablation", "--warmup", str(warm / "final"), "--seeds", "0",
         "--eval_n", "4", "--max_new_tokens", "32", "--jobs", "2", "--out_dir", str(tmp_path), "--regime", "sparse",
         "--eval_every", "1", "--curve_n", "2", "--probe_n", "2", "--arms", "step", "sft", *flags], capture_output=True,
        text=True, cwd=ROOT,
        timeout=600)
    res = ablation("--steps", "1")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.load(open(tmp_path / "results.json"))
    runs = results["runs"]
    assert [r["arm"] for r in runs] == ["warmup", "step", "sft"]
    assert all(0 <= r["accuracy"] <= 100 and 0 <= r["format"] <= 100 and 0 <= r["key_step_match"] <= 1 for r in runs)
    assert all(r["wall_s"] > 0 and r["train_s"] > 0 for r in runs[1:])              # each run's training time
    assert 0 <= runs[1]["zero_std"] <= 1 and runs[2]["zero_std"] is None                  # the RL arm; SFT has none
    assert all([s for s, _ in r["curves"]["accuracy"]] == [0, 1] for r in runs[1:])      # warm-up, then each step
    assert set(results["step0"]["frac_reward_zero_std"]) == {"outcome", "steprar", "steprvr", "step"}
    assert "| + StepRAR + StepRVR (StepGRPO) |" in res.stdout and "groups with zero reward std" in res.stdout
    assert "| held-out key-step match | zero-std groups |" in res.stdout
    assert (tmp_path / "ablation.png").exists()                                 # into out_dir, not assets/
    assert max(r["lr"] for r in metrics(tmp_path / "sft_seed0", "sft")) <= 5e-5   # the control's small lr
    other = ablation("--steps", "2")             # runs made under other settings are never mixed in
    assert other.returncode != 0 and "use another --out_dir" in other.stderr


# ---------------------------------------------------------------------------- the step, called directly
def make_run(out, *flags):
    """A run of the toy RL stage as train.main builds it, with its reference model."""
    run = T.setup(T.parse_args(["--out_dir", str(out), *RL, "--prompts_per_step", "2", "--max_new_tokens", "48", *flags]))
    run.reference = T.load_reference(run)
    return run


def test_importing_train_has_no_side_effects(tmp_path):
    res = subprocess.run([sys.executable, "-c", "import train"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0 and res.stdout == "" and os.listdir(tmp_path) == []


def test_collect_then_update_is_one_step_of_the_method(tmp_path):
    torch.manual_seed(0)
    run = make_run(tmp_path)
    batch = T.collect(run, step=0)
    m = run.args.num_generations
    assert len(batch.rewards) == len(batch.samples) == batch.rollout.completion_ids.shape[0] == 2 * m
    assert batch.advantages.shape == (2 * m,)
    assert all(batch.samples[i]["id"] == batch.samples[i // m * m]["id"] for i in range(2 * m))  # groups together
    optimizer, scheduler = T.make_optimizer(run, 1e-3, 0.0, 1, 0.0, False)
    before = [q.detach().clone() for q in run.policy.parameters()]
    result = T.update(run, batch, optimizer, scheduler)
    changed = any(not torch.equal(a, b) for a, b in zip(before, run.policy.parameters()))
    assert changed == (result["grad_norm"] > 0)
    assert {"kl", "logp_diff_mean", "logp_diff_max", "sampler_ratio_min", "sampler_ratio_max"} <= set(result["micro"][0])
    assert result["micro"][0]["logp_diff_max"] < 1e-4        # fp32: sampling and scoring agree


def test_samples_of_a_prompt_do_not_depend_on_the_batch(tmp_path):
    one = make_run(tmp_path / "a", "--prompts_per_step", "1", "--grad_accum", "2")
    two = make_run(tmp_path / "b", "--prompts_per_step", "2", "--grad_accum", "1")
    a, b = T.collect(one, 0), T.collect(two, 0)
    assert [s["id"] for s in a.samples] == [s["id"] for s in b.samples]
    assert torch.equal(a.rollout.completion_ids, b.rollout.completion_ids)


def test_reference_and_policy_agree_bitwise_at_step_0_in_bf16(tmp_path):
    run = make_run(tmp_path, "--dtype", "bf16")
    batch = T.collect(run, 0)
    prompt, ids, _ = batch.rollout.rows(list(range(len(batch.rewards))))
    with torch.no_grad(), run.amp:
        pol = M.completion_logprobs(run.policy, prompt, ids, 1.0, batch.rollout.suppress_ids)
        ref = M.completion_logprobs(run.reference, prompt, ids, 1.0, batch.rollout.suppress_ids)
    assert torch.equal(pol, ref)


def test_gradient_checkpointing_acts_in_the_rl_stage(tmp_path, monkeypatch):
    """transformers checkpoints a layer only in train mode: the RL stage must put the policy there, and
    the memory saved for backward in the update drops accordingly."""
    saved, real = {}, T.update
    for flag in ([], ["--gradient_checkpointing"]):
        run = make_run(tmp_path / str(len(flag)), "--max_steps", "1", "--max_new_tokens", "16", *flag)
        run.policy.eval()                                  # as from_pretrained returns it
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        def counted(*args, **kw):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return real(*args, **kw)
        monkeypatch.setattr(T, "update", counted)
        T.rl(run)
        saved[bool(flag)] = total[0]
    assert saved[True] < 0.5 * saved[False], saved


def test_top_p_below_one_is_refused_in_rl(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--stage", "rl", "--top_p", "0.9"])
    assert "--top_p 1 in RL" in capsys.readouterr().err


def test_help_shows_the_paper_default_and_the_toy_preset(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1e-06)" in text and "a tiny model, or a folder one was saved to: --stage both" in text and "--lr 5e-05" in text   # --lr
    assert all(T.parse_args([]).__dict__[k] == v for k, v in __import__("toy.task").task.PRESET.items())
    assert T.parse_args(["--lr", "3e-4"]).lr == 3e-4                       # the command line wins


@pytest.mark.parametrize("flags, message", [
    (["--model", "out/nope/final"], "model directory 'out/nope/final' does not exist"),
    (["--model", "./nope"], "does not exist"),
    (["--data", "missing.jsonl"], "data file 'missing.jsonl' not found"),
    (["--resume"], "holds no checkpoint: run without --resume"),
])
def test_user_mistakes_stop_with_one_line_before_anything_is_written(tmp_path, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        T.main(["--out_dir", str(out), *flags])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA graphs are available")
def test_compile_without_cuda_stops_with_one_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        T.main(["--out_dir", str(tmp_path / "out"), "--compile"])
    assert "needs a CUDA device" in str(err.value) and not (tmp_path / "out").exists()


def test_rl_stage_on_an_sft_file_suggests_the_sft_stage(tmp_path):
    from PIL import Image
    Image.new("RGB", (28, 28), "red").save(tmp_path / "a.png")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "<image>q"},
                                                                 {"role": "assistant", "content": "a"}],
                                                    "images": ["a.png"]}) + "\n")
    with pytest.raises(SystemExit) as err:
        T.main(["--out_dir", str(tmp_path / "out"), "--stage", "rl", "--data", str(tmp_path / "sft.jsonl")])
    assert "--stage sft" in str(err.value) and not (tmp_path / "out").exists()


def test_a_fresh_run_never_deletes_another_runs_checkpoint(warm, tmp_path):
    out = tmp_path / "run"
    train(out, "--model", str(warm / "final"), *RL, "--max_steps", "1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--out_dir", str(out), *RL, "--max_steps", "1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "--resume to continue it, --overwrite to start afresh" in res.stderr
    assert "Traceback" not in res.stderr and (out / "metrics.jsonl").exists()


def test_summary_is_valid_json_when_a_metric_has_no_value(tmp_path):
    """RL steps without a sample (every prompt of the step skipped): the summary says null, never NaN."""
    row = logs.finite({"stage": "rl", "step": 1, "reward": None, "kl": float("nan")})
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    summary = json.loads(json.dumps(logs.finite(logs.reward_summary(tmp_path))), parse_constant=lambda c: pytest.fail(c))
    assert summary["reward_first"] is None and row["kl"] is None


# ---------------------------------------------------------------------------- several processes (gloo)
def torchrun(script, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


FSDP_PROBE = """
import json, sys, torch
from torch.distributed.tensor import DTensor
import model as M, train as T
from training import parallel
run = T.setup(T.parse_args(["--out_dir", sys.argv[1], "--stage", "rl", "--data", "toy", "--fsdp", "--prompts_per_step", "1",
                            "--num_generations", "2", "--max_new_tokens", "8", "--micro_batch", "2", "--eval_n", "0"]))
run.reference = T.load_reference(run)
sharded = lambda net: all(isinstance(q, DTensor) for q in net.parameters())   # blocks and root
batch = T.collect(run, 0)
prompt, ids, _ = batch.rollout.rows([0, 1])
with torch.no_grad():
    M.completion_logprobs(run.reference, prompt, ids)
state = dict(reference=sharded(run.reference))
logp = M.completion_logprobs(run.policy, prompt, ids)
state["policy_after_forward"] = sharded(run.policy)
logp.sum().backward()
state["policy_after_backward"] = sharded(run.policy)
json.dump(state, open(f"{sys.argv[1]}/state{run.rank}.json", "w"))
parallel.close(finished=True)   # as a finished run ends
"""


def test_fsdp_units_reshard_after_forward_and_the_reference_stays_sharded(tmp_path):
    (tmp_path / "probe.py").write_text(FSDP_PROBE)
    res = torchrun(str(tmp_path / "probe.py"), str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    states = [json.load(open(tmp_path / "out" / f"state{rank}.json")) for rank in (0, 1)]
    assert all(s == {"reference": True, "policy_after_forward": True, "policy_after_backward": True} for s in states)


FSDP_BF16_PROBE = """
import json, sys, torch
import model as M, train as T
from training import parallel
run = T.setup(T.parse_args(["--out_dir", sys.argv[1], "--model", sys.argv[2], "--stage", "rl", "--data", "toy", "--fsdp",
                            "--dtype", "bf16", "--prompts_per_step", "1", "--num_generations", "2", "--max_new_tokens", "8", "--eval_n", "0"]))
run.reference = T.load_reference(run)
seen = {}
for name, module in run.policy.named_modules():
    if ".layers." in name or ".blocks." in name:
        kind = "matmul" if M.is_matmul(module) else "norm" if "norm" in type(module).__name__.lower() else None
        if kind:
            module.register_forward_pre_hook(lambda m, _, kind=kind: seen.setdefault(kind, set()).add(str(m.weight.dtype)))
batch = T.collect(run, 0)
prompt, ids, _ = batch.rollout.rows([0, 1])
with torch.no_grad(), run.amp:
    pol, ref, sampler = (M.completion_logprobs(net, prompt, ids) for net in (run.policy, run.reference, run.sampler))
with run.amp:
    logp = M.completion_logprobs(run.policy, prompt, ids)
logp.sum().backward()                                      # bf16 gradients, reduced in fp32 onto fp32 shards
trained = [q for q in run.policy.parameters() if q.requires_grad]
norm = parallel.clip_gradients(trained, float("inf")) if all(q.grad.dtype == torch.float32 for q in trained) else 0
json.dump(dict(kl_zero=torch.equal(pol, ref), sampler_equal=torch.equal(pol, sampler), trains=0 < norm < float("inf"),
               seen={k: sorted(v) for k, v in seen.items()}), open(f"{sys.argv[1]}/state{run.rank}.json", "w"))
parallel.close(finished=True)   # as a finished run ends: a rank that tears down first aborts the other's last reads
"""


@pytest.mark.parametrize("model, matmul", [("tiny", ["torch.bfloat16"]),
                                           ("tiny-qwen3.5", ["torch.bfloat16", "torch.float32"])])
def test_fsdp_in_bf16_gathers_matmul_weights_in_bf16_and_the_reference_agrees_bitwise_at_step_0(tmp_path, model, matmul):
    """Under bf16 FSDP's mixed precision gathers a block's matmul weights already cast (autocast keeps no bf16
    copy of them) and its norms in fp32: policy, reference and sampling copy compute the same bits. Qwen3.5's
    gated delta net keeps its own matmuls in its fp32 unit (it reads its conv weight directly)."""
    (tmp_path / "probe.py").write_text(FSDP_BF16_PROBE)
    res = torchrun(str(tmp_path / "probe.py"), str(tmp_path / "out"), model)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        state = json.load(open(tmp_path / "out" / f"state{rank}.json"))
        assert state == {"kl_zero": True, "sampler_equal": True, "trains": True,
                         "seen": {"matmul": matmul, "norm": ["torch.float32"]}}, state


def bad_image_sft_file(tmp_path):
    """Two SFT records: a readable image and a JPEG cut short (its header passes the loader's check, its pixels do not)."""
    from PIL import Image
    Image.new("RGB", (56, 56), "red").save(tmp_path / "good.png")
    noisy = Image.frombytes("RGB", (128, 128), bytes(range(256)) * 192)
    noisy.save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:1500])
    rows = [{"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}],
             "images": [name]} for name in ("good.png", "cut.jpg")]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "sft.jsonl"


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["data-parallel", "fsdp"])
def test_a_rank_whose_whole_sft_batch_is_skipped_keeps_step_with_the_others(tmp_path, mode):
    data = bad_image_sft_file(tmp_path)
    res = torchrun(os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path / "out"), "--stage", "sft", "--data", str(data),
                   "--sft_steps", "2", "--sft_batch", "1", "--model", "tiny", *mode)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["skipped"]["bad_image"] >= 1 and len(metrics(tmp_path / "out", "sft")) == 2


def test_resume_on_more_ranks_continues_the_same_run(warm, tmp_path):
    flags = ["--model", str(warm / "final"), *RL, "--max_steps", "2", "--save_every", "1"]
    train(tmp_path, *flags, "--stop_after", "1")
    res = torchrun(os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path), *flags, "--prompts_per_step", "2", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "of a run on 1 rank(s)" in res.stderr + res.stdout
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


def test_the_sampling_copy_follows_the_weights_through_updates_and_a_resume(warm, tmp_path):
    """With bf16 autocast rollouts come from an inference copy: after every update, and after a resume, it
    holds the master weights, cast."""
    def holds_master(run):
        copy = dict(run.sampler.named_parameters())
        return all(torch.equal(copy[n], q.detach().to(copy[n].dtype)) for n, q in run.policy.named_parameters())
    flags = ["--model", str(warm / "final"), "--dtype", "bf16", "--max_steps", "2", "--save_every", "1",
             "--max_new_tokens", "128"]                  # long enough for answers: rewards vary, the weights move
    run = make_run(tmp_path, *flags)
    start = {n: q.detach().clone() for n, q in run.policy.named_parameters()}
    T.rl(run)
    assert run.sampler is not run.policy and holds_master(run)
    assert any(not torch.equal(start[n], q) for n, q in run.policy.named_parameters())    # the weights moved
    resumed = make_run(tmp_path, *flags, "--resume")
    optimizer, scheduler = T.make_optimizer(resumed, 1e-6, 0.0, 2, 0.0, False)
    assert checkpoint.restore(resumed, "rl", optimizer, scheduler) == 2 and holds_master(resumed)


# ---------------------------------------------------------------------------- what a user does to a run
def saved_state(ckpt="rl", step=2, ranks=1, **config):
    """A checkpoint's metadata as checkpoint.read returns it (of stage `ckpt`), its config the parsed flags of a
    --stage rl toy run, changed by `config`."""
    return dict(stage=ckpt, step=step, rng=[None] * ranks, config={**vars(T.parse_args(["--max_steps", "4", "--stage", "rl"])), **config})


def resume(*flags, world=1, **saved):
    from training.checkpoint import check_resume
    args = T.parse_args(["--max_steps", "4", "--stage", "rl", "--resume", *flags])
    return check_resume(args, saved_state(**saved), world)


@pytest.mark.parametrize("ckpt, started, given, allowed", [
    ("sft", "sft", "sft", True), ("sft", "sft", "both", True), ("sft", "both", "both", True), ("sft", "both", "sft", True),
    ("sft", "both", "rl", False),                  # RL would start from --model, dropping the warm-up
    ("rl", "rl", "rl", True), ("rl", "both", "both", True),
    ("rl", "both", "sft", False),                  # nothing would train and final/ would be rewritten
    ("rl", "rl", "sft", False), ("rl", "both", "rl", False), ("rl", "rl", "both", False),
])
def test_resume_continues_only_the_stage_the_checkpoint_is_of(ckpt, started, given, allowed):
    if allowed:
        resume("--stage", given, ckpt=ckpt, stage=started)
        return
    with pytest.raises(SystemExit, match=f"holds the {ckpt} stage of a --stage {started} run; --stage {given} would not"):
        resume("--stage", given, ckpt=ckpt, stage=started)


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.5"], "--lr is 0.5 (checkpoint: 5e-05)"), (["--seed", "1"], "--seed is 1 (checkpoint: 0)"),
    (["--data", "other.jsonl"], "--data is 'other.jsonl' (checkpoint: 'toy')"),
    (["--num_generations", "8"], "--num_generations is 8"), (["--reward", "outcome"], "--reward is 'outcome'"),
    (["--reward_impl", "official"], "--reward_impl is"), (["--beta", "0"], "--beta is 0.0 (checkpoint: 0.04)"),
    (["--model", "tiny-qwen3-vl"], "--model is 'tiny-qwen3-vl' (checkpoint: 'tiny')"),
])
def test_resume_refuses_a_flag_that_changes_the_run_naming_both_values(flags, named):
    with pytest.raises(SystemExit) as err:
        resume(*flags)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_flag_the_table_does_not_list_may_not_change_on_resume():
    """A flag added later (here one the checkpoint's config has and parse_args does not know) is fixed by default."""
    from training.checkpoint import MAY_CHANGE, check_resume
    args = T.parse_args(["--max_steps", "4", "--stage", "rl", "--resume"])
    args.lora_rank = 8
    assert "lora_rank" not in MAY_CHANGE
    with pytest.raises(SystemExit, match=r"--lora_rank is 8 \(checkpoint: 0\)"):
        check_resume(args, saved_state(lora_rank=0), 1)


def test_resume_applies_and_names_the_flags_that_may_change():
    lines = resume("--max_steps", "6", "--eval_every", "2", "--save_every", "3", "--micro_batch", "2")
    was = T.parse_args(["--stage", "rl"])
    assert lines == [f"--resume: --eval_every {was.eval_every} -> 2", "--resume: --max_steps 4 -> 6",
                     f"--resume: --micro_batch {was.micro_batch} -> 2", f"--resume: --save_every {was.save_every} -> 3"]


@pytest.mark.parametrize("prompts, accum, world, ok", [(4, 1, 2, True), (8, 1, 1, True), (2, 2, 2, True),
                                                       (4, 1, 1, False), (4, 2, 2, False)])
def test_resume_may_spread_the_batch_over_other_ranks_but_keeps_the_global_batch(prompts, accum, world, ok):
    flags = ["--prompts_per_step", str(prompts), "--grad_accum", str(accum)]
    saved = dict(ranks=2, prompts_per_step=4, grad_accum=1)         # 8 prompts a step
    if ok:
        resume(*flags, world=world, **saved)
    else:
        with pytest.raises(SystemExit, match=r"must keep the global batch .* the checkpoint's is 8 on 2 rank\(s\)"):
            resume(*flags, world=world, **saved)


def test_resume_refuses_fewer_steps_than_the_checkpoint_has():
    with pytest.raises(SystemExit, match="--max_steps 4 is below the checkpoint's step 6: give at least 6"):
        resume(step=6)


TINY_RL = ["--model", "tiny", "--stage", "rl", "--data", "toy", "--prompts_per_step", "1", "--grad_accum", "1",
           "--num_generations", "2", "--max_new_tokens", "4", "--micro_batch", "2", "--eval_n", "0", "--save_every", "1"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 2-step RL run of the tiny model: a checkpoint at step 2, final/, metrics and rollouts."""
    out = tmp_path_factory.mktemp("saved") / "run"
    T.main(["--out_dir", str(out), *TINY_RL, "--max_steps", "2", "--log_rollouts_every", "1"])
    return out


def copy_of(run, tmp_path):
    import shutil
    return shutil.copytree(run, tmp_path / "run")


def md5(path):
    import hashlib
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("flags, message", [
    (["--stage", "sft"], "--stage sft would not continue it (nothing would train and final/ would be rewritten)"),
    (["--model", "tiny-qwen3-vl"], "--model is 'tiny-qwen3-vl' (checkpoint: 'tiny')"),
])
def test_a_refused_resume_leaves_the_checkpoint_and_final_model_as_they_were(saved_run, flags, message):
    before = md5(saved_run / "final" / "model.safetensors"), md5(saved_run / "checkpoint" / "ckpt.pt")
    with pytest.raises(SystemExit) as err:
        T.main(["--out_dir", str(saved_run), *TINY_RL, "--max_steps", "2", "--resume", *flags])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert (md5(saved_run / "final" / "model.safetensors"), md5(saved_run / "checkpoint" / "ckpt.pt")) == before


@pytest.mark.parametrize("size", [0, 1000], ids=["empty", "cut-short"])
def test_a_damaged_checkpoint_stops_resume_and_a_fresh_run_with_one_line_and_overwrite_replaces_it(saved_run, tmp_path, size):
    out = copy_of(saved_run, tmp_path)
    ckpt = out / "checkpoint" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:size])
    for extra in (["--resume"], []):
        with pytest.raises(SystemExit) as err:
            T.main(["--out_dir", str(out), *TINY_RL, "--max_steps", "1", *extra])
        assert f"checkpoint {ckpt} is damaged" in str(err.value) and "--overwrite" in str(err.value)
        assert "\n" not in str(err.value)
    T.main(["--out_dir", str(out), *TINY_RL, "--max_steps", "1", "--overwrite"])
    assert checkpoint.read(str(ckpt))["step"] == 1


def test_resume_drops_a_torn_last_log_line_and_the_metrics_run_on(saved_run, tmp_path, capsys):
    out = copy_of(saved_run, tmp_path)
    for name in ("metrics.jsonl", "rollouts.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"stage": "rl", "step": 3, "rew')              # killed mid-write
    T.main(["--out_dir", str(out), *TINY_RL, "--max_steps", "3", "--log_rollouts_every", "1", "--resume"])
    printed = capsys.readouterr().out
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in printed and "rollouts.jsonl: dropped 1" in printed
    assert "--resume: --max_steps 2 -> 3" in printed
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert sorted({json.loads(line)["step"] for line in open(out / "rollouts.jsonl")}) == [1, 2, 3]


def test_a_second_run_into_a_locked_out_dir_stops_with_one_line(saved_run, tmp_path):
    import fcntl
    out = copy_of(saved_run, tmp_path)
    with open(out / "run.lock", "w") as held:                     # as another process running there holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        with pytest.raises(SystemExit) as err:
            T.main(["--out_dir", str(out), *TINY_RL, "--max_steps", "3", "--resume"])
    assert str(err.value) == f"error: another run (pid 4242) is writing to {out}: wait for it to end, or use another --out_dir"
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_an_out_dir_that_cannot_be_written_stops_before_the_model_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(T, "load_model", lambda *a: pytest.fail("the model was loaded"))
    monkeypatch.setattr("training.setup.load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"^error: cannot write to --out_dir .*file/out: Not a directory$"):
        T.main(["--out_dir", str(tmp_path / "file" / "out"), *TINY_RL, "--max_steps", "1"])


def test_a_failed_save_removes_its_partial_file_names_the_last_good_checkpoint_and_stops(tmp_path, monkeypatch):
    import errno
    real, calls = torch.save, []

    def disk_full_on_second_save(obj, path):
        calls.append(path)
        if len(calls) == 1:
            return real(obj, path)
        open(path, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        T.main(["--out_dir", str(out), *TINY_RL, "--max_steps", "3"])
    ckpt = out / "checkpoint" / "ckpt.pt"
    assert str(err.value) == (f"error: cannot save the rl checkpoint of step 2 (no space left on device); "
                              f"the last good checkpoint (rl, step 1) is {ckpt}: free space, then continue with --resume")
    assert os.listdir(out / "checkpoint") == ["ckpt.pt"] and checkpoint.read(str(ckpt))["step"] == 1
    assert not (out / "final").exists()


def test_fsdp_rl_rank_with_every_prompt_skipped_runs_a_placeholder_and_every_skip_is_counted(tmp_path):
    """Two records with images, one of them a JPEG cut short (its header passes the loader), one record whose image
    is missing: at each of the 2 steps one rank gets only the cut JPEG and runs weight-0 rows in lockstep. The
    summary counts the cut JPEG once (a record, not each time a rank met it) and the load-time skip by reason."""
    bad_image_sft_file(tmp_path)
    rows = [{"image_path": name, "problem": "What colour?", "solution": "### The final answer is: red",
             "key_steps": {"Steps": [["red"]]}} for name in ("good.png", "cut.jpg", "gone.png")]
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = torchrun(os.path.join(ROOT, "train.py"), "--out_dir", str(tmp_path / "out"), "--data", str(tmp_path / "rl.jsonl"),
                   *TINY_RL[:4], *TINY_RL[6:], "--max_steps", "2", "--fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["skipped"]["bad_image"] == 1 and summary["skipped"]["rl_data"] == {"missing image": 1}
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2]


def test_records_with_several_images_train_both_stages_and_show_in_the_viewer(tmp_path):
    """Two RL records of two images each, their tags placed in the question: the warm-up (the solution as the
    response) and StepGRPO train on them with the tiny model, and the viewer shows both images of a prompt."""
    from PIL import Image
    from scripts import viewer
    for name, colour in (("left.png", "red"), ("right.png", "blue")):
        Image.new("RGB", (56, 56), colour).save(tmp_path / name)
    rows = [{"image_path": ["left.png", "right.png"], "problem": f"Left: <image> right: <image> {q}",
             "solution": "### Step 1:\nred and blue\n### The final answer is: red", "key_steps": {"Steps": [["red"]]}}
            for q in ("Which is red?", "Which colour is on the left?")]
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    T.main(["--out_dir", str(out), "--model", "tiny", "--stage", "both", "--data", str(tmp_path / "rl.jsonl"),
            "--sft_steps", "1", "--sft_batch", "2", "--max_steps", "1", "--num_generations", "2", "--max_new_tokens", "4",
            "--micro_batch", "2", "--eval_n", "0", "--log_rollouts_every", "1"])
    assert [r["stage"] for r in (json.loads(l) for l in open(out / "metrics.jsonl"))].count("sft") == 1
    assert len(metrics(out)) == 1
    rollout = json.loads(open(out / "rollouts.jsonl").readline())
    assert rollout["image"] == [str(tmp_path / "left.png"), str(tmp_path / "right.png")]
    page = viewer.run_page(out)
    assert f'title="{tmp_path / "left.png"}"' in page and f'title="{tmp_path / "right.png"}"' in page


def test_the_options_beside_the_paper_train_log_and_resume_exactly(warm, tmp_path):
    """Dynamic sampling (its extra prompts drawn by step), per-reward advantages, per-step credit and clip-higher
    together: a resumed run equals an uninterrupted one, and the step logs what dynamic sampling did."""
    flags = ["--model", str(warm / "final"), *RL, "--max_steps", "2", "--save_every", "1", "--dynamic_sampling",
             "--max_extra_batches", "2", "--adv_scale", "per_reward", "--step_credit", "0.5", "--ppo_epochs", "2",
             "--clip_eps_high", "0.28", "--temperature", "1.2"]
    train(tmp_path / "full", *flags)
    train(tmp_path / "split", *flags, "--stop_after", "1")
    train(tmp_path / "split", *flags, "--resume")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds", "tokens_per_s")}
    full = metrics(tmp_path / "full")
    assert [drop(r) for r in full] == [drop(r) for r in metrics(tmp_path / "split")]
    assert sum(r["ds_prompts_drawn"] for r in full) > 0 and sum(r["ds_groups_dropped"] for r in full) > 0
    assert all(r["frac_reward_zero_std"] < 1 and r["entropy"] > 0 for r in full)
    assert any(r["clip_low_frac"] + r["clip_high_frac"] > 0 for r in full)
