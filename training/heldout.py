"""training/heldout.py: held-out benchmark accuracy during training, through evaluate.py's own records, question,
image, scorer and metrics (benchmarks/harness.py), greedy, split over ranks.

    python train.py ... --eval_bench mathvista --eval_data testmini.json --eval_limit 200 --eval_every 50

`at(run, stage, step)` is the one call of train.py: it scores the model after `step` steps of a stage at the
stage's start, every --eval_every steps and at its end, and writes an "eval_sft" (warm-up) or "eval" (StepGRPO)
row to metrics.jsonl: the bench, its headline metric and breakdown, counts of what was skipped, and the seconds
it took. With --stage both the warm-up's last score is also the StepGRPO stage's step 0 (the same model). The
toy task is a benchmark too (`--eval_bench toy`, the default with --data toy and --eval_n > 0).
"""
import contextlib
import os
import random
import time
from collections import Counter

import torch
import torch.distributed as dist

import rollout
from benchmarks import harness

BATCH = 8                   # records per generation batch, as evaluate.py's --batch_size
PROMPT = "r1vl"             # the format the policy is trained to answer in


def bench_of(args):
    return args.eval_bench or ("toy" if args.data == "toy" and args.eval_n else None)


def records(args):
    """The held-out records (a fixed seeded subset with --eval_limit), or [] without a held-out benchmark."""
    bench = bench_of(args)
    if bench is None:
        return []
    if bench != "toy" and not args.eval_data:
        raise ValueError(f"--eval_bench {bench} needs --eval_data, the benchmark's file or folder")
    if bench != "toy" and not os.path.exists(args.eval_data):
        raise ValueError(f"--eval_data {args.eval_data} does not exist")
    recs = harness.load(bench, args.eval_data, args.eval_image_root, toy_n=args.eval_n, seed=args.seed,
                        difficulty=args.difficulty)
    return harness.subset(recs, args.eval_limit, args.seed)


def due(run, stage, step):
    """Whether `step` of `stage` is scored: its start (with --eval_every), every --eval_every steps, its end."""
    a = run.args
    last = a.sft_steps if stage == "sft" else a.max_steps
    if not run.eval_set or (stage == "rl" and step == 0 and a.stage == "both"):   # scored as the warm-up's end
        return False
    return step == last or bool(a.eval_every and step % a.eval_every == 0)


def at(run, stage, step):
    """Score the model after `step` steps of `stage` if due (see `due`); returns the metrics or None."""
    if not due(run, stage, step):
        return None
    t0, bench = time.time(), bench_of(run.args)
    with untouched_rng(run.device):
        m, counts = evaluate(run, bench, run.eval_set)
    name = harness.headline(bench)
    row = dict(step=step, bench=bench, headline=name, **m, counts=dict(counts), seconds=round(time.time() - t0, 3))
    run.log.write("metrics.jsonl", dict(stage="eval_sft" if stage == "sft" else "eval", **row))
    last = run.args.sft_steps if stage == "sft" else run.args.max_steps
    if stage == "sft" and step == last and run.args.stage == "both":
        run.log.write("metrics.jsonl", dict(stage="eval", **dict(row, step=0)))
    if step in (0, last):
        when = f"{'before' if step == 0 else 'after'} {'warm-up' if stage == 'sft' else 'StepGRPO'}"
        run.log.print(f"held-out accuracy {when}: {m[name]:.3f} ({bench} {name}, {len(run.eval_set)} records, "
                      f"{row['seconds']:.0f} s)")
    return m


@contextlib.contextmanager
def untouched_rng(device):
    """The training's random streams (Python, torch CPU and CUDA) are the same after an evaluation as before."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(state)


def evaluate(run, bench, recs):
    """(metrics, counts) of greedy answers to `recs`: each rank answers every world-th record, then every rank
    scores all the answers, gathered. Unreadable images and prompts over --max_prompt_len count as wrong."""
    a, answers, counts = run.args, {}, Counter()
    mine = recs[run.rank::run.world]
    for start in range(0, len(mine), BATCH):
        batch, images = [], []
        for r in mine[start:start + BATCH]:
            try:
                images.append(harness.open_image(r["images"]))
                batch.append(r)
            except ValueError as e:
                counts["bad_images"] += 1
                run.log.print(f"[rank {run.rank}] held-out {r['id']}: skipped, {e}")
        if not batch:
            continue
        with run.amp:
            ro = rollout.generate(run.sampler, run.tokenizer, run.image_processor, images,
                                  [harness.question(r, bench, PROMPT) for r in batch], num_samples=1, greedy=True,
                                  max_new_tokens=a.max_new_tokens, max_prompt_len=a.max_prompt_len, style=PROMPT,
                                  compile=a.compile)
        kept = ro.kept if ro is not None else []
        counts["skipped_prompt_too_long"] += len(batch) - len(kept)
        answers.update({batch[i]["id"]: text for text, i in zip(ro.texts if ro is not None else [], kept)})
    if run.ddp:
        everyone = [None] * run.world
        dist.all_gather_object(everyone, (answers, counts))
        answers, counts = {k: v for a_, _ in everyone for k, v in a_.items()}, sum((c for _, c in everyone), Counter())
    flags, valid = harness.score(bench, recs, answers, PROMPT, counts)
    return harness.metrics(bench, recs, flags, valid), +counts
