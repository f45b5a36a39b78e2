"""training/data.py: real R1-VL data: loaders, image checks, key steps, and the order batches are read in.

The embedded toy task lives in toy/task.py. Every record of a real data file is checked; a bad one is
skipped, counted, and logged as one warning line per reason with its first line numbers; no
usable record → ValueError.
- `load_rl_data`: R1-VL-10K records (image_path, problem, solution, key_steps) for StepGRPO.
- `load_sft_data`: Mulberry / LLaMA-Factory records (`messages` or ShareGPT `conversations`, plus
  `images`) for the warm-up SFT, or RL records with the solution as the response.
Images are kept as paths (a list for a sample of several, each where its <image> tag stands), checked at
load time to exist and to have a readable header (qwen/images.py header_problem: no pixel decode, cheap
enough for every record of a 10K file). An image that passes but fails to decode (a truncated JPEG) is
still skipped by the trainer when it opens it (qwen/images.py load_image, which evaluation uses too).
Sizes the image processor refuses (check_size: an aspect ratio of 200 or more, or over PIL's
decompression-bomb limit) are skipped at both places.
Files are UTF-8, with or without a byte-order mark. A number where text is expected ("solution": 2) is its
text. An image given as a URL (http://, https://, ...) is never fetched: it is a counted skip, or, with
--image_root, the file of its path under that folder (a logged note).

Key steps (`key_steps_from_solution`): an offline, rule-based stand-in for the authors' GPT-4
extraction and augmentation, for data that comes without key steps.
"""
import json
import logging
import math
import random
import re
from pathlib import Path

import rewards
from qwen.images import check_size, header_problem, load_image, load_images  # noqa: F401 (data.load_images)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- real data
# Mulberry's reflective paths are a wrong step, a reflection sentence, then the correct rest. Its
# data construction inserts "I think I have made a mistake. Let me rethink it." (data_construction.py,
# REFLECTION_PROMPT); the paper words it "The previous reasoning step is wrong and let's rethink it
# again." R1-VL drops those samples. Matched: a first-person mistake, a past step called wrong, a
# rethink; not "option B is wrong", "a common mistake", or "Let's think step by step".
REFLECTIVE = re.compile(
    r"\b(?:I|we)(?:\s+think\s+(?:I|we))?(?:\s+have|'ve)?\s+made\s+(?:a\s+|an\s+)?(?:mistake|error)"
    r"|\b(?:previous|last|above|preceding)\s+(?:reasoning\s+)?step\s+(?:is|was)\s+(?:wrong|incorrect)"
    r"|\bre-?think(?:ing)?\b", re.I)


RECORD_KEYS = {"image_path", "problem", "solution", "messages", "conversations", "images"}
SHAPES = "expected a JSON list of records ([{...}, ...]) or JSONL (one record per line)"


def _read_records(path):
    """("item", [(number, record)]) of a JSON list, or ("line", [(number, record or None if the
    line is not JSON)]) of a JSONL file. A byte-order mark is ignored; a file that is one JSON object
    (pretty-printed, or one that wraps the list of records) is an error saying so."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            return "item", list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); {SHAPES}") from e
    if text.lstrip().startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None        # JSONL: one object per line
        wrapped = [k for k, v in (whole or {}).items() if isinstance(v, list) and v
                   and all(isinstance(r, dict) and RECORD_KEYS & set(r) for r in v)]
        if wrapped:
            raise ValueError(f"{path}: one JSON object whose {wrapped[0]!r} holds {len(whole[wrapped[0]])} records; "
                             f"{SHAPES}: pass that list itself")
        if isinstance(whole, dict) and len(text.strip().splitlines()) > 1:
            raise ValueError(f"{path}: one JSON object over {len(text.strip().splitlines())} lines "
                             f"(keys {', '.join(list(whole)[:5])}); {SHAPES}")
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError:
                out.append((i, None))
    return "line", out


def _find_image(name, root):
    """(path, relocated) of the image a record names, or (None, False). A relative path is under
    `root`; one not found there (an absolute path from another machine, say) is retried as its
    trailing components under `root`, longest first: /mnt/x/1.png → mnt/x/1.png, x/1.png, 1.png.
    Two names relocated to one file are ambiguous: `_load` skips both."""
    path = Path(name)
    full = path if path.is_absolute() else root / path
    if full.is_file():
        return full, False
    for i in range(1, len(path.parts)):
        if (root / Path(*path.parts[i:])).is_file():
            return root / Path(*path.parts[i:]), True
    return None, False


def _resolve_image(name, root, image_root):
    """(path, the name it was relocated from, or None) of one image a record names, or a skip reason: a URL
    (looked up under --image_root only, never fetched), a missing file, an unreadable or unusable image."""
    url = _URL.match(name)
    if url and not image_root:
        return (f"image is a URL: {name} (URLs are not fetched: download the images, then pass their folder as "
                "--image_root)")
    img, relocated = _find_image(name[url.end():] if url else name, root)
    if img is None:
        return (f"image is a URL: {name} (URLs are not fetched, and no file of its path is under {root})" if url
                else f"missing image: {root / name}")
    bad = header_problem(img)
    return f"{bad[0]}: {img} ({bad[1]})" if bad else (img, name if relocated or url else None)


_URL = re.compile(r"[a-z][a-z0-9+.-]*://", re.I)    # http://, https://, s3://: never fetched


# What to do when a file has no usable record, by skip reason.
_ADVICE = {"SFT record": "this is warm-up data: run it with --stage sft",
           "missing key_steps": "pass --derive_key_steps to derive them from each solution",
           "missing image": "image paths resolve against {root}: set --image_root",
           "image is a URL": "download the images, then pass their folder as --image_root"}


def _load(path, image_root, convert, stats, notes):
    """Shared skip/count policy. `convert(record, where)` returns the kept dict (with "_note", one of
    `notes`, if it was changed on the way) or a skip reason 'reason: detail'; reasons are counted,
    the first detail of each is logged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    root = Path(image_root) if image_root else path.parent
    unit, records = _read_records(path)
    kept, skipped, first, noted = [], {}, {}, dict.fromkeys(("relocated_images",) + notes, 0)
    sources, lost, urls = {}, set(), 0   # relocated file → the names that led to it; lines skipped; URLs relocated

    def skip(why, line):
        reason, _, detail = why.partition(": ")
        skipped.setdefault(reason, []).append(line)
        first.setdefault(reason, detail)
        lost.add(line)

    for line, rec in records:
        where = f"{path}:{line}"
        if rec is None:
            out = "malformed JSON: not a JSON value"
        elif not isinstance(rec, dict):
            out = f"malformed JSON: a {type(rec).__name__}, not an object"
        else:
            out = convert(rec, where)
        if isinstance(out, dict):
            names = out["image_path"] if isinstance(out["image_path"], list) else [out["image_path"]]
            found = [_resolve_image(name, root, image_root) for name in names]
            bad = next((f for f in found if isinstance(f, str)), None)
            if bad:
                out = bad
            else:
                rid = rec.get("id")
                for img, src in found:
                    sources.setdefault(str(img), set()).add(src or str(img))
                paths = [str(img) for img, _ in found]
                out = {"id": f"{path.name}:{line}" if rid is None else str(rid), **out,
                       "image_path": paths if isinstance(out["image_path"], list) else paths[0],
                       "_line": line, "_from": [(str(img), src) for img, src in found]}
        if isinstance(out, str):
            skip(out, line)
        else:
            kept.append(out)
    for out in kept:        # relocations: each file may stand for one name only
        for img, src in out["_from"]:
            names = sources.get(img, ())
            if src is not None and len(names) > 1 and out["_line"] not in lost:
                other = sorted(names - {src})[0]
                skip(f"ambiguous image path: {src} and {other} both relocate to {img}", out["_line"])
    kept = [r for r in kept if r["_line"] not in lost]
    for out in kept:
        moved = [src for _, src in out.pop("_from") if src is not None]
        noted["relocated_images"] += len(moved)
        urls += sum(bool(_URL.match(src)) for src in moved)
        out.pop("_line")
        if "_note" in out:
            noted[out.pop("_note")] += 1
    if urls:
        log.warning("%s: %d image URL(s) not fetched: each was taken as the file of its path under --image_root %s",
                    path, urls, root)
    if noted["relocated_images"] > urls:
        log.warning("%s: %d image path(s) not found as given were relocated to their trailing part under %s",
                    path, noted["relocated_images"] - urls, root)
    for reason, lines in skipped.items():
        lines.sort()
        more = ", ..." if len(lines) > 5 else ""
        log.warning("%s: skipped %d record(s), %s (%ss %s%s; first: %s)", path, len(lines), reason,
                    unit, ", ".join(map(str, lines[:5])), more, first[reason])
    for note, n in noted.items():
        if n and note != "relocated_images":
            log.info("%s: %s: %d record(s)", path, note.replace("_", " "), n)
    if stats is not None:
        stats.update(kept=len(kept), skipped={r: len(v) for r, v in skipped.items()}, **noted)
    if not kept:
        counts = ", ".join(f"{len(v)} {r}" for r, v in skipped.items()) or "file is empty"
        advice = "".join(f"; {_ADVICE[r].format(root=root)}" for r in skipped if r in _ADVICE)
        raise ValueError(f"{path}: no usable records ({counts}){advice}")
    return kept


def _text(value):
    """A field's text: a string as it is, a number as its text ("solution": 2 is "2"); else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def _missing(rec, fields, images=True):
    """'missing field: ...' for the fields without text; image_path by `images` (a path or a list found)."""
    bad = [f for f in fields if not (images if f == "image_path" else (_text(rec.get(f)) or "").strip())]
    return f"missing field: {', '.join(bad)}" if bad else None


def _image_list(value):
    """A record's image paths: one path (a number too), or a non-empty list of paths; None if neither."""
    if isinstance(value, list):
        return value if value and all((_text(v) or "").strip() for v in value) else None
    return [_text(value)] if (_text(value) or "").strip() else None


def _placed(problem, images, response=""):
    """{"problem", "image_path"} with the images where the question's <image> tags stand, or a skip reason. One
    image: its tag, if any, is dropped (the image goes first, as the prompt always puts it); several: one tag
    per image in the question, kept where written (model.prompt_text places them)."""
    images = [_text(i) for i in images]
    tags, stray = problem.count("<image>") + response.count("<image>"), "<image>" in response
    if len(images) == 1 and tags <= 1:
        return {"problem": problem.replace("<image>", "").strip(), "image_path": images[0]}
    if tags != len(images) or stray:
        return (f"image tags do not match images: {tags} <image> tag(s){' (in the answer)' if stray else ''} "
                f"for {len(images)} images")
    return {"problem": problem.strip(), "image_path": images}


def _rl_record(rec, where, derive_key_steps):
    if "messages" in rec or "conversations" in rec:
        return "SFT record: has messages/conversations, not image_path/problem/solution/key_steps"
    images = _image_list(rec.get("image_path"))
    missing = _missing(rec, ("image_path", "problem", "solution"), images is not None)
    if missing:
        return missing
    placed = _placed(_text(rec["problem"]), images)
    if isinstance(placed, str):
        return placed
    out = {"image_path": placed["image_path"], "problem": placed["problem"], "solution": _text(rec["solution"])}
    steps = None
    if rec.get("key_steps") is not None:
        try:  # takes the dict, the bare list, or a JSON string of either
            steps = rewards.validate_key_steps(rec["key_steps"], where=where)
        except ValueError as e:
            return f"bad key_steps: {e}"
    if steps:
        return {**out, "key_steps": {"Steps": steps}}
    if not derive_key_steps:
        return "missing key_steps: none given"
    steps = key_steps_from_solution(rec["solution"])["Steps"]
    if not steps:
        return "no derivable key_steps: the solution has no equation, number or key phrase"
    return {**out, "key_steps": {"Steps": steps}, "_note": "derived_key_steps"}


# LLaMA-Factory's two chat formats: OpenAI-style role/content and ShareGPT from/value.
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def _sft_record(rec, drop_reflective):
    chat = rec.get("messages", rec.get("conversations"))
    if chat is None:   # an RL record: the reference path is the response
        images = _image_list(rec.get("image_path"))
        out = _missing(rec, ("image_path", "problem", "solution"), images is not None)
        out = out or _placed(_text(rec["problem"]), images)
        if isinstance(out, dict):
            out = {**out, "response": _text(rec["solution"])}
    else:
        turns = [(_ROLES.get(m.get("role", m.get("from"))), m.get("content", m.get("value")))
                 if isinstance(m, dict) else (None, None) for m in chat if isinstance(chat, list)]
        system = bool(turns) and turns[0][0] == "system"
        turns = turns[1:] if system else turns
        roles = [role for role, _ in turns]
        images = _image_list(rec.get("images"))     # Mulberry's own data gives one path, LLaMA-Factory a list
        if images is None:
            return "missing field: images must be an image path or a list of them"
        turns = [(role, _text(text)) for role, text in turns]
        if roles != ["user", "assistant"] or not all(isinstance(text, str) for _, text in turns):
            return f"missing field: messages/conversations must be one user then one assistant turn (got {roles})"
        out = _placed(turns[0][1], images, turns[1][1])
        if isinstance(out, str):
            return out
        out["response"] = turns[1][1]
        if system:
            out["_note"] = "system_turns_ignored"
    if isinstance(out, dict) and drop_reflective and REFLECTIVE.search(out["response"]):
        return "reflective (dropped on request): self-correction phrase in the response"
    return out


def load_rl_data(path, image_root=None, stats=None, derive_key_steps=False):
    """R1-VL-10K records from a JSON list or JSONL file → [{"id", "image_path", "problem",
    "solution", "key_steps": {"Steps": [[alternatives], ...]}}].

    key_steps may be {"Steps": [...]}, the bare list, or a JSON string of either; it is checked
    with rewards.validate_key_steps. A record without key steps is skipped, or with
    `derive_key_steps` given `key_steps_from_solution(solution)` (skipped if that finds none).
    Relative image paths resolve against `image_root`, else the data file's folder; a path not
    found is retried as its trailing components under that folder. Skips malformed JSON, missing
    fields, SFT records, missing or unreadable images and bad key_steps. `stats` (a dict), if given,
    receives {"kept", "skipped": {reason: count}, "relocated_images", "derived_key_steps"}. The
    ValueError for a file with no usable record says what to do (--stage sft, --derive_key_steps,
    --image_root).
    """
    return _load(path, image_root, lambda rec, where: _rl_record(rec, where, derive_key_steps), stats,
                 ("derived_key_steps",))


def load_sft_data(path, image_root=None, stats=None, drop_reflective=False):
    """Warm-up SFT records → [{"id", "image_path", "problem", "response"}].

    Accepts the Mulberry / LLaMA-Factory formats, {"messages": [{"role": "user", "content":
    "<image>question"}, {"role": "assistant", "content": reasoning}], "images": [path] or path}
    and ShareGPT {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]},
    and RL records (the solution becomes the response). A leading system turn is ignored (R1-VL's
    prompt has none) and counted in stats["system_turns_ignored"]. `drop_reflective` removes
    samples with a self-correction sentence (as in R1-VL's warm-up), counted as a skip reason.
    Same image checks and `stats` as `load_rl_data`.
    """
    return _load(path, image_root, lambda rec, where: _sft_record(rec, drop_reflective), stats,
                 ("system_turns_ignored",))


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

