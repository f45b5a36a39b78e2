"""training/logs.py: what a training run writes: metrics.jsonl, rollouts.jsonl, wandb, console lines, per-phase
timings, the JSON summary and training_curves.png."""
import contextlib
import json
import math
import os
import time

import torch
from tqdm import tqdm

import rewards
from training import checkpoint, parallel


class Log:
    """metrics.jsonl / rollouts.jsonl / wandb / console, written by rank 0 only."""

    def __init__(self, args, master):
        self.dir, self.master, self.wandb = args.out_dir, master, None
        self.rl_steps = self.rewardless = 0       # RL steps logged by this process, those where no sample scored
        if args.wandb and master:
            import wandb   # optional: checked at start-up, imported only when asked for
            self.wandb = wandb.init(project=args.wandb, config=vars(args))

    def write(self, name, record):
        """Append one JSON line. A write that fails (disk full) is undone, so no line is left cut short, and stops
        the run with one line naming the last good checkpoint."""
        if self.master:
            path, fd, end = os.path.join(self.dir, name), None, None
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                end = os.lseek(fd, 0, os.SEEK_END)
                append(fd, (json.dumps(finite(record)) + "\n").encode())
            except OSError as e:
                if end is not None:              # no line left cut short
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, end)
                ckpt = os.path.join(self.dir, "checkpoint", "ckpt.pt")
                raise SystemExit(f"error: cannot write {path} ({checkpoint.why(e, self.dir)}); "
                                 f"{checkpoint.last_good(ckpt)}: free space, then continue with --resume") from None
            finally:
                if fd is not None:
                    os.close(fd)
            if self.wandb and name == "metrics.jsonl":
                self.wandb.log(flat(record, record["stage"] + "/") if record["stage"].startswith("eval") else record)

    def print(self, message):
        if self.master:
            tqdm.write(message)      # above the progress bar, never glued onto it

    def finish(self):
        if self.wandb:
            self.wandb.finish()


def append(fd, data):
    """Write all of `data` to the file descriptor `fd` (os.write may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Timer(dict):
    """seconds[name] += wall time of each `with timer(name):` block (synchronised on CUDA)."""

    @contextlib.contextmanager
    def __call__(self, name):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t = time.perf_counter()
        yield
        sync()
        self[name] = self.get(name, 0.0) + time.perf_counter() - t


NO_REWARD_STEPS = 5   # the first RL steps of a run: if no sample of any earns a reward, say so


def log_rl_step(run, step, batch, result, seconds):
    """Write one RL step's metrics row (returned) and, every --log_rollouts_every steps, its completions. If no
    sample of the first NO_REWARD_STEPS steps earned anything, write that step's completions and say so."""
    record = rl_record(run, step, batch, result, seconds)
    run.log.write("metrics.jsonl", record)
    log = run.log
    log.rl_steps, log.rewardless = log.rl_steps + 1, log.rewardless + (record.get("reward") == 0)
    silent = log.rl_steps == NO_REWARD_STEPS and log.rewardless == NO_REWARD_STEPS
    if batch.rollout and (silent or run.args.log_rollouts_every and (step + 1) % run.args.log_rollouts_every == 0):
        for row in range(len(batch.rewards)):
            run.log.write("rollouts.jsonl", rollout_record(step, batch, row))
    if silent:
        log.print(f"no sample of the first {NO_REWARD_STEPS} RL steps earned any reward (no final answer, no valid "
                  f"format): nothing to learn from. Read the completions in {os.path.join(log.dir, 'rollouts.jsonl')}")
    return record


def rollout_record(step, batch, row):
    """One completion as the viewer (scripts/viewer.py) shows it: its prompt (the image by path), the reward's
    parts with the failed validity rule and where the matched key steps stand in the text, its advantage."""
    ro, sample, r, text = batch.rollout, batch.samples[row], batch.rewards[row], batch.rollout.texts[row]
    solution, image = sample.get("solution"), sample.get("image_path") or sample.get("image")
    gold = sample.get("answer") or (rewards.extract_answer(solution) if isinstance(solution, str) else None) or solution
    key_steps = sample.get("key_steps")
    return dict(step=step + 1, id=sample.get("id"), group=int(ro.group[row]), image=image if isinstance(image, (str, list)) else None,
                question=sample.get("problem"), gold=gold,
                key_steps=rewards.validate_key_steps(key_steps) if key_steps is not None else [], completion=text, **r,
                invalid=rewards.validity_failure(text), spans=rewards.key_step_spans(text, r.get("matched") or []),
                advantage=float(batch.advantages[row]), length=int(ro.completion_mask[row].sum()),
                truncated=bool(ro.truncated[row]))


def rl_record(run, step, batch, result, seconds):
    """One metrics row of an RL step: per-sample figures averaged over every rank's samples, per-micro-batch
    ones weighted by their rows, the sampling-vs-scoring mismatch as extremes over all ranks."""
    ro, micro = batch.rollout, result["micro"]
    by_rows = lambda key: [x[key] for x in micro for _ in range(x["rows"]) if x[key] == x[key]]   # NaN: no tokens
    lens = [float(x) for x in ro.completion_mask.sum(1)] if ro else []
    rs = batch.rewards
    per_sample = dict(reward=[r["total"] for r in rs], step_rar=[r["step_rar"] for r in rs],
                      step_rvr=[r["step_rvr"] for r in rs], accuracy=[float(r["correct"]) for r in rs],
                      key_step_match=[r["k"] for r in rs], completion_len=lens,
                      truncated=[float(x) for x in ro.truncated] if ro else [],
                      frac_reward_zero_std=[batch.frac_zero_std] if ro else [],
                      kl=by_rows("kl"), clip_frac=by_rows("clip_frac"), logp_diff_mean=by_rows("logp_diff_mean"),
                      **{k: by_rows(k) for k in ("clip_low_frac", "clip_high_frac", "entropy")})
    extremes = dict(logp_diff_max=by_rows("logp_diff_max"), sampler_ratio_max=by_rows("sampler_ratio_max"))
    lowest = dict(sampler_ratio_min=by_rows("sampler_ratio_min"))
    return dict(stage="rl", step=step + 1, **parallel.global_means(per_sample, run.device, run.ddp),
                **parallel.global_max(extremes, run.device, run.ddp),
                **{k: -v for k, v in parallel.global_max({k: [-x for x in v] for k, v in lowest.items()},
                                                         run.device, run.ddp).items()},
                **dynamic_counts(run, step, batch),
                loss=result["loss"], grad_norm=result["grad_norm"], seconds=seconds,
                tokens_per_s=sum(lens) * run.world / max(batch.seconds.get("generate", 0), 1e-9),
                **{f"time_{k}": v for k, v in batch.seconds.items()})


def dynamic_counts(run, step, batch):
    """--dynamic_sampling's counts of the step summed over ranks (training/dynamic.py), with one line when a rank
    could not fill its groups with mixed answers; {} without it."""
    if not run.args.dynamic_sampling:
        return {}
    names = ("groups_dropped", "prompts_drawn", "groups_unfilled")
    counts = dict(zip(names, parallel.all_reduce([batch.dynamic[k] for k in names], run.device, run.ddp).tolist()))
    if counts["groups_unfilled"]:
        run.log.print(f"step {step + 1}: dynamic sampling drew {counts['prompts_drawn']:.0f} extra prompts (--max_extra_batches "
                      f"{run.args.max_extra_batches}) and still trains {counts['groups_unfilled']:.0f} groups whose answers "
                      "are all right or all wrong")
    return {f"ds_{k}": int(v) for k, v in counts.items()}


def finite(record):
    """NaN and infinities become null, so every line is valid JSON."""
    if isinstance(record, dict):
        return {k: finite(v) for k, v in record.items()}
    return None if isinstance(record, float) and not math.isfinite(record) else record


def flat(record, prefix=""):
    """{"a": {"b": 1}} -> {"a/b": 1} (wandb draws scalars); held-out rows get their stage as a prefix."""
    out = {}
    for k, v in record.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def reward_summary(out_dir):
    """Mean reward of the first and last 10 RL steps (None where no step had a sample), the last SFT loss and
    the last held-out score of each stage (its headline metric, and its whole row), for the stages the run had."""
    rows, out = read(out_dir), {}
    rl = [r.get("reward") for r in rows if r["stage"] == "rl"]
    if rl:
        mean = lambda xs: sum(xs) / len(xs) if xs else None   # noqa: E731
        out.update(reward_first=mean([x for x in rl[:10] if x is not None]),
                   reward_last=mean([x for x in rl[-10:] if x is not None]))
    sft = [r["loss"] for r in rows if r["stage"] == "sft"]
    for stage, tag in (("eval_sft", "warmup"), ("eval", "rl")):   # the last held-out score of each stage
        held = max((r for r in rows if r["stage"] == stage), key=lambda r: r["step"], default=None)
        if held:
            out[f"{held['headline']}_{tag}"] = held[held["headline"]]
            out.update({f"format_{tag}": held["format_valid"]} if "format_valid" in held else {})
            out[f"heldout_{tag}"] = {k: v for k, v in held.items() if k != "stage"}
    return {**out, **({"sft_loss_last": sft[-1]} if sft else {})}


def plot_curves(out_dir):
    """metrics.jsonl → training_curves.png: the panels the run has data for (SFT loss; RL reward parts,
    accuracy, KL, completion length; the held-out score of each stage); faint lines every step, solid a trailing mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read(out_dir)
    panels = [("sft", ["loss"]), ("rl", ["reward", "step_rar", "step_rvr"]), ("rl", ["accuracy", "key_step_match"]),
              ("rl", ["kl"]), ("rl", ["completion_len"])]
    series = {(stage, k): [(r["step"], r[k]) for r in rows if r["stage"] == stage and r.get(k) is not None]
              for stage, keys in panels for k in keys}
    panels = [(stage, keys) for stage, keys in panels if any(series[stage, k] for k in keys)]
    held = [r for r in rows if r["stage"] in ("eval_sft", "eval")]
    if not panels and not held:
        return
    fig, axes = plt.subplots(1, len(panels) + bool(held), figsize=(4 * (len(panels) + bool(held)), 3.2), squeeze=False)
    for ax, (stage, keys) in zip(axes[0], panels):
        for k in keys:
            if not series[stage, k]:
                continue
            x, y = zip(*series[stage, k])
            w = max(1, min(10, len(y) // 5))           # short runs: a short window, still readable
            line, = ax.plot(x, y, lw=0.6, alpha=0.35)
            ax.plot(x[w - 1:], [sum(y[i + 1 - w:i + 1]) / w for i in range(w - 1, len(y))], color=line.get_color(), label=k)
        ax.set_title(f"{stage}: {', '.join(keys)}", fontsize=9), ax.set_xlabel("step"), ax.legend(fontsize=7)
    if held:                                   # each stage's held-out score against that stage's steps
        ax = axes[0][-1]
        for stage, label, style in (("eval_sft", "warm-up", "s--"), ("eval", "StepGRPO", "o-")):
            points = sorted((r["step"], r[r["headline"]]) for r in held if r["stage"] == stage)
            if points:
                ax.plot(*zip(*points), style, ms=4, label=label)
        ax.set_title(f"held-out {held[-1]['bench']}, greedy: {held[-1]['headline']}", fontsize=9)
        ax.set_xlabel("step of the stage"), ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(os.path.join(out_dir, "training_curves.png"), dpi=110)
    except OSError as e:           # a full disk: final/ and the logs are written, only the picture is missing
        tqdm.write(f"cannot write {os.path.join(out_dir, 'training_curves.png')} ({checkpoint.why(e, out_dir)})")
    finally:
        plt.close(fig)
