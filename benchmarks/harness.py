"""benchmarks/harness.py: one benchmark's records, the question and image each sends, the verdict on each
answer and the metrics, as evaluate.py and training's held-out evaluation (training/heldout.py) both use them.

    recs = load("mathvista", "testmini.json")
    flags, valid = score("mathvista", recs, {"1": "### The final answer is: 1.2"}, "r1vl", Counter())
    metrics("mathvista", recs, flags)          # {"accuracy": ..., "correct": ..., "total": ..., "by_qtype": ...}

The toy task is a benchmark here too ("toy"): its held-out questions, judged by rewards.is_correct, with
format validity (mean StepRVR) and its metrics as fractions in [0, 1]; every other benchmark's are percent.
"""
import base64
import binascii
import io
import random

from PIL import Image

import rewards
from benchmarks import catalog, scorers
from grading import answers
from qwen.images import check_size, load_image
from toy import task as toy

BENCHES = [*catalog.BENCHES, "toy"]


def load(bench, path=None, image_root=None, toy_n=200, seed=0, difficulty=2):
    """The records of `bench` (catalog.load), or `toy_n` held-out toy questions; raises on unusable files."""
    if bench == "toy":
        return [dict(r, images=[r["image"]]) for r in toy.dataset(split="test", n=toy_n, seed=seed, difficulty=difficulty)]
    return catalog.load(bench, path, image_root)


def subset(recs, limit, seed):
    """`limit` records drawn with their own seeded stream (never the global one), kept in file order: the same
    records for the same file, limit and seed, whenever and however often it is drawn."""
    if not limit or limit >= len(recs):
        return list(recs)
    keep = sorted(random.Random(f"heldout|{seed}|{len(recs)}").sample(range(len(recs)), limit))
    return [recs[i] for i in keep]


def question(rec, bench, prompt="r1vl"):
    """The question text sent with the image: catalog.question_text, or the toy question as it is."""
    return rec["problem"] if bench == "toy" else catalog.question_text(rec, prompt)


def open_image(sources):
    """One RGB image from a record's sources (qwen.images.load_image on each); several are pasted side by side on white.
    ValueError for a source that cannot be read or a size the image processor refuses (check_size)."""
    images = []
    for src in sources:
        if isinstance(src, tuple):                     # ("error", why): a source the loader could not resolve
            raise ValueError(src[1])
        if isinstance(src, str):
            try:
                src = base64.b64decode(src, validate=False)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"cannot decode a base64 image: {e}") from e
        images.append(load_image(io.BytesIO(src) if isinstance(src, bytes) else src))
    if len(images) < 2:
        if not images:
            raise ValueError("record has no image")
        return images[0]
    check_size(sum(i.width for i in images), max(i.height for i in images))
    canvas, x = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white"), 0
    for img in images:
        canvas.paste(img, (x, 0))
        x += img.width
    return canvas


def final_answer(text, prompt, counts, extract=False):
    """r1vl: the text after the final-answer header. Else (plain, or r1vl without one: counted) the whole reply,
    which the official rules read themselves; where the official pipeline extracts the answer instead (`extract`),
    the one answers.stated_answer reads ('Final answer: 14', 'the answer is 14 cm', \\boxed{14}, the last line)."""
    answer = rewards.extract_answer(text) if prompt == "r1vl" else None
    if answer is not None:
        return answer
    counts["no_final_answer"] += prompt == "r1vl"
    return (answers.stated_answer(text) or text) if extract else text


def score(bench, recs, preds, prompt, counts, extracted=False):
    """Correct or not, per record (no or an empty prediction is wrong); toy also gives format validity.
    `extracted`: the predictions are final answers already (MathVista: GPT-4's extractions)."""
    flags, valid = [], []
    for r in recs:
        text = preds.get(r["id"])
        counts["missing_predictions" if text is None else "empty_predictions"] += not (text or "").strip()
        if not (text or "").strip():
            flags.append(False)
            valid.append(0.0)
            continue
        extract = bench != "toy" and catalog.BENCHES[bench].extract and not extracted
        reply = rewards.visible_reply(text)
        answer = text if extracted else final_answer(reply, prompt, counts, extract)
        stated = extract and (prompt != "r1vl" or rewards.extract_answer(reply) is None)   # read by stated_answer
        if bench == "toy":
            valid.append(rewards.step_rvr(text))
            flags.append(bool(rewards.is_correct(answer, r["answer"])))
        elif bench == "mathvista":
            flags.append(bool(scorers.score_mathvista(r, answer, extracted=extracted)))
        elif stated:                                   # a stated answer that names no option: the reply's
            flags.append(bool(catalog.BENCHES[bench].score(r, answer, reply=reply)))
        else:
            flags.append(bool(catalog.BENCHES[bench].score(r, answer)))
    return flags, valid


def metrics(bench, recs, flags, valid=()):
    """The benchmark's metrics in percent; the toy's as fractions in [0, 1], as train.py reports them."""
    if bench == "toy":
        n = max(len(flags), 1)
        return {"accuracy": round(sum(flags) / n, 4), "format_valid": round(sum(valid) / n, 4),
                "correct": sum(flags), "total": len(flags)}
    return catalog.metrics(bench, recs, flags)


def headline(bench):
    return "accuracy" if bench == "toy" else catalog.BENCHES[bench].headline
