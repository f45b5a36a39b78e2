"""toy/task.py: the embedded default task: synthetic visual reasoning that the tiny Qwen2-VL (models/tiny.py) learns on a CPU.

    samples = dataset("train", n=4000, seed=0, difficulty=2, teacher_noise=0.5)

The task: the image is a grid of solid 28×28-px colour cells, one cell per merged visual token of
Qwen2-VL (patch 14 × spatial merge 2), so even a tiny vision tower reads every cell. The difficulty
lies in the reasoning: count colours, then combine the counts. A completion can get the counts
right and the arithmetic wrong, so the key steps (the counts and equations) give StepRAR's partial
credit α·k a signal the final answer lacks. `teacher_noise` makes the warm-up paths
(`teacher_solution`) those of an imperfect teacher who sometimes miscounts, as the MLLM-made paths
R1-VL warms up on contain mistakes; rewards, key steps and evaluation keep the truth. Imitation
learns the slips; verifiable rewards can unlearn them.
"""
import hashlib
import random

from PIL import Image

import rewards

MAX_NEW_TOKENS = 160   # a toy reasoning path is about 100 tokens

# The toy presets: train.py's defaults with `--data toy` (flags given on the command line still win).
# Tiny models (qwen/tiny.py): warm-up then StepGRPO on one CPU in minutes, a large warm-up lr and batch,
# 8 prompts x 4 samples.
PRESET = dict(stage="both", sft_steps=600, sft_batch=32, sft_lr=2e-3, teacher_noise=0.5,
              max_steps=150, prompts_per_step=8, grad_accum=1, temperature=1.0, lr=5e-5,
              max_new_tokens=MAX_NEW_TOKENS, micro_batch=16, eval_n=500, save_every=50)
# Any other (pretrained) model: a smoke run of the whole method on one GPU at the paper's settings (train.py's
# own defaults: warm-up lr by model size, 3 % warm-up and cosine; RL lr 1e-6, beta 0.04, T 1.2, 1 prompt x 4
# accumulation x M = 4), with a warm-up of 200 x 8 paths to learn the section format and held-out accuracy
# before the warm-up and after StepGRPO. A pretrained model's first replies are longer than the toy paths.
PRETRAINED = dict(stage="both", sft_steps=200, sft_batch=8, teacher_noise=0.5, max_steps=100,
                  max_new_tokens=256, eval_n=200, eval_every=200, save_every=50)
PRESETS = {"a tiny model, or a folder one was saved to": PRESET, "any other model": PRETRAINED}
# A tiny model with --lora_rank: LoRA's rates, measured on this task (docs/real-models.md), and a lower sampling
# temperature. The tiny model's LM head (tied to its random embeddings) and final norm stay frozen under LoRA, which
# caps every token's probability at about 7 % at T = 1 (full fine-tuning trains them): at T = 1 its samples are
# noise, whatever the adapters learn.
LORA_PRESET = dict(sft_lr=2e-3, lr=5e-5, temperature=0.25)


# ---------------------------------------------------------------------------- the task
CELL = 28  # px = patch 14 × spatial merge 2: one merged visual token per cell
PALETTE = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
           "yellow": (240, 200, 20), "white": (255, 255, 255)}  # white = empty cell

# level: grid rows, cols, colours that fill it (besides white), question kinds. A level-L
# reference path has L + 1 steps: one count per colour named in the question, then arithmetic.
LEVELS = {1: (2, 3, ("red", "green", "blue"), ("not", "twice")),
          2: (2, 3, ("red", "green", "blue"), ("more", "total", "compare")),
          3: (3, 3, ("red", "green", "blue", "yellow"), ("expr", "most")),
          4: (3, 3, ("red", "green", "blue", "yellow"), ("expr2", "sum3"))}
ARITY = {"not": 1, "twice": 1, "more": 2, "total": 2, "compare": 2,
         "expr": 3, "most": 3, "expr2": 3, "sum3": 3}
# Each kind's answers, drawn uniformly before the grid: the question text then says nothing
# about the answer. Ranges leave out values that only a handful of grids produce.
ANSWERS = {"not": range(1, 7), "twice": range(0, 9, 2), "more": range(0, 5),
           "total": range(0, 7), "compare": "ABC", "expr": range(0, 6), "most": "ABC",
           "expr2": range(0, 6), "sum3": range(2, 9)}
MAX_TRIES = 100_000
SLIPS = ("count", "late")   # where the teacher's slip falls: one count, or the last operation


def _count_step(colour, c):
    # "3 red" alone would be found across steps ("green = 3" + "red = 2" → "… 3 red …" once the
    # steps are joined), crediting a wrong count: the worded forms keep "cells".
    body = f"{colour} = {c}"
    return body, [body, f"{colour}={c}", f"{colour}: {c}", f"{c} {colour} cells", f"{rewards.NUM_WORDS[c]} {colour} cells"]


def _eq_step(expr, value, *extra):
    """`expr = value` plus the surface forms StepRAR should accept as the same step."""
    body = f"{expr} = {value}"
    alts = [body, body.replace(" ", ""), f"{value} = {expr}", *extra]
    if "-" in expr:  # unicode minus
        alts.append(body.replace("-", "−"))
    if "*" in expr:
        alts += [body.replace("*", "x"), body.replace("*", "×")]
    return body, list(dict.fromkeys(alts))


def _order_step(*counts):
    """`3 > 1`, `2 = 2`, `4 > 2 > 0`: the counts sorted, as one numeric step. A worded step
    ("red has the most") would be fuzzily found in a wrong one ("green has the most")."""
    hi = sorted(counts, reverse=True)
    down = "".join(f" {'=' if a == b else '>'} {b}" for a, b in zip(hi, hi[1:]))
    up = "".join(f" {'=' if a == b else '<'} {b}" for a, b in zip(hi[::-1], hi[-2::-1]))
    body, rev = f"{hi[0]}{down}", f"{hi[-1]}{up}"
    return body, list(dict.fromkeys([body, body.replace(" ", ""), rev, rev.replace(" ", "")]))


def _pose(kind, names, counts, n):
    """The question about colours `names` with cell counts `counts` on an n-cell grid.

    Returns (problem, rationale, [(step body, alternatives)], answer), or None when the grid
    does not fit the question (negative difference, no unique largest count).
    """
    x, y, z = (list(names) + [None, None])[:3]
    cx, cy, cz = (list(counts) + [0, 0])[:3]
    steps = [_count_step(c, k) for c, k in zip(names, counts)]
    if kind == "not":
        return (f"How many cells are not {x}?", f"Count {x} cells, subtract from {n}.",
                steps + [_eq_step(f"{n} - {cx}", n - cx)], n - cx)
    if kind == "twice":
        return (f"What is twice the number of {x} cells?", f"Count {x} cells, double it.",
                steps + [_eq_step(f"2 * {cx}", 2 * cx, f"{cx} * 2 = {2 * cx}", f"{cx} + {cx} = {2 * cx}")],
                2 * cx)
    if kind == "more":
        return None if cx < cy else (
            f"How many more {x} cells than {y} cells?", f"Count {x} and {y} cells, subtract.",
            steps + [_eq_step(f"{cx} - {cy}", cx - cy)], cx - cy)
    if kind == "total":
        return (f"How many {x} and {y} cells are there in total?", f"Count {x} and {y} cells, add.",
                steps + [_eq_step(f"{cx} + {cy}", cx + cy, f"{cy} + {cx} = {cx + cy}")], cx + cy)
    if kind == "compare":
        return (f"Are there more {x} or {y} cells?\nChoices:\nA: {x}\nB: {y}\nC: equal",
                f"Count {x} and {y} cells, compare.", steps + [_order_step(cx, cy)],
                "A" if cx > cy else "B" if cy > cx else "C")
    problem = f"Counting cells, what is {x} + {y} - {z}?"
    if kind == "expr":
        r = cx + cy - cz
        return None if r < 0 else (
            problem, f"Count {x}, {y} and {z} cells, add the first two, subtract the third.",
            steps + [_eq_step(f"{cx} + {cy} - {cz}", r, f"{cx + cy} - {cz} = {r}")], r)
    if kind == "expr2":
        s, r = cx + cy, cx + cy - cz
        return None if r < 0 else (
            problem, f"Count {x}, {y} and {z} cells, add the first two, subtract the third.",
            steps + [_eq_step(f"{cx} + {cy}", s, f"{cy} + {cx} = {s}"), _eq_step(f"{s} - {cz}", r)], r)
    if kind == "sum3":
        s = cx + cy  # with z = 0 and x or y = 0 the two sums read alike: one would credit the other
        return None if cz == 0 and 0 in (cx, cy) else (
            f"How many {x}, {y} and {z} cells are there in total?", f"Count {x}, {y} and {z} cells, add.",
            steps + [_eq_step(f"{cx} + {cy}", s, f"{cy} + {cx} = {s}"),
                     _eq_step(f"{s} + {cz}", s + cz, f"{cz} + {s} = {s + cz}")], s + cz)
    if kind == "most":
        top = max(counts)
        if counts.count(top) > 1:
            return None
        return (f"Which colour has the most cells?\nChoices:\nA: {x}\nB: {y}\nC: {z}",
                f"Count {x}, {y} and {z} cells, find the largest.",
                steps + [_order_step(*counts)], "ABC"[counts.index(top)])
    raise ValueError(f"unknown toy question kind {kind!r}")


def _split(rows, cols, grid, problem):
    """Train/test partition of the problem space by a hash of (layout, question), so the two
    splits never share a problem whatever their sizes and seeds."""
    key = f"{rows}x{cols}|{','.join(grid)}|{problem}"
    return "test" if hashlib.sha1(key.encode()).digest()[0] & 1 else "train"


def _render(rows, cols, grid):
    img = Image.new("RGB", (cols * CELL, rows * CELL))
    for i, colour in enumerate(grid):
        r, c = divmod(i, cols)
        img.paste(PALETTE[colour], (c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL))
    return img


def _late_slip(steps, answer, teacher_rng):
    """The teacher's path slipping at its last step only: every count right, the final operation's result one
    off and carried into the answer. None for questions whose last step is not arithmetic (A/B/C kinds)."""
    body, _ = steps[-1]
    if not isinstance(answer, int) or not body.endswith(f" = {answer}"):
        return None
    wrong = answer + (teacher_rng.choice((-1, 1)) if answer > 0 else 1)
    return steps[:-1] + [_eq_step(body[:-len(f" = {answer}")], wrong)], wrong


def _sample(rng, level, split, teacher_rng, teacher_noise, teacher_slip="count"):
    rows, cols, colours, kinds = LEVELS[level]
    kind = rng.choice(kinds)
    target = str(rng.choice(ANSWERS[kind]))
    # Rejection sampling: a uniform grid and question given the drawn answer and split.
    for _ in range(MAX_TRIES):
        names = rng.sample(colours, ARITY[kind])
        grid = [rng.choice(colours + ("white",)) for _ in range(rows * cols)]
        posed = _pose(kind, names, [grid.count(c) for c in names], len(grid))
        if posed and str(posed[3]) == target and _split(rows, cols, grid, posed[0]) == split:
            break
    else:
        raise RuntimeError(f"no level-{level} {kind!r} grid with answer {target} in {MAX_TRIES} tries")
    problem, rationale, steps, answer = posed
    desc = " ".join(f"Row {r + 1}: {', '.join(grid[r * cols:(r + 1) * cols])}." for r in range(rows))

    def path(steps, answer):
        body = "\n\n".join(f"### Step {i}:\n{text}" for i, (text, _) in enumerate(steps, 1))
        return (f"### Image Description:\n{desc}\n\n### Rationales:\n{rationale}\n\n"
                f"### Let's think step by step.\n\n{body}\n\n### The final answer is: {answer}")
    solution = teacher = path(steps, answer)
    # The imperfect teacher misses one cell of one colour it counts and carries the slip on to
    # its answer (grids where no slip leaves a well-posed question keep the correct path); with
    # teacher_slip="late" it counts right and gets the last operation one off instead.
    if teacher_rng.random() < teacher_noise:
        if teacher_slip == "late":
            slipped = _late_slip(steps, answer, teacher_rng)
        else:
            counts = [grid.count(c) for c in names]
            slips = [slip for j, c in enumerate(counts)
                     if c and (slip := _pose(kind, names, counts[:j] + [c - 1] + counts[j + 1:], len(grid)))]
            slipped = teacher_rng.choice(slips)[2:] if slips else None
        if slipped:
            teacher = path(*slipped)
    return {"image": _render(rows, cols, grid), "problem": problem, "solution": solution,
            "teacher_solution": teacher, "answer": str(answer),
            "key_steps": {"Steps": [alts for _, alts in steps]}}


def dataset(split="train", n=1000, seed=0, difficulty=2, teacher_noise=0.0, teacher_slip="count"):
    """n toy samples, a deterministic function of (split, n, seed, difficulty, teacher_noise, teacher_slip).

    difficulty (cells of 28 px; colours besides white; steps of the reference path):
      1: 2×3 grid, 3 colours, 2 steps — "How many cells are not X?" (6 − X), "twice X".
      2: 2×3 grid, 3 colours, 3 steps — X − Y, X + Y, "more X or Y? A/B/C". Default: after the
         600-step warm-up on the teacher's paths (teacher_noise 0.5) the tiny Qwen2-VL (2.5M
         parameters) describes the grid exactly in 99–100 % of held-out answers but miscounts it
         often: 45–67 % accuracy, room for StepGRPO.
      3: 3×3 grid, 4 colours, 4 steps — X + Y − Z in one equation, "which of X/Y/Z is most? A/B/C".
      4: 3×3 grid, 4 colours, 5 steps — X + Y − Z and X + Y + Z, one operation per step.
    Answers are uniform per question kind, so no question text predicts its answer. "train" and
    "test" draw from disjoint halves of the problem space (`_split`); duplicates may occur
    within a split. Sample: {"id", "image" (PIL RGB), "problem", "solution" (reference path),
    "teacher_solution" (the warm-up path: with probability `teacher_noise` one count is one too
    low and the rest follows from it, or with teacher_slip="late" every count is right and the last
    operation's result is one off; else the reference path), "answer", "key_steps"
    {"Steps": [[alternatives], ...]}}. The teacher's slips come from their own random stream, so
    the problems are the same for any `teacher_noise`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"toy split must be 'train' or 'test', got {split!r}")
    if difficulty not in LEVELS:
        raise ValueError(f"toy difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
    if not 0 <= teacher_noise <= 1:
        raise ValueError(f"teacher_noise is a probability in [0, 1], got {teacher_noise!r}")
    if teacher_slip not in SLIPS:
        raise ValueError(f"teacher_slip must be one of {SLIPS}, got {teacher_slip!r}")
    rng = random.Random(f"toy|{split}|{seed}|{difficulty}")  # str seeds hash stably across runs
    teacher_rng = random.Random(f"teacher|{split}|{seed}|{difficulty}")  # apart: problems never depend on it
    return [{"id": f"toy-{split}-d{difficulty}-s{seed}-{i}", **_sample(rng, difficulty, split, teacher_rng, teacher_noise, teacher_slip)}
            for i in range(n)]
