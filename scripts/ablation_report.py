"""scripts/ablation_report.py: the tables and the chart of scripts/ablation.py, from its runs' results: per regime a
markdown table (accuracy, its gain over the warm-up, format validity, held-out key-step match, zero-std groups,
steps to the warm-up + 5 points, wall time per run) and a chart; across regimes one table of accuracy."""
import os
import statistics


def cell(values, fmt="{:.2f}"):
    return fmt.format(values) if values is not None else "–"


def report(reg, args, runs, labels):
    """The regime's markdown table, from its runs (the warm-up first); `labels`: {arm: its name in the table}."""
    print(f"\nHeld-out toy accuracy ({reg.name} regime), {args.eval_n} questions, greedy; {args.steps} steps per arm, "
          f"seeds {args.seeds}\n")
    print("| arm | accuracy % (mean ± std) | Δ vs warm-up | format valid % | held-out key-step match | zero-std groups "
          "| steps to warm-up + 5 | wall time per run | seeds |\n|---|---|---|---|---|---|---|---|---|")
    base = runs[0]["accuracy"]
    for name in ["warmup", *args.arms]:
        rs = [r for r in runs if r["arm"] == name]
        m, s = mean_std([r["accuracy"] for r in rs])
        reach = [steps_to_gain(r.get("curves", {}).get("accuracy")) for r in rs]
        reached = f"{mean_of(reach):.0f} ({sum(x is not None for x in reach)}/{len(reach)} seeds)" if any(reach) else "–"
        zero = cell(mean_of([r.get("zero_std") for r in rs]))
        dyn = [r["dynamic"] for r in rs if r.get("dynamic") and r["dynamic"]["steps"]]
        if dyn:   # dynamic sampling: the zero-std share is of the groups trained on; what it dropped to get there
            per_step = lambda key: statistics.mean(d[key] / d["steps"] for d in dyn)   # noqa: E731
            zero += f" ({per_step('groups_dropped'):.1f} groups dropped, {per_step('prompts_drawn'):.1f} prompts drawn per step)"
        print(f"| {labels[name]} | {m:.1f} ± {s:.1f} | {m - base:+.1f} | {statistics.mean(r['format'] for r in rs):.1f} "
              f"| {cell(mean_of([r['key_step_match'] for r in rs]))} | {zero} | {reached if name != 'warmup' else '–'} "
              f"| {cell(mean_of([r.get('wall_s') for r in rs]), '{:.0f} s')} "
              f"| {', '.join(format(r['accuracy'], '.1f') for r in rs)} |")


def combined(regs, args, by_regime, labels):
    """One table: accuracy (mean ± std over seeds) per arm and regime."""
    print(f"\nHeld-out toy accuracy % by regime, {args.eval_n} questions, greedy; {args.steps} steps per arm, "
          f"seeds {args.seeds}\n")
    print("| arm | " + " | ".join(reg.name for reg in regs) + " |\n|---|" + "---|" * len(regs))
    for name in ["warmup", *args.arms]:
        stats = [mean_std([r["accuracy"] for r in by_regime[reg.name] if r["arm"] == name]) for reg in regs]
        print(f"| {labels[name]} | " + " | ".join(f"{m:.1f}" + (f" ± {s:.1f}" if name != "warmup" else "")
                                                  for m, s in stats) + " |")


def steps_to_gain(curve, gain=5.0):
    """First step at which held-out accuracy is `gain` points above the curve's start, or None."""
    return next((s for s, a in curve if s and a >= curve[0][1] + gain), None) if curve else None


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def mean_of(values):
    """Mean of the values that are not None, or None."""
    xs = [x for x in values if x is not None]
    return statistics.mean(xs) if xs else None


def colour(arm):
    return {"warmup": "grey", "sft": "tab:orange"}.get(arm, "tab:red" if arm.startswith("outcome") else "tab:blue")


def plot(results, path, labels):
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
    ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color=[colour(n) for n in names])
    for i, n in enumerate(names):
        ax.plot([i] * len(by[n]), [r["accuracy"] for r in by[n]], "k.", ms=4)
    ax.set_xticks(range(len(names)), [labels[n].replace(" (", "\n(") for n in names], fontsize=7, rotation=25, ha="right")
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
                    axis.plot(steps, [statistics.mean(p[s] for p in pts) for s in steps], label=labels[n], marker=".")
        axes[0][1].set_title("held-out accuracy vs step (mean over seeds)", fontsize=9)
        axes[0][2].set_title("share of groups with identical rewards (10-step means)", fontsize=9)
        for axis in axes[0][1:]:
            axis.set_xlabel("step"), axis.legend(fontsize=6, loc="best", framealpha=0.6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
