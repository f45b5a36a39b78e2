"""scripts/ablation.py: the reward ablation of R1-VL (Table 2, Figure 3) replayed on the toy task, in two regimes.

    python -m scripts.ablation                        # dense: the default toy task; 5 arms x 3 seeds, 2 runs at a time
    python -m scripts.ablation --regime sparse        # sparse: few sampled answers right, the paper's motivating case
    python -m scripts.ablation --warmup out/warmup --steps 100 --seeds 0 1 --out_dir out/ablation

From one warm-up (`train.py --stage sft`, or --warmup DIR), every arm trains for the same number of steps
with 32 sequences per step, then is evaluated greedily on one held-out set:
    outcome   GRPO with answer correctness only (the paper's outcome-reward baseline)
    steprar   StepRAR only (Eq. 2)           steprvr   StepRVR only (Eq. 3)
    step      StepRAR + StepRVR (StepGRPO)   sft       continued SFT on the warm-up's paths (control)
RL arms run `train.py --stage rl --reward ARM` with the toy preset (8 prompts x 4 samples, lr, β); the SFT
arm runs `train.py --stage sft --sft_steps N` (batch 32) at `--sft_lr`: a small rate, as restarting at the
warm-up's peak rate (2e-3) throws away what the warm-up learnt. Every model, the warm-up included, is scored
by `evaluate.py --bench toy` on the same held-out questions (accuracy, format validity = mean StepRVR).

Regimes (the flags each adds to every run):
    dense   the default task: level 2, a teacher who slips in half of its paths. The warm-up's sampled
            answers are right about half the time, so the outcome reward already separates most groups.
    sparse  level 4 (five steps: three counts, two sums), a teacher who always slips, and RL sampling at the
            paper's temperature 1.2 (the toy preset samples at 1.0): the warm-up's sampled answers are
            rarely right, so most outcome-reward groups are all-wrong (zero std, no gradient), while its
            samples differ in which counts they get right, which StepRAR's α·k can tell apart.
Before training, `probe` measures that on the warm-up's own samples (step 0): the share of groups with zero
reward std under each reward kind, sampled accuracy, and the key-step match of the wrong answers.
During training each run is scored on --curve_n held-out questions every --eval_every steps (train.py
--eval_every), giving accuracy-vs-step curves and the steps each arm needs to reach the warm-up + 5 points.

Finished runs are reused, so an interrupted ablation continues where it stopped; the settings are pinned to
the folder, so runs made otherwise are never mixed in. `--jobs N` runs N trainings at once with cores/N
threads each. Writes <out_dir>/results.json and <out_dir>/ablation.png (or --plot), prints a markdown table.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys

from training import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: train.py, evaluate.py
ARMS = ["outcome", "steprar", "steprvr", "step", "sft"]
KINDS = ["outcome", "steprar", "steprvr", "step"]
LABELS = {"warmup": "warm-up only", "outcome": "+ outcome reward (GRPO)", "steprar": "+ StepRAR",
          "steprvr": "+ StepRVR", "step": "+ StepRAR + StepRVR (StepGRPO)", "sft": "+ continued SFT (control)"}
REGIMES = {"dense": [], "sparse": ["--difficulty", "4", "--teacher_noise", "1.0", "--temperature", "1.2"]}


def run(cmd, log):
    """Run a command from the repo root, its output to `log`; fail loudly with the log's tail."""
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n" + "".join(open(log).readlines()[-20:]))


def train(out, *flags):
    """train.py into `out` unless it already finished there; returns the trained model's folder."""
    final = os.path.join(out, "final")
    if not os.path.exists(os.path.join(final, "config.json")):
        os.makedirs(out, exist_ok=True)
        run([sys.executable, "train.py", "--data", "toy", "--out_dir", out, "--overwrite", *flags],
            os.path.join(out, "train.log"))
    return final


def evaluate(model, name, args):
    """(accuracy %, format validity %) of `model` on the first `eval_n` held-out toy questions."""
    out = os.path.join(args.out_dir, "eval", f"{name}.jsonl")
    summary = out.replace(".jsonl", ".summary.json")
    if not os.path.exists(summary):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run([sys.executable, "evaluate.py", "--bench", "toy", "--model", model, "--limit", str(args.eval_n),
             "--difficulty", level(args), "--batch_size", "32", "--max_new_tokens", str(args.max_new_tokens),
             "--out", out, "--overwrite"], out.replace(".jsonl", ".log"))
    m = json.load(open(summary))["metrics"]
    return 100 * m["accuracy"], 100 * m["format_valid"]


def level(args):
    flags = REGIMES[args.regime]
    return flags[flags.index("--difficulty") + 1] if "--difficulty" in flags else "2"


def probe(warm, args):
    """The warm-up's own samples at RL step 0 (M = 4 for `prompts` training questions): sampled accuracy, the
    share of groups whose rewards are all equal under each reward kind, and the mean key-step match of the
    samples whose answer is wrong."""
    import torch
    import rewards
    import train as T
    from stepgrpo import group_advantages
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    out, prompts = os.path.join(args.out_dir, "probe"), args.probe_n
    r = T.setup(T.parse_args(["--model", warm, "--stage", "rl", "--data", "toy", "--out_dir", out, "--overwrite",
                              "--prompts_per_step", str(prompts), "--grad_accum", "1", *REGIMES[args.regime]]))
    batch = T.collect(r, 0)
    texts, m = batch.rollout.texts, r.args.num_generations
    zero = {kind: group_advantages(torch.tensor([rewards.reward(t, s, kind=kind)["total"]
                                                 for t, s in zip(texts, batch.samples)]), m)[1] for kind in KINDS}
    wrong = [x["k"] for x in batch.rewards if not x["correct"]]
    return dict(sampled_accuracy=statistics.mean(float(x["correct"]) for x in batch.rewards),
                frac_reward_zero_std=zero, key_step_match_wrong=statistics.mean(wrong) if wrong else None,
                prompts=prompts, samples=len(texts))


def curves(out):
    """From a run's metrics.jsonl: held-out accuracy by step (RL "eval" rows, SFT "eval_sft" rows), the share of
    zero-std groups and the sampled key-step match by step (RL only)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    stage = "eval_sft" if any(r["stage"] == "sft" for r in rows) else "eval"
    acc = sorted({r["step"]: 100 * r["accuracy"] for r in rows if r["stage"] == stage}.items())
    rl = [r for r in rows if r["stage"] == "rl"]
    return dict(accuracy=acc, zero_std=[(r["step"], r["frac_reward_zero_std"]) for r in rl],
                key_step_match=[(r["step"], r["key_step_match"]) for r in rl])


def steps_to_gain(curve, gain=5.0):
    """First step at which held-out accuracy is `gain` points above the curve's start, or None."""
    return next((s for s, a in curve if s and a >= curve[0][1] + gain), None) if curve else None


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def mean_of(values):
    """Mean of the values that are not None, or None."""
    xs = [x for x in values if x is not None]
    return statistics.mean(xs) if xs else None


def plot(results, path):
    """Final accuracy per arm (mean ± std, dots = seeds); held-out accuracy vs step; zero-std share vs step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["arm"] for r in results))
    by = {n: [r for r in results if r["arm"] == n] for n in names}
    has_curves = any(r.get("curves", {}).get("accuracy") for r in results)
    fig, axes = plt.subplots(1, 3 if has_curves else 1, figsize=(15 if has_curves else 8, 4.4), squeeze=False)
    ax = axes[0][0]
    stats = [mean_std([r["accuracy"] for r in by[n]]) for n in names]
    ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
           color=["grey"] + ["tab:blue"] * (len(names) - 2) + ["tab:orange"])
    for i, n in enumerate(names):
        ax.plot([i] * len(by[n]), [r["accuracy"] for r in by[n]], "k.", ms=4)
    ax.set_xticks(range(len(names)), [LABELS[n].replace(" (", "\n(") for n in names], fontsize=7, rotation=25, ha="right")
    accs = [r["accuracy"] for r in results]
    ax.set_ylim(max(0, min(accs) - 10), min(100, max(accs) + 5))
    ax.set_ylabel("held-out accuracy (%)"), ax.set_title("final accuracy: mean ± std, dots = seeds", fontsize=9)
    if has_curves:
        for n in names[1:]:
            runs = [r["curves"] for r in by[n]]
            for key, axis in (("accuracy", axes[0][1]), ("zero_std", axes[0][2])):
                pts = [dict(c[key]) for c in runs if c[key]]
                steps = sorted(set.intersection(*(set(p) for p in pts))) if pts else []
                if key == "zero_std" and steps:        # 10-step means: one step sees only 8 groups
                    steps = steps[9::10]
                    pts = [{s: statistics.mean(p[t] for t in range(s - 9, s + 1) if t in p) for s in steps} for p in pts]
                if steps:
                    axis.plot(steps, [statistics.mean(p[s] for p in pts) for s in steps], label=LABELS[n], marker=".")
        axes[0][1].set_title("held-out accuracy vs step (mean over seeds)", fontsize=9)
        axes[0][2].set_title("share of groups with identical rewards (10-step means)", fontsize=9)
        for axis in axes[0][1:]:
            axis.set_xlabel("step"), axis.legend(fontsize=6, loc="best", framealpha=0.6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def check(p, a):
    """The settings that would crash a run or train nothing, refused in one line (exit 2)."""
    for name in ("steps", "jobs", "eval_n", "curve_n", "max_new_tokens", "probe_n"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1 (got {getattr(a, name)})")
    if a.eval_every < 0:
        p.error(f"--eval_every must be 0 (no curves) or more (got {a.eval_every})")
    if not a.sft_lr > 0:
        p.error(f"--sft_lr must be above 0 (got {a.sft_lr})")
    if a.teacher_noise is not None and not 0 <= a.teacher_noise <= 1:
        p.error(f"--teacher_noise is a share of the warm-up paths: it must be in [0, 1] (got {a.teacher_noise})")
    if len(set(a.seeds)) < len(a.seeds):
        p.error(f"--seeds repeats a seed (got {a.seeds}): each run would be done twice")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.ShowDefaults)
    p.add_argument("--regime", default="dense", choices=sorted(REGIMES), help="the toy task's reward density")
    p.add_argument("--warmup", help="warm-up model folder (default: run train.py --stage sft once)")
    p.add_argument("--out_dir", default=None, help="runs, evaluations, results.json (default out/ablation-<regime>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per arm and seed")
    p.add_argument("--steps", type=int, default=150, help="RL steps, and continued-SFT steps, per run")
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS, help="arms to run")
    p.add_argument("--reward_impl", default="paper", choices=["paper", "official"], help="train.py --reward_impl")
    p.add_argument("--sft_lr", type=float, default=5e-5, help="peak lr of the continued-SFT arm")
    p.add_argument("--teacher_noise", type=float, help="the warm-up's and SFT arm's paths miscount (default: regime's)")
    p.add_argument("--jobs", type=int, default=2, help="trainings run at once")
    p.add_argument("--eval_n", type=int, default=400, help="held-out questions of the final score (greedy)")
    p.add_argument("--eval_every", type=int, default=30, help="steps between points of the accuracy curves; 0: none")
    p.add_argument("--curve_n", type=int, default=200, help="held-out questions per curve point")
    p.add_argument("--max_new_tokens", type=int, default=160, help="generation budget of the evaluation")
    p.add_argument("--probe_n", type=int, default=64, help="training questions sampled (x4) from the warm-up at step 0")
    p.add_argument("--plot", help="chart path (default: <out_dir>/ablation.png)")
    args = p.parse_args()
    check(p, args)
    args.out_dir = os.path.abspath(args.out_dir or os.path.join("out", f"ablation-{args.regime}"))
    args.plot = args.plot or os.path.join(args.out_dir, "ablation.png")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))  # runs inherit it
    # Finished runs are reused, so they must come from the same settings: pin them to the folder.
    setup = dict(regime=args.regime, warmup=args.warmup and os.path.abspath(args.warmup), steps=args.steps,
                 sft_lr=args.sft_lr, eval_n=args.eval_n, max_new_tokens=args.max_new_tokens,
                 teacher_noise=args.teacher_noise, reward_impl=args.reward_impl, eval_every=args.eval_every,
                 curve_n=args.curve_n)
    regime = REGIMES[args.regime] + ([] if args.teacher_noise is None else ["--teacher_noise", str(args.teacher_noise)])
    curve = ["--eval_every", str(args.eval_every), "--eval_n", str(args.curve_n)] if args.eval_every else ["--eval_n", "0"]
    pinned = os.path.join(args.out_dir, "setup.json")
    if os.path.exists(pinned) and json.load(open(pinned)) != setup:
        sys.exit(f"{args.out_dir} holds runs made with {json.load(open(pinned))}, not {setup}: use another --out_dir")
    os.makedirs(args.out_dir, exist_ok=True)
    json.dump(setup, open(pinned, "w"))
    warm = os.path.abspath(args.warmup) if args.warmup else train(os.path.join(args.out_dir, "warmup"), "--stage", "sft",
                                                                    "--eval_n", "0", *regime)
    step0 = probe(warm, args)
    print(f"step 0 ({args.regime}): sampled accuracy {step0['sampled_accuracy']:.3f}; groups with zero reward std: "
          + ", ".join(f"{k} {v:.2f}" for k, v in step0["frac_reward_zero_std"].items())
          + f"; key-step match of wrong answers {step0['key_step_match_wrong']}", flush=True)
    results = [dict(arm="warmup", seed=None, steps=0, **dict(zip(("accuracy", "format"), evaluate(warm, "warmup", args))))]

    def arm_run(arm, seed):
        out = os.path.join(args.out_dir, f"{arm}_seed{seed}")
        if arm == "sft":
            model = train(out, "--model", warm, "--stage", "sft", "--sft_steps", str(args.steps), "--seed", str(seed),
                          "--sft_lr", str(args.sft_lr), *regime, *curve)
        else:
            model = train(out, "--model", warm, "--stage", "rl", "--reward", arm, "--max_steps", str(args.steps),
                          "--seed", str(seed), "--reward_impl", args.reward_impl, *regime, *curve)
        acc, fmt = evaluate(model, f"{arm}_seed{seed}", args)
        print(f"{arm:8s} seed {seed}: accuracy {acc:.1f} %, format {fmt:.1f} %", flush=True)
        return dict(arm=arm, seed=seed, steps=args.steps, accuracy=acc, format=fmt, curves=curves(out))

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on subprocesses
        results += list(pool.map(lambda a_s: arm_run(*a_s), [(a, s) for s in args.seeds for a in args.arms]))
    json.dump(dict(setup, warmup=warm, seeds=args.seeds, step0=step0, runs=results),
              open(os.path.join(args.out_dir, "results.json"), "w"), indent=1)

    print(f"\nHeld-out toy accuracy ({args.regime} regime), {args.eval_n} questions, greedy; {args.steps} steps per arm, "
          f"seeds {args.seeds}\n")
    print("| arm | accuracy % (mean ± std) | Δ vs warm-up | format valid % | steps to warm-up + 5 | zero-std groups "
          "| key-step match, first → last 10 steps | seeds |\n|---|---|---|---|---|---|---|---|")
    base = results[0]["accuracy"]
    for name in ["warmup", *args.arms]:
        rs = [r for r in results if r["arm"] == name]
        m, s = mean_std([r["accuracy"] for r in rs])
        cv = [r.get("curves", {}) for r in rs]
        reach = [steps_to_gain(c.get("accuracy")) for c in cv]
        reached = f"{mean_of(reach):.0f} ({sum(x is not None for x in reach)}/{len(reach)} seeds)" if any(reach) else "–"
        zero = mean_of([statistics.mean(v for _, v in c["zero_std"]) for c in cv if c.get("zero_std")])
        ksm = [c["key_step_match"] for c in cv if c.get("key_step_match")]
        first_last = (f"{statistics.mean(statistics.mean(v for _, v in k[:10]) for k in ksm):.2f} → "
                      f"{statistics.mean(statistics.mean(v for _, v in k[-10:]) for k in ksm):.2f}") if ksm else "–"
        print(f"| {LABELS[name]} | {m:.1f} ± {s:.1f} | {m - base:+.1f} | {statistics.mean(r['format'] for r in rs):.1f} "
              f"| {reached if name != 'warmup' else '–'} | {f'{zero:.2f}' if zero is not None else '–'} | {first_last} "
              f"| {', '.join(format(r['accuracy'], '.1f') for r in rs)} |")
    plot(results, args.plot)
    print(f"\nresults: {os.path.join(args.out_dir, 'results.json')}; chart: {args.plot}")


if __name__ == "__main__":
    main()
