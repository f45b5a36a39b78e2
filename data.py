"""Data: a synthetic visual-reasoning task for tiny models, and loaders for real R1-VL data.

Toy task (`toy_dataset`, `--data toy`): the image is a grid of solid 28×28-px colour cells, one
cell per merged visual token of Qwen2-VL (patch 14 × spatial merge 2), so even a tiny vision
tower reads every cell. The difficulty lies in the reasoning: count colours, then combine the
counts. A completion can get the counts right and the arithmetic wrong, so the key steps (the
counts and equations) give StepRAR's partial credit α·k a signal the final answer lacks.
`teacher_noise` makes the warm-up paths (`teacher_solution`) those of an imperfect teacher who
sometimes miscounts, as the MLLM-made paths R1-VL warms up on contain mistakes; rewards, key
steps and evaluation keep the truth. Imitation learns the slips; verifiable rewards can unlearn them.

Real data (every record checked; a bad one is skipped, counted, and logged as one warning line
per reason with its first line numbers; no usable record → ValueError):
- `load_rl_data`: R1-VL-10K records (image_path, problem, solution, key_steps) for StepGRPO.
- `load_sft_data`: Mulberry / LLaMA-Factory `messages` + `images` records for the warm-up SFT
  (METHOD.md §1), or RL records with the solution as the response.
Images are kept as paths (checked to exist); the trainer opens them.

Key steps (`key_steps_from_solution`): an offline, rule-based stand-in for the authors' GPT-4
extraction and augmentation, for data that comes without key steps.
"""
import hashlib
import json
import logging
import random
import re
from pathlib import Path

from PIL import Image

import rewards

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- toy task
CELL = 28  # px = patch 14 × spatial merge 2: one merged visual token per cell
PALETTE = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
           "yellow": (240, 200, 20), "white": (255, 255, 255)}  # white = empty cell
NUM_WORDS = "zero one two three four five six seven eight nine".split()

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


def _count_step(colour, c):
    # "3 red" alone would be found across steps ("green = 3" + "red = 2" → "… 3 red …" once the
    # steps are joined), crediting a wrong count: the worded forms keep "cells".
    body = f"{colour} = {c}"
    return body, [body, f"{colour}={c}", f"{colour}: {c}", f"{c} {colour} cells", f"{NUM_WORDS[c]} {colour} cells"]


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


def _toy_split(rows, cols, grid, problem):
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


def _toy_sample(rng, level, split, teacher_rng, teacher_noise):
    rows, cols, colours, kinds = LEVELS[level]
    kind = rng.choice(kinds)
    target = str(rng.choice(ANSWERS[kind]))
    # Rejection sampling: a uniform grid and question given the drawn answer and split.
    for _ in range(MAX_TRIES):
        names = rng.sample(colours, ARITY[kind])
        grid = [rng.choice(colours + ("white",)) for _ in range(rows * cols)]
        posed = _pose(kind, names, [grid.count(c) for c in names], len(grid))
        if posed and str(posed[3]) == target and _toy_split(rows, cols, grid, posed[0]) == split:
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
    # its answer (grids where no slip leaves a well-posed question keep the correct path).
    if teacher_rng.random() < teacher_noise:
        counts = [grid.count(c) for c in names]
        slips = [slip for j, c in enumerate(counts)
                 if c and (slip := _pose(kind, names, counts[:j] + [c - 1] + counts[j + 1:], len(grid)))]
        if slips:
            _, _, bad_steps, bad_answer = teacher_rng.choice(slips)
            teacher = path(bad_steps, bad_answer)
    return {"image": _render(rows, cols, grid), "problem": problem, "solution": solution,
            "teacher_solution": teacher, "answer": str(answer),
            "key_steps": {"Steps": [alts for _, alts in steps]}}


def toy_dataset(split="train", n=1000, seed=0, difficulty=2, teacher_noise=0.0):
    """n toy samples, a deterministic function of (split, n, seed, difficulty, teacher_noise).

    difficulty (cells of 28 px; colours besides white; steps of the reference path):
      1: 2×3 grid, 3 colours, 2 steps — "How many cells are not X?" (6 − X), "twice X".
      2: 2×3 grid, 3 colours, 3 steps — X − Y, X + Y, "more X or Y? A/B/C". Default: after the
         600-step warm-up on the teacher's paths (teacher_noise 0.5) the tiny Qwen2-VL (2.5M
         parameters) describes the grid exactly in 99–100 % of held-out answers but miscounts it
         often: 45–67 % accuracy, room for StepGRPO.
      3: 3×3 grid, 4 colours, 4 steps — X + Y − Z in one equation, "which of X/Y/Z is most? A/B/C".
      4: 3×3 grid, 4 colours, 5 steps — X + Y − Z and X + Y + Z, one operation per step.
    Answers are uniform per question kind, so no question text predicts its answer. "train" and
    "test" draw from disjoint halves of the problem space (`_toy_split`); duplicates may occur
    within a split. Sample: {"id", "image" (PIL RGB), "problem", "solution" (reference path),
    "teacher_solution" (the warm-up path: with probability `teacher_noise` one count is one too
    low and the rest follows from it; else the reference path), "answer", "key_steps"
    {"Steps": [[alternatives], ...]}}. The teacher's slips come from their own random stream, so
    the problems are the same for any `teacher_noise`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"toy split must be 'train' or 'test', got {split!r}")
    if difficulty not in LEVELS:
        raise ValueError(f"toy difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
    if not 0 <= teacher_noise <= 1:
        raise ValueError(f"teacher_noise is a probability in [0, 1], got {teacher_noise!r}")
    rng = random.Random(f"toy|{split}|{seed}|{difficulty}")  # str seeds hash stably across runs
    teacher_rng = random.Random(f"teacher|{split}|{seed}|{difficulty}")  # apart: problems never depend on it
    return [{"id": f"toy-{split}-d{difficulty}-s{seed}-{i}", **_toy_sample(rng, difficulty, split, teacher_rng, teacher_noise)}
            for i in range(n)]


# ---------------------------------------------------------------------------- real data
# Mulberry builds its reflective paths by inserting a wrong step and a reflection prompt such as
# "The previous reasoning step is wrong and let's rethink it again." R1-VL drops those samples.
REFLECTIVE = re.compile(r"previous reasoning step is (?:wrong|incorrect)|let'?s rethink|rethink it again", re.I)


def _read_records(path):
    """("item", [(number, record)]) of a JSON list, or ("line", [(number, record or None if the
    line is not JSON)]) of a JSONL file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return "item", list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a JSON list or JSONL") from e
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError:
                out.append((i, None))
    return "line", out


def _load(path, image_root, convert, stats):
    """Shared skip/count policy. `convert(record, where)` returns the kept dict or a skip reason
    'reason: detail'; reasons are counted, the first detail of each is logged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    root = Path(image_root) if image_root else path.parent
    unit, records = _read_records(path)
    kept, skipped, first = [], {}, {}
    for line, rec in records:
        where = f"{path}:{line}"
        if rec is None:
            out = "malformed JSON: not a JSON value"
        elif not isinstance(rec, dict):
            out = f"malformed JSON: a {type(rec).__name__}, not an object"
        else:
            out = convert(rec, where)
        if isinstance(out, dict):
            img = Path(out["image_path"])
            img = img if img.is_absolute() else root / img
            rid = rec.get("id")
            out = {"id": f"{path.name}:{line}" if rid is None else str(rid), **out, "image_path": str(img)}
            if not img.is_file():
                out = f"missing image: {img}"
        if isinstance(out, str):
            reason, _, detail = out.partition(": ")
            skipped.setdefault(reason, []).append(line)
            first.setdefault(reason, detail)
        else:
            kept.append(out)
    for reason, lines in skipped.items():
        more = ", ..." if len(lines) > 5 else ""
        log.warning("%s: skipped %d record(s), %s (%ss %s%s; first: %s)", path, len(lines), reason,
                    unit, ", ".join(map(str, lines[:5])), more, first[reason])
    if stats is not None:
        stats.update(kept=len(kept), skipped={r: len(v) for r, v in skipped.items()})
    if not kept:
        counts = ", ".join(f"{len(v)} {r}" for r, v in skipped.items()) or "file is empty"
        raise ValueError(f"{path}: no usable records ({counts}); image paths resolve against {root}")
    return kept


def _missing(rec, fields):
    bad = [f for f in fields if not isinstance(rec.get(f), str) or not rec[f].strip()]
    return f"missing field: {', '.join(bad)}" if bad else None


def _rl_record(rec, where):
    missing = _missing(rec, ("image_path", "problem", "solution")) or (
        None if rec.get("key_steps") is not None else "missing field: key_steps")
    if missing:
        return missing
    try:  # takes the dict, the bare list, or a JSON string of either
        steps = rewards.validate_key_steps(rec["key_steps"], where=where)
    except ValueError as e:
        return f"bad key_steps: {e}"
    return {"image_path": rec["image_path"], "problem": rec["problem"], "solution": rec["solution"],
            "key_steps": {"Steps": steps}}


def _sft_record(rec, drop_reflective):
    if "messages" not in rec and "images" not in rec:  # an RL record: the reference path is the response
        missing = _missing(rec, ("image_path", "problem", "solution"))
        out = missing or {"image_path": rec["image_path"], "problem": rec["problem"], "response": rec["solution"]}
    else:
        msgs, images = rec.get("messages"), rec.get("images")
        if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
            return "missing field: images must list exactly one image path"
        roles = [m.get("role") if isinstance(m, dict) else None for m in msgs or []]
        if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in msgs):
            return f"missing field: messages must be one user then one assistant turn (got roles {roles})"
        out = {"image_path": images[0], "problem": msgs[0]["content"].replace("<image>", "").strip(),
               "response": msgs[1]["content"]}
    if isinstance(out, dict) and drop_reflective and REFLECTIVE.search(out["response"]):
        return "reflective (dropped on request): self-correction phrase in the response"
    return out


def load_rl_data(path, image_root=None, stats=None):
    """R1-VL-10K records from a JSON list or JSONL file → [{"id", "image_path", "problem",
    "solution", "key_steps": {"Steps": [[alternatives], ...]}}].

    key_steps may be {"Steps": [...]}, the bare list, or a JSON string of either; it is checked
    with rewards.validate_key_steps. Relative image paths resolve against `image_root`, else the
    data file's folder. Skips malformed JSON, missing fields, missing images and bad key_steps;
    `stats` (a dict), if given, receives {"kept": n, "skipped": {reason: count}}.
    """
    return _load(path, image_root, _rl_record, stats)


def load_sft_data(path, image_root=None, stats=None, drop_reflective=False):
    """Warm-up SFT records → [{"id", "image_path", "problem", "response"}].

    Accepts the Mulberry / LLaMA-Factory format {"messages": [{"role": "user", "content":
    "<image>question"}, {"role": "assistant", "content": reasoning}], "images": [path]} and RL records
    (the solution becomes the response). `drop_reflective` removes samples with a self-correction
    phrase (R1-VL's warm-up, METHOD.md §1), counted as a skip reason. Same checks and `stats` as
    `load_rl_data`.
    """
    return _load(path, image_root, lambda rec, where: _sft_record(rec, drop_reflective), stats)


# ---------------------------------------------------------------------------- key steps from a reference path
_MATH_RUN = re.compile(r"(?:\\[a-zA-Z]+|\\%|\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?|\b[A-Z]{1,3}\b|\b[a-z]\b"
                       r"|[-+*/^()=×÷·√{}%°<>≤≥ \t])+")
_QUANTITY = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s+([A-Za-z]{2,})\b")
_STOP = set("and or is are was the to of in by from with times plus minus divided equals then so "
            "which we that for on at as each per more less than".split())
_TERMS = re.compile(r"\b(?:pythagorean theorem|right triangle|isosceles|equilateral|parallel|perpendicular|"
                    r"similar triangles|congruent|midpoint|diameter|radius|circumference|inscribed angle|"
                    r"central angle|supplementary|complementary|vertical angles|corresponding angles|perimeter|"
                    r"area|volume|average|median|highest|lowest|maximum|minimum|increase|decrease|sum)\b", re.I)
_WORDS = {"=": "equals", "/": "divided by", "×": "times", "*": "times", "+": "plus"}


def _augment(step):
    """Equivalent surface forms of one key step, the original first."""
    plain = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", step)   # LaTeX -> plain
    plain = re.sub(r"\\(?:times|cdot)", "×", re.sub(r"\\(?:left|right)|\$|\\(?=%)", "", plain))
    plain = re.sub(r"\s+", " ", plain).strip()
    alts = [step, plain, re.sub(r"\s*([=+*/×÷])\s*", r"\1", plain)]
    alts.append(re.sub(r"(?<![\w.])(\d+)\s*/\s*(\d+)(?![\w.])", r"\\frac{\1}{\2}", plain))
    sides = [s.strip() for s in plain.split("=")]
    if len(sides) > 1 and all(sides):   # y = x; a chain a = b = c also gives a = c and b = c
        alts += [f"{sides[1]} = {sides[0]}"] if len(sides) == 2 else [
            f"{sides[0]} = {sides[-1]}", f"{sides[-2]} = {sides[-1]}"]
    alts.append(re.sub(r"\s*([=/×*+])\s*", lambda m: f" {_WORDS[m.group(1)]} ", plain))
    m = re.fullmatch(r"(\d+) ([A-Za-z]+)", plain)
    if m and int(m.group(1)) < len(rewards.NUM_WORDS):
        alts.append(f"{rewards.NUM_WORDS[int(m.group(1))]} {m.group(2)}")
    return list(dict.fromkeys(a for a in alts if a))


def key_steps_from_solution(reference_reasoning):
    """Rule-based, deterministic key steps of a reference path: {"Steps": [[alt, ...], ...]}.

    From the '### Step N:' bodies (the whole text if there are none), in order of appearance:
    equations, numbers with the word they count ("3 red"), remaining bare numbers, and short
    (<= 3 words) key phrases: geometry/chart terms, quoted or bold text. Each is augmented into
    equivalent forms. A group is kept only if match_key_steps finds it in the path itself.
    """
    text = rewards.step_text(reference_reasoning) or reference_reasoning
    found = []
    for run in _MATH_RUN.findall(text):
        eq = re.sub(r"(?:\\[a-zA-Z]+|[\s{(=+\-*/^×÷·,])+$", "", run)
        eq = re.sub(r"^[\s)}=+*/^×÷·,]+", "", eq)
        balanced = eq.count("{") == eq.count("}") and eq.count("(") == eq.count(")")
        if "=" in eq and re.search(r"\d", eq) and balanced:
            found.append(eq)
    found += [f"{n} {w}" for n, w in _QUANTITY.findall(text) if w.lower() not in _STOP]
    covered = " ".join(found)
    found += [n for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])", text)
              if not re.search(rf"(?<![\d.]){re.escape(n)}(?!\.?\d)", covered)]
    found += [m.lower() for m in _TERMS.findall(text)]
    found += [q.strip() for pair in re.findall(r"\*\*([^*\n]{1,40})\*\*|[\"“]([^\"”\n]{1,40})[\"”]", text)
              for q in pair if q and len(q.split()) <= 3]
    first = {}   # one group per normalised form, in order of appearance
    for step in found:
        first.setdefault(rewards.normalise(step), step)
    source = "### Step 1:\n" + text
    return {"Steps": [_augment(s) for s in first.values() if rewards.match_key_steps(source, [s])[0] == 1.0]}


# ---------------------------------------------------------------------------- order of reading
def batch_at(dataset, step, per_rank, rank=0, world=1, seed=0):
    """This rank's slice of batch number `step` in an endless stream of per-epoch shuffles.

    Step k of a run covers stream positions [k·B, (k+1)·B), B = per_rank·world, rank r the r-th
    slice. The position is a function of the step, so a resumed run reads exactly what the
    uninterrupted one would have, and any number of ranks reads the same global batch.
    Returns (samples, their stream positions)."""
    size, orders = per_rank * world, {}
    positions = list(range(step * size + rank * per_rank, step * size + (rank + 1) * per_rank))
    for epoch in {pos // len(dataset) for pos in positions}:
        orders[epoch] = random.Random(seed * 1000 + epoch).sample(range(len(dataset)), len(dataset))
    return [dataset[orders[pos // len(dataset)][pos % len(dataset)]] for pos in positions], positions

