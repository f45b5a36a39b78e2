"""ablation.py: the reward ablation of R1-VL (Table 2, Figure 3) replayed on the toy task.

    python ablation.py                      # warm-up once, then 5 arms x 3 seeds, 2 runs at a time (~30 min, 2 cores)
    python ablation.py --warmup out/warmup --steps 100 --seeds 0 1 --out_dir out/ablation

From one warm-up checkpoint (`train.py --stage sft`, or --warmup DIR), every arm trains for the same
number of steps with 32 sequences per step, then is evaluated greedily on one held-out set:
    outcome   GRPO with answer correctness only (the paper's outcome-reward baseline)
    steprar   StepRAR only (Eq. 2)           steprvr   StepRVR only (Eq. 3)
    step      StepRAR + StepRVR (StepGRPO)   sft       continued SFT on the warm-up's paths (control)
RL arms run `train.py --stage rl --reward ARM` with the toy preset (8 prompts x 4 samples, lr, β);
the SFT arm runs `train.py --stage sft --sft_steps N` (batch 32) at `--sft_lr`: a small rate, as
restarting at the warm-up's peak rate (2e-3) throws away what the warm-up learnt. Every model, the
warm-up included, is scored by `evaluate.py --bench toy` on the same held-out questions (accuracy,
format validity = mean StepRVR). Finished runs are reused, so an interrupted ablation continues
where it stopped; the settings are pinned to the folder, so runs made otherwise are never mixed in.
`--jobs N` runs N trainings at once with cores/N threads each (one core per run is faster in total
than two runs fighting over both). Writes <out_dir>/results.json, prints a markdown table (mean ±
std over seeds) and saves assets/ablation.png.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
ARMS = ["outcome", "steprar", "steprvr", "step", "sft"]
LABELS = {"warmup": "warm-up only", "outcome": "+ outcome reward (GRPO)", "steprar": "+ StepRAR",
          "steprvr": "+ StepRVR", "step": "+ StepRAR + StepRVR (StepGRPO)", "sft": "+ continued SFT (control)"}


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
        run([sys.executable, "train.py", "--data", "toy", "--eval_n", "0", "--out_dir", out, *flags],
            os.path.join(out, "train.log"))
    return final


def evaluate(model, name, args):
    """(accuracy %, format validity %) of `model` on the first `eval_n` held-out toy questions."""
    out = os.path.join(args.out_dir, "eval", f"{name}.jsonl")
    summary = out.replace(".jsonl", ".summary.json")
    if not os.path.exists(summary):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run([sys.executable, "evaluate.py", "--bench", "toy", "--model", model, "--limit", str(args.eval_n),
             "--batch_size", "32", "--max_new_tokens", str(args.max_new_tokens), "--out", out],
            out.replace(".jsonl", ".log"))
    m = json.load(open(summary))["metrics"]
    return m["accuracy"], m["format_validity"]


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rows)
    stats = [mean_std(rows[n]) for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
           color=["grey"] + ["tab:blue"] * (len(names) - 2) + ["tab:orange"])
    for i, n in enumerate(names):                                    # every seed, as a dot
        ax.plot([i] * len(rows[n]), rows[n], "k.", ms=4)
    ax.set_xticks(range(len(names)), [LABELS[n].replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("held-out accuracy (%)")
    lo = min(min(v) for v in rows.values())
    ax.set_ylim(max(0, lo - 10), min(100, max(max(v) for v in rows.values()) + 5))
    ax.set_title("Toy-task reward ablation: mean ± std over seeds, dots = seeds", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", help="warm-up model folder (default: run train.py --stage sft once)")
    p.add_argument("--out_dir", default="out/ablation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150, help="RL steps, and continued-SFT steps, per run")
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--sft_lr", type=float, default=5e-5, help="peak lr of the continued-SFT arm")
    p.add_argument("--teacher_noise", type=float, help="the warm-up's and SFT arm's paths miscount (default: train.py's)")
    p.add_argument("--jobs", type=int, default=2, help="trainings run at once")
    p.add_argument("--eval_n", type=int, default=400, help="held-out questions (greedy)")
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--plot", default=os.path.join(ROOT, "assets", "ablation.png"))
    args = p.parse_args()
    args.out_dir = os.path.abspath(args.out_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))  # runs inherit it
    # Finished runs are reused, so they must come from the same settings: pin them to the folder.
    setup = dict(warmup=args.warmup and os.path.abspath(args.warmup), steps=args.steps, sft_lr=args.sft_lr,
                 eval_n=args.eval_n, max_new_tokens=args.max_new_tokens, teacher_noise=args.teacher_noise)
    noise = [] if args.teacher_noise is None else ["--teacher_noise", str(args.teacher_noise)]
    pinned = os.path.join(args.out_dir, "setup.json")
    if os.path.exists(pinned) and json.load(open(pinned)) != setup:
        sys.exit(f"{args.out_dir} holds runs made with {json.load(open(pinned))}, not {setup}: use another --out_dir")
    os.makedirs(args.out_dir, exist_ok=True)
    json.dump(setup, open(pinned, "w"))
    warm = os.path.abspath(args.warmup) if args.warmup else train(os.path.join(args.out_dir, "warmup"), "--stage", "sft", *noise)
    results = [dict(arm="warmup", seed=None, steps=0, **dict(zip(("accuracy", "format"), evaluate(warm, "warmup", args))))]

    def arm_run(arm, seed):
        out = os.path.join(args.out_dir, f"{arm}_seed{seed}")
        if arm == "sft":
            model = train(out, "--model", warm, "--stage", "sft", "--sft_steps", str(args.steps), "--seed", str(seed),
                          "--sft_lr", str(args.sft_lr), *noise)
        else:
            model = train(out, "--model", warm, "--stage", "rl", "--reward", arm, "--max_steps", str(args.steps),
                          "--seed", str(seed))
        acc, fmt = evaluate(model, f"{arm}_seed{seed}", args)
        print(f"{arm:8s} seed {seed}: accuracy {acc:.1f} %, format {fmt:.1f} %", flush=True)
        return dict(arm=arm, seed=seed, steps=args.steps, accuracy=acc, format=fmt)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on subprocesses
        results += list(pool.map(lambda a_s: arm_run(*a_s), [(a, s) for s in args.seeds for a in args.arms]))
    json.dump(dict(setup, warmup=warm, seeds=args.seeds, runs=results),
              open(os.path.join(args.out_dir, "results.json"), "w"), indent=1)

    per_arm = lambda key: {name: [r[key] for r in results if r["arm"] == name] for name in ["warmup", *args.arms]}
    rows, fmts = per_arm("accuracy"), per_arm("format")
    print(f"\nHeld-out toy accuracy, {args.eval_n} questions, greedy; {args.steps} steps per arm, seeds {args.seeds}\n")
    print("| arm | accuracy % (mean ± std) | Δ vs warm-up | format valid % | seeds |\n|---|---|---|---|---|")
    for name, accs in rows.items():
        m, s = mean_std(accs)
        print(f"| {LABELS[name]} | {m:.1f} ± {s:.1f} | {m - rows['warmup'][0]:+.1f} | {statistics.mean(fmts[name]):.1f} "
              f"| {', '.join(f'{a:.1f}' for a in accs)} |")
    plot(rows, args.plot)
    print(f"\nresults: {os.path.join(args.out_dir, 'results.json')}; chart: {args.plot}")


if __name__ == "__main__":
    main()
