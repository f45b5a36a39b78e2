"""scripts/ablation.py: the reward ablation of R1-VL (Table 2, Figure 3) and a study of train.py's options, on the toy task.

    python -m scripts.ablation                        # dense: the default toy task; 5 arms x 3 seeds, 2 runs at a time
    python -m scripts.ablation --regime sparse        # sparse: few sampled answers right, the paper's motivating case
    python -m scripts.ablation --warmup out/warmup --steps 100 --seeds 0 1 --out_dir out/ablation
    python -m scripts.ablation --study --regime dense sparse late --warmup dense=DIR sparse=DIR late=DIR \
        --steps 100 --eval_every 0 --eval_n 300        # the options study: 6 arms x 3 regimes x 3 seeds

From one warm-up per regime (`train.py --stage sft`, or --warmup), every arm trains for the same number of steps
with 32 sequences per step, then is evaluated greedily on one held-out set. The reward ablation (the default arms):
    outcome   GRPO with answer correctness only (the paper's outcome-reward baseline)
    steprar   StepRAR only (Eq. 2)           steprvr   StepRVR only (Eq. 3)
    step      StepRAR + StepRVR (StepGRPO)   sft       continued SFT on the warm-up's paths (control)
The options study (--study): outcome and step, and one option of train.py each against sparse rewards:
    outcome_dynamic   outcome reward, --dynamic_sampling (DAPO: groups all right or all wrong are refilled)
    step_none         StepGRPO, --adv_scale none (Dr. GRPO: advantages mean-centred, not divided by the std)
    step_per_reward   StepGRPO, --adv_scale per_reward (GDPO: StepRAR and StepRVR z-scored apart, then summed)
    step_credit       StepGRPO, --step_credit W (extra credit on matched key steps' tokens; W: --step_credit)
RL arms run `train.py --stage rl` with their flags (ARMS) and the toy preset (8 prompts x 4 samples, lr, β); the
SFT arm runs `train.py --stage sft` (batch 32) at `--sft_lr`: a small rate, as restarting at the warm-up's peak
rate (2e-3) throws away what the warm-up learnt. Every model, the warm-up included, is scored by `evaluate.py
--bench toy` on the same questions: accuracy, format validity (mean StepRVR), mean key-step match (k of Eq. 2).

Regimes (the flags each adds to every run):
    dense   the default task: level 2, a teacher who slips in half of its paths. The warm-up's sampled
            answers are right about half the time, so the outcome reward already separates most groups.
    sparse  level 4 (five steps: three counts, two sums), a teacher who always slips, and RL sampling at the
            paper's temperature 1.2 (the toy preset samples at 1.0): the warm-up's sampled answers are
            rarely right, so most outcome-reward groups are all-wrong (zero std, no gradient), while its
            samples differ in which counts they get right, which StepRAR's α·k can tell apart.
    late    level 2 at T = 1.2, a teacher who slips in 3 of 4 paths and late (--teacher_slip late): it counts
            right and gets the last operation one off (A/B/C questions keep the truth). The warm-up gets the
            counts right more often than the answer: high k, sparser outcome reward. (At level 4 the tiny
            model miscounts the 3x3 grid whatever the teacher: key-step match 0.16 at step 0.)
Before training, `probe` measures that on the warm-up's own samples (step 0): the share of groups with zero
reward std under each reward kind, sampled accuracy, and the key-step match of the wrong answers. With
--eval_every, each run is scored on --curve_n held-out questions every so many steps (accuracy-vs-step curves,
steps to the warm-up + 5 points). Each run also records its share of zero-std groups over training (with dynamic
sampling: of the groups trained on, besides the groups dropped and extra prompts drawn) and its wall time.

All runs of all regimes share one pool of `--jobs` workers (warm-ups first), each with cores/N threads. Each
regime has its own folder (--out_dir; with several regimes DIR/<regime>): finished runs are reused, so an
interrupted ablation continues where it stopped; the settings are pinned to it, so runs made otherwise are never
mixed in. Per regime: <folder>/results.json, <folder>/ablation.png (or --plot) and a markdown table; with several
regimes, a last table of accuracy by arm and regime (scripts/ablation_report.py).
"""
import argparse
import concurrent.futures
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from scripts import ablation_report
from training import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: train.py, evaluate.py
RL = ["--stage", "rl", "--max_steps", "{steps}", "--reward_impl", "{reward_impl}"]
ARMS = {   # arm: (label, its train.py flags after the warm-up's model and the seed; "{x}" = this script's --x)
    "outcome": ("+ outcome reward (GRPO)", [*RL, "--reward", "outcome"]),
    "steprar": ("+ StepRAR", [*RL, "--reward", "steprar"]),
    "steprvr": ("+ StepRVR", [*RL, "--reward", "steprvr"]),
    "step": ("+ StepRAR + StepRVR (StepGRPO)", [*RL, "--reward", "step"]),
    "sft": ("+ continued SFT (control)", ["--stage", "sft", "--sft_steps", "{steps}", "--sft_lr", "{sft_lr}"]),
    "outcome_dynamic": ("+ outcome reward, dynamic sampling (DAPO)", [*RL, "--reward", "outcome", "--dynamic_sampling"]),
    "step_none": ("+ StepGRPO, mean-centred (Dr. GRPO)", [*RL, "--reward", "step", "--adv_scale", "none"]),
    "step_per_reward": ("+ StepGRPO, rewards z-scored apart (GDPO)", [*RL, "--reward", "step", "--adv_scale", "per_reward"]),
    "step_credit": ("+ StepGRPO, per-step credit", [*RL, "--reward", "step", "--step_credit", "{step_credit}"]),
}
REWARD_ARMS = ["outcome", "steprar", "steprvr", "step", "sft"]                     # the paper's Table 2
STUDY_ARMS = ["outcome", "outcome_dynamic", "step", "step_none", "step_per_reward", "step_credit"]   # --study
KINDS = ["outcome", "steprar", "steprvr", "step"]
LABELS = {"warmup": "warm-up only", **{arm: label for arm, (label, _) in ARMS.items()}}
REGIMES = {"dense": [], "sparse": ["--difficulty", "4", "--teacher_noise", "1.0", "--temperature", "1.2"],
           "late": ["--teacher_noise", "0.75", "--teacher_slip", "late", "--temperature", "1.2"]}
PROBE_LOCK = threading.Lock()   # probes run in this process, one at a time


def arm_flags(arm, args):
    """The train.py flags of `arm` (ARMS), filled from the script's settings."""
    return [f.format(**vars(args)) for f in ARMS[arm][1]]


def run(cmd, log):
    """Run a command from the repo root, its output to `log`; fail loudly with the log's tail."""
    with open(log, "w") as f:
        res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(cmd)}\n" + "".join(open(log).readlines()[-20:]))


def train(out, *flags):
    """train.py into `out` unless it already finished there; returns the trained model's folder. The run's wall
    time is kept in <out>/wall_seconds.json."""
    final = os.path.join(out, "final")
    if not os.path.exists(os.path.join(final, "config.json")):
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        run([sys.executable, "train.py", "--data", "toy", "--out_dir", out, "--overwrite", *flags],
            os.path.join(out, "train.log"))
        json.dump(dict(wall_s=round(time.time() - t0, 1)), open(os.path.join(out, "wall_seconds.json"), "w"))
    return final


def evaluate(model, name, reg, args):
    """(accuracy %, format validity %, mean key-step match) of `model` on the first `eval_n` held-out questions."""
    out = os.path.join(reg.out_dir, "eval", f"{name}.jsonl")
    summary = out.replace(".jsonl", ".summary.json")
    if not os.path.exists(summary):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run([sys.executable, "evaluate.py", "--bench", "toy", "--model", model, "--limit", str(args.eval_n),
             "--difficulty", reg.level, "--batch_size", "32", "--max_new_tokens", str(args.max_new_tokens),
             "--out", out, "--overwrite"], out.replace(".jsonl", ".log"))
    m = json.load(open(summary))["metrics"]
    return 100 * m["accuracy"], 100 * m["format_valid"], key_step_match(out, key_steps(args.eval_n, reg.level))


@functools.lru_cache
def key_steps(n, level):
    """{id: key steps} of the first `n` held-out toy questions at `level`, as evaluate.py --bench toy reads them."""
    from benchmarks import harness
    return {r["id"]: r["key_steps"] for r in harness.load("toy", toy_n=n, difficulty=int(level))}


def key_step_match(predictions, steps):
    """Mean key-step match k (Eq. 2) of evaluate.py's predictions jsonl over the questions in `steps` ({id: key
    steps}); a question without a prediction counts as k = 0, as it counts as wrong."""
    from collections import Counter
    import evaluate as E
    import rewards
    preds, _ = E.read_predictions(predictions, Counter(), known=steps)
    return statistics.mean(rewards.match_key_steps(preds[i], s)[0] if i in preds else 0.0 for i, s in steps.items())


def probe(warm, reg, args):
    """The warm-up's own samples at RL step 0 (M = 4 for `prompts` training questions): sampled accuracy, the
    share of groups whose rewards are all equal under each reward kind, and the mean key-step match of the
    samples whose answer is wrong."""
    import torch
    import rewards
    import train as T
    from stepgrpo import group_advantages
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    out, prompts = os.path.join(reg.out_dir, "probe"), args.probe_n
    r = T.setup(T.parse_args(["--model", warm, "--data", "toy", "--out_dir", out, "--overwrite",
                              "--stage", "rl", "--prompts_per_step", str(prompts), "--grad_accum", "1", *reg.flags]))
    batch = T.collect(r, 0)
    texts, m = batch.rollout.texts, r.args.num_generations
    zero = {kind: group_advantages(torch.tensor([rewards.reward(t, s, kind=kind)["total"]
                                                 for t, s in zip(texts, batch.samples)]), m)[1] for kind in KINDS}
    wrong = [x["k"] for x in batch.rewards if not x["correct"]]
    return dict(sampled_accuracy=statistics.mean(float(x["correct"]) for x in batch.rewards),
                frac_reward_zero_std=zero, key_step_match_wrong=statistics.mean(wrong) if wrong else None,
                prompts=prompts, samples=len(texts))


def curves(rows):
    """From a run's metrics.jsonl rows: held-out accuracy by step (RL "eval" rows, SFT "eval_sft" rows), the share
    of zero-std groups and the sampled key-step match by step (RL only)."""
    stage = "eval_sft" if any(r["stage"] == "sft" for r in rows) else "eval"
    acc = sorted({r["step"]: 100 * r["accuracy"] for r in rows if r["stage"] == stage}.items())
    rl = [r for r in rows if r["stage"] == "rl"]
    return dict(accuracy=acc, zero_std=[(r["step"], r["frac_reward_zero_std"]) for r in rl],
                key_step_match=[(r["step"], r["key_step_match"]) for r in rl])


def training_figures(out, rows):
    """A run's mean share of zero-std groups over its RL steps (None for SFT); with --dynamic_sampling the groups
    dropped, extra prompts drawn and groups trained unfilled, summed over its steps; its wall time (this script's
    clock; None for a run finished before it kept one) and train.py's own `seconds` (its last output line)."""
    rl = [r for r in rows if r["stage"] == "rl"]
    zero = [r["frac_reward_zero_std"] for r in rl if r.get("frac_reward_zero_std") is not None]
    dynamic = rl and "ds_groups_dropped" in rl[0] and dict(
        steps=len(rl), **{n: sum(r[f"ds_{n}"] for r in rl) for n in ("groups_dropped", "prompts_drawn", "groups_unfilled")})
    wall = os.path.join(out, "wall_seconds.json")
    return dict(zero_std=statistics.mean(zero) if zero else None, dynamic=dynamic or None,
                wall_s=json.load(open(wall))["wall_s"] if os.path.exists(wall) else None, train_s=train_seconds(out))


def train_seconds(out):
    """train.py's own `seconds`, from its summary (the last JSON line of its output), or None."""
    for line in reversed(open(os.path.join(out, "train.log")).read().splitlines()):
        try:
            return json.loads(line).get("seconds")
        except (ValueError, AttributeError):
            continue


def warmups(p, specs, regimes):
    """{regime: warm-up folder} from --warmup's `REGIME=DIR` items (a plain DIR for a single regime); refuses in one
    line a regime not run, a regime named twice, and a folder without a saved model."""
    given = {}
    for spec in specs or []:
        name, sep, folder = spec.partition("=")
        if not sep or os.sep in name:                     # a plain DIR (which may hold "=" itself)
            if len(regimes) > 1 or len(specs) > 1:
                p.error(f"--warmup {spec}: with several regimes name each one's warm-up, as REGIME=DIR")
            name, folder = regimes[0], spec
        elif name not in REGIMES:
            p.error(f"--warmup {spec}: {name!r} is not a regime ({', '.join(sorted(REGIMES))})")
        elif name not in regimes:
            p.error(f"--warmup {spec}: {name} is not among --regime {' '.join(regimes)}")
        if name in given:
            p.error(f"--warmup names two warm-ups for {name}")
        if not os.path.exists(os.path.join(folder, "config.json")):
            p.error(f"--warmup {spec}: no config.json in {folder}; pass the folder a model was saved to (e.g. its final/)")
        given[name] = os.path.abspath(folder)
    return given


def check(p, a):
    """The settings that would crash a run or train nothing, refused in one line (exit 2)."""
    for name in ("steps", "jobs", "eval_n", "curve_n", "max_new_tokens", "probe_n"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1 (got {getattr(a, name)})")
    if a.eval_every < 0:
        p.error(f"--eval_every must be 0 (no curves) or more (got {a.eval_every})")
    if not a.sft_lr > 0:
        p.error(f"--sft_lr must be above 0 (got {a.sft_lr})")
    if not a.step_credit > 0:
        p.error(f"--step_credit must be above 0 (got {a.step_credit}): at 0 the step_credit arm is the step arm")
    if a.teacher_noise is not None and not 0 <= a.teacher_noise <= 1:
        p.error(f"--teacher_noise is a share of the warm-up paths: it must be in [0, 1] (got {a.teacher_noise})")
    if len(set(a.seeds)) < len(a.seeds):
        p.error(f"--seeds repeats a seed (got {a.seeds}): each run would be done twice")
    for name in ("regime", "arms"):
        if len(set(getattr(a, name) or [])) < len(getattr(a, name) or []):
            p.error(f"--{name} names one twice (got {' '.join(getattr(a, name))})")
    if a.study and a.arms:
        p.error("--study runs the options study's arms: drop --arms, or drop --study and list them in --arms")
    if a.plot and len(a.regime) > 1:
        p.error("--plot names one chart: with several regimes each is written beside its results.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.ShowDefaults)
    p.add_argument("--regime", nargs="+", default=["dense"], choices=sorted(REGIMES),
                   help="the toy task's reward density; several share one pool of --jobs")
    p.add_argument("--warmup", nargs="+", metavar="[REGIME=]DIR",
                   help="warm-up model folder per regime (default: run train.py --stage sft once per regime)")
    p.add_argument("--out_dir", default=None, help="runs, evaluations, results.json (default out/ablation-<regime>; "
                                                   "with several regimes DIR/<regime>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per arm and seed")
    p.add_argument("--steps", type=int, default=150, help="RL steps, and continued-SFT steps, per run")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help=f"arms to run (default: {' '.join(REWARD_ARMS)})")
    p.add_argument("--study", action="store_true", help=f"the options study's arms: {' '.join(STUDY_ARMS)}")
    p.add_argument("--step_credit", type=float, default=0.5, help="train.py --step_credit of the step_credit arm")
    p.add_argument("--reward_impl", default="paper", choices=["paper", "official"], help="train.py --reward_impl")
    p.add_argument("--sft_lr", type=float, default=5e-5, help="peak lr of the continued-SFT arm")
    p.add_argument("--teacher_noise", type=float, help="the warm-up's and SFT arm's paths miscount (default: regime's)")
    p.add_argument("--jobs", type=int, default=2, help="trainings run at once")
    p.add_argument("--eval_n", type=int, default=400, help="held-out questions of the final score (greedy)")
    p.add_argument("--eval_every", type=int, default=30, help="steps between points of the accuracy curves; 0: none")
    p.add_argument("--curve_n", type=int, default=200, help="held-out questions per curve point")
    p.add_argument("--max_new_tokens", type=int, default=160, help="generation budget of the evaluation")
    p.add_argument("--probe_n", type=int, default=64, help="training questions sampled (x4) from the warm-up at step 0")
    p.add_argument("--plot", help="chart path, one regime only (default: <out_dir>/ablation.png)")
    args = p.parse_args(argv)
    check(p, args)
    args.warmups = warmups(p, args.warmup, args.regime)
    args.arms = STUDY_ARMS if args.study else args.arms or REWARD_ARMS
    return args


def regimes(args):
    """Per regime: its name, folder, chart, run flags, toy level and warm-up (None: trained here)."""
    regs = []
    for name in args.regime:
        out = (args.out_dir if len(args.regime) == 1 else os.path.join(args.out_dir, name)) if args.out_dir else \
            os.path.join("out", f"ablation-{name}")
        fl = REGIMES[name] + ([] if args.teacher_noise is None else ["--teacher_noise", str(args.teacher_noise)])
        regs.append(SimpleNamespace(name=name, out_dir=os.path.abspath(out), flags=fl, warmup=args.warmups.get(name),
                                    level=fl[fl.index("--difficulty") + 1] if "--difficulty" in fl else "2",
                                    plot=args.plot or os.path.join(os.path.abspath(out), "ablation.png")))
    return regs


def pin(reg, args):
    """Finished runs are reused, so they must come from the same settings: pin them to the regime's folder. A pin
    written before a setting existed lacks it (and holds no run that used it)."""
    setup = dict(regime=reg.name, warmup=reg.warmup, steps=args.steps, sft_lr=args.sft_lr, eval_n=args.eval_n,
                 max_new_tokens=args.max_new_tokens, teacher_noise=args.teacher_noise, reward_impl=args.reward_impl,
                 eval_every=args.eval_every, curve_n=args.curve_n, step_credit=args.step_credit)
    pinned = os.path.join(reg.out_dir, "setup.json")
    if os.path.exists(pinned) and {**setup, **json.load(open(pinned))} != setup:
        sys.exit(f"{reg.out_dir} holds runs made with {json.load(open(pinned))}, not {setup}: use another --out_dir")
    os.makedirs(reg.out_dir, exist_ok=True)
    json.dump(setup, open(pinned, "w"))
    return setup


def baseline(reg, args):
    """The warm-up at step 0: its probe (one at a time, in this process) and its held-out scores."""
    with PROBE_LOCK:
        step0 = probe(reg.warmup, reg, args)
    print(f"step 0 ({reg.name}): sampled accuracy {step0['sampled_accuracy']:.3f}; groups with zero reward std: "
          + ", ".join(f"{k} {v:.2f}" for k, v in step0["frac_reward_zero_std"].items())
          + f"; key-step match of wrong answers {step0['key_step_match_wrong']}", flush=True)
    acc, fmt, ksm = evaluate(reg.warmup, "warmup", reg, args)
    return step0, dict(arm="warmup", seed=None, steps=0, accuracy=acc, format=fmt, key_step_match=ksm)


def run_flags(reg, arm, seed, args):
    """train.py's flags of one arm's run from the regime's warm-up (a tiny model's folder: the toy preset)."""
    curve = ["--eval_every", str(args.eval_every), "--eval_n", str(args.curve_n)] if args.eval_every else ["--eval_n", "0"]
    return ["--model", reg.warmup, "--seed", str(seed), *arm_flags(arm, args), *reg.flags, *curve]


def arm_run(reg, arm, seed, args):
    """One arm's training from the regime's warm-up, its held-out scores and its training figures."""
    out = os.path.join(reg.out_dir, f"{arm}_seed{seed}")
    model = train(out, *run_flags(reg, arm, seed, args))
    acc, fmt, ksm = evaluate(model, f"{arm}_seed{seed}", reg, args)
    print(f"{reg.name} {arm:15s} seed {seed}: accuracy {acc:.1f} %, format {fmt:.1f} %, key-step match {ksm:.2f}", flush=True)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return dict(arm=arm, seed=seed, steps=args.steps, accuracy=acc, format=fmt, key_step_match=ksm,
                **training_figures(out, rows), curves=curves(rows))


def run_all(regs, args):
    """Every run of every regime through one pool of --jobs workers: the warm-ups to train first, then each
    regime's probe, warm-up score and arms once its warm-up is there. {(regime, arm, seed): result}; the
    warm-up's key is (regime, "warmup", None). A failed run stops the queue (runs under way finish)."""
    tasks = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:   # threads only wait on subprocesses
        def start(*ready):   # seed by seed across regimes: a study cut short holds whole seeds
            for reg in ready:
                tasks[reg.name, "warmup", None] = pool.submit(baseline, reg, args)
            for seed in args.seeds:
                for reg in ready:
                    for arm in args.arms:
                        tasks[reg.name, arm, seed] = pool.submit(arm_run, reg, arm, seed, args)
        try:
            warming = {pool.submit(train, os.path.join(reg.out_dir, "warmup"), "--stage", "sft", "--eval_n", "0",
                                   *reg.flags): reg for reg in regs if not reg.warmup}
            start(*[reg for reg in regs if reg.warmup])
            for done in concurrent.futures.as_completed(warming):
                warming[done].warmup = done.result()
                start(warming[done])
            return {key: task.result() for key, task in tasks.items()}
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))  # runs inherit it
    regs = regimes(args)
    setups = {reg.name: pin(reg, args) for reg in regs}
    done = run_all(regs, args)
    by_regime = {}
    for reg in regs:
        step0, warm = done[reg.name, "warmup", None]
        runs = by_regime[reg.name] = [warm] + [done[reg.name, a, s] for s in args.seeds for a in args.arms]
        json.dump(dict(setups[reg.name], warmup=reg.warmup, arms=args.arms, seeds=args.seeds, step0=step0, runs=runs),
                  open(os.path.join(reg.out_dir, "results.json"), "w"), indent=1)
        ablation_report.report(reg, args, runs, LABELS)
        ablation_report.plot(runs, reg.plot, LABELS)
        print(f"\nresults: {os.path.join(reg.out_dir, 'results.json')}; chart: {reg.plot}")
    if len(regs) > 1:
        ablation_report.combined(regs, args, by_regime, LABELS)


if __name__ == "__main__":
    main()
