"""evaluate.py: measure a model on the R1-VL benchmarks, or score saved predictions, by rule only.

    python evaluate.py --bench mathvista --model Qwen/Qwen2-VL-2B-Instruct --data MathVista_MINI.tsv
    python evaluate.py --bench mme --data eval_tool/Your_Results --image_root MME_Benchmark_release_version \
        --model runs/r1vl-2b --out preds/mme.jsonl
    python evaluate.py --bench mathvision --data MATH-V/data/test.jsonl --predictions run.jsonl --prompt plain
    python evaluate.py --bench toy --model tiny --limit 8

Generation is greedy and batched through rollout.generate. Every prediction is appended to --out
({"id", "prediction"} per line, the same format --predictions reads) as soon as its batch is done,
and a re-run with the same --out generates only what is missing. The last line printed is a JSON
summary (headline number, breakdowns, counts of everything skipped); it is also written to
<out stem>.summary.json. Loaders and answer rules: eval_benchmarks.py (SCORE picks one per benchmark).

Record ids, the "id" of a predictions line (a data file's own identifiers):
| bench | official files | VLMEvalKit TSV | HF parquet |
|---|---|---|---|
| mathvista | `pid` ("1".."1000") | `index` | `pid` |
| mmstar | – | `index` | `index` |
| mathvision | `id` ("1".."3040") | `index` | `id` |
| chartqa | `<file stem>/<0-based row>`, e.g. `test_human/0` | `index` | `<file stem>/<0-based row>` |
| dynamath | `<question>/<variant>`, e.g. `17/3` (N of `trialN/`) | `index` | `<id>/<N of "variantN" in the file name>` |
| hallusionbench | `<category>/<subcategory>/<set_id>/<figure_id>/<question_id>`: `VS/chart/0/1/0` | `index` | as official |
| mathverse | `sample_index` | `index` | `sample_index` |
| mme | `<file stem>/<1-based line>`, e.g. `existence/1` | `index` | `<file stem>/<0-based row>` |
| toy | the sample's `id` | – | – |

Answers are judged by rule, never by an LLM. With --prompt r1vl the final answer is the text after
"### The final answer is:" (rewards.extract_answer; the whole reply if there is none, counted as
no_final_answer); with --prompt plain the whole reply is the answer. Then each benchmark's rules:
  mathvista      accuracy: our regex extraction (mathvista_extract) + the official normalisation by
                 question/answer type and precision. Measured on the published outputs of Bard, IDEFICS
                 and LLaVA: within 2.1 points of the GPT-4 extraction (tests/test_evaluate.py).
  mmstar         accuracy (per category, l2 category): the option letter named by the answer.
  mathvision     accuracy (per level, subject): the official rule scorer, reimplemented.
  chartqa        relaxed accuracy (human, augmented, overall): numbers within 5 %, text exact.
  dynamath       average-case and worst-case accuracy (all 10 variants right): the official rules.
  hallusionbench aAcc, fAcc (all questions of a figure right), qAcc (a question right on all its
                 figures) and their mean, the reported "HallBench" number; yes/no by VLMEvalKit's rule;
                 the 951 questions with an image (the official JSON's 178 text-only ones are left out).
  mathverse      accuracy over the 5 image versions, APPROXIMATE: the official scorer asks an LLM; we
                 match option letters and use rewards.is_correct for free-form answers.
  mme            perception + cognition: per subtask 100·acc + 100·acc+ (both questions of an image
                 right), the official yes/no prefix rule.
  toy            accuracy (rewards.is_correct) and format validity (mean rewards.step_rvr).
Multi-image rows are pasted side by side into one image (rollout takes one image per question).
Prompts: the question text of question_text() inside rollout's r1vl or plain instruction. The paper's
numbers came from VLMEvalKit (its own prompts, images of 1003520 to 12845056 pixels); the default
pixel range here is model.py's, as in training (see --min_pixels / --max_pixels / --max_prompt_len).
"""
import argparse
import base64
import binascii
import io
import json
import logging
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

import eval_benchmarks as eb

log = logging.getLogger("evaluate")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
BENCHES = ["mathvista", "mmstar", "mathvision", "chartqa", "dynamath", "hallusionbench", "mathverse", "mme", "toy"]
HEADLINE = {"mathvista": "accuracy", "mmstar": "accuracy", "mathvision": "accuracy", "chartqa": "relaxed_accuracy",
            "dynamath": "average_case", "hallusionbench": "mean_aAcc_fAcc_qAcc", "mathverse": "accuracy_approx",
            "mme": "perception_plus_cognition", "toy": "accuracy"}


# ----------------------------------------------------------------------------- aggregation
def pct(correct, total):
    return round(100.0 * correct / total, 2) if total else 0.0


def by_group(recs, flags, key):
    """{value of rec[key]: {"accuracy", "correct", "total"}}, the layout of MathVista's scores files."""
    groups = defaultdict(list)
    for r, f in zip(recs, flags):
        groups[str(r[key])].append(f)
    return {k: {"accuracy": pct(sum(v), len(v)), "correct": sum(v), "total": len(v)} for k, v in sorted(groups.items())}


def all_right(recs, flags, key_fn):
    """Share (%, unrounded) of the groups key_fn(rec) whose members are all correct; key None = left out."""
    groups = defaultdict(list)
    for r, f in zip(recs, flags):
        if key_fn(r) is not None:
            groups[key_fn(r)].append(f)
    return 100.0 * sum(all(v) for v in groups.values()) / max(len(groups), 1)


def hallusion_metrics(recs, flags):
    """aAcc per question; fAcc per figure (category, subcategory, set, figure; the official scorer
    leaves out VS figure 0, the question asked without its chart); qAcc per question (category,
    subcategory, set, question) over all its figures. The reported number is the mean of the three."""
    def figure(r):
        return None if r["category"] == "VS" and str(r["figure"]) == "0" else (
            r["category"], r["subcategory"], r["set"], r["figure"])
    m = {"aAcc": 100.0 * sum(flags) / max(len(flags), 1), "fAcc": all_right(recs, flags, figure),
         "qAcc": all_right(recs, flags, lambda r: (r["category"], r["subcategory"], r["set"], r["qnum"]))}
    return {**{k: round(v, 2) for k, v in m.items()}, "mean_aAcc_fAcc_qAcc": round(sum(m.values()) / 3, 2)}


def mme_metrics(recs, flags):
    """Per subtask acc, acc+ (both questions of one image right) and 100·(acc + acc+); the sums per group."""
    out, sub = {"perception": 0.0, "cognition": 0.0}, {}
    for cat in sorted({r["category"] for r in recs}):
        rs, fs = zip(*[(r, f) for r, f in zip(recs, flags) if r["category"] == cat])
        acc, acc_plus = 100.0 * sum(fs) / len(fs), all_right(rs, fs, lambda r: r["pair"])
        sub[cat] = {"acc": round(acc, 2), "acc_plus": round(acc_plus, 2), "score": round(acc + acc_plus, 2)}
        out["cognition" if cat in MME_COGNITION else "perception"] += acc + acc_plus
    return {"perception": round(out["perception"], 2), "cognition": round(out["cognition"], 2),
            "perception_plus_cognition": round(sum(out.values()), 2), "subtasks": sub}


def dynamath_metrics(recs, flags):
    """Average case: over all question variants. Worst case: seed questions right in every variant."""
    return {"average_case": pct(sum(flags), len(flags)),
            "worst_case": round(all_right(recs, flags, lambda r: r["qid"]), 2),
            "by_subject": by_group(recs, flags, "subject"), "by_level": by_group(recs, flags, "level")}


def metrics(bench, recs, flags, valid=()):
    acc = {"accuracy": pct(sum(flags), len(flags)), "correct": sum(flags), "total": len(flags)}
    if bench == "mathvista":
        return dict(acc, **{f"by_{k}": by_group(recs, flags, k) for k in ("qtype", "atype", "task")})
    if bench == "mmstar":
        return dict(acc, by_category=by_group(recs, flags, "category"), by_l2_category=by_group(recs, flags, "l2"))
    if bench == "mathvision":
        return dict(acc, by_level=by_group(recs, flags, "level"), by_subject=by_group(recs, flags, "subject"))
    if bench == "chartqa":
        return dict(relaxed_accuracy=acc["accuracy"], by_split=by_group(recs, flags, "split"))
    if bench == "mathverse":
        return dict(accuracy_approx=acc["accuracy"], by_version=by_group(recs, flags, "version"),
                    by_subject=by_group(recs, flags, "subject"))
    if bench == "toy":
        return dict(acc, format_validity=round(100.0 * sum(valid) / max(len(valid), 1), 2))
    return {"dynamath": dynamath_metrics, "hallusionbench": hallusion_metrics, "mme": mme_metrics}[bench](recs, flags)


# ----------------------------------------------------------------------------- predictions
def read_predictions(path, counts, known=None):
    """{id: raw text} from a jsonl file; malformed lines and unknown ids are counted and logged."""
    preds = {}
    if not Path(path).is_file():
        return preds
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        try:
            row = json.loads(line)
            rid, text = str(row["id"]), row["prediction"]
        except (ValueError, KeyError, TypeError):
            if line.strip():
                counts["malformed_prediction_lines"] += 1
                log.warning("%s line %d: not a {\"id\", \"prediction\"} JSON object, ignored", path, n)
            continue
        if known is not None and rid not in known:
            counts["unknown_prediction_ids"] += 1
            if counts["unknown_prediction_ids"] <= 5:
                log.warning("%s line %d: id %r is not in the data, ignored", path, n, rid)
            continue
        counts["duplicate_prediction_ids"] += rid in preds
        preds[rid] = text if isinstance(text, str) else ""
    return preds


def open_image(sources):
    """One RGB image from a record's sources; several are pasted side by side on white."""
    images = []
    for s in sources:
        if isinstance(s, tuple):
            raise ValueError(s[1])
        try:
            img = s if isinstance(s, Image.Image) else Image.open(
                s if isinstance(s, Path) else io.BytesIO(s if isinstance(s, bytes) else base64.b64decode(s)))
            images.append(img.convert("RGB"))
        except (OSError, ValueError, binascii.Error) as e:
            raise ValueError(f"cannot decode image ({type(s).__name__} source): {e}") from e
    if len(images) < 2:
        if not images:
            raise ValueError("record has no image")
        return images[0]
    canvas, x = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white"), 0
    for img in images:
        canvas.paste(img, (x, 0))
        x += img.width
    return canvas


def question_text(rec, style):
    """The question sent to the model, with its options and each prompt style's wording.

    plain follows VLMEvalKit's Qwen2-VL prompts ("Options:\nA. ..."); r1vl follows R1-VL's
    evaluation ("Choices:\nA: ...", and HallusionBench's yes/no asked as choices A: Yes / B: No).
    """
    kind, q, plain = rec.get("kind"), rec["question"], style == "plain"
    if kind == "mcq":
        head, sep = ("Options", ". ") if plain else ("Choices", ": ")
        opts = "".join(f"\n{L}{sep}{o}" for L, o in zip(eb.LETTERS, rec["options"]))
        return (f"{rec['hint']}{'Question: ' if plain else ''}{q}" + (f"\n{head}:{opts}" if opts else "")
                + f"\nPlease select the correct answer from the {head.lower()} above.")
    if kind == "yn":
        return q + (" Please answer yes or no." if plain else "\nChoices:\nA: Yes\nB: No")
    return q


def final_answer(text, prompt, counts):
    """r1vl: the text after the final-answer header (else the whole reply, counted); plain: the whole reply."""
    if prompt == "plain":
        return text
    import rewards
    answer = rewards.extract_answer(text)
    if answer is None:
        counts["no_final_answer"] += 1
        return text
    return answer


def generate(recs, preds, args, out_path, counts):
    """Greedy answers for the records without a prediction, appended to out_path batch by batch."""
    import model
    import rollout
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    policy, tokenizer, image_processor = model.load(args.model, device=args.device, dtype=args.dtype, **pixels)
    todo = [r for r in recs if r["id"] not in preds]
    log.info("%d of %d records to generate (%d already in %s)", len(todo), len(recs), len(recs) - len(todo), out_path)
    for start in range(0, len(todo), args.batch_size):
        batch, images = [], []
        for r in todo[start:start + args.batch_size]:
            try:
                images.append(open_image(r["images"]))
                batch.append(r)
            except ValueError as e:
                counts["bad_images"] += 1
                log.warning("%s: skipped, %s", r["id"], e)
        if not batch:
            continue
        questions = [r["problem"] if args.bench == "toy" else question_text(r, args.prompt) for r in batch]
        try:
            ro = rollout.generate(policy, tokenizer, image_processor, images, questions, num_samples=1, greedy=True,
                                  max_new_tokens=args.max_new_tokens, style=args.prompt,
                                  **({"max_prompt_len": args.max_prompt_len} if args.max_prompt_len else {}))
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: keep what is done, report the batch
            counts["generation_errors"] += len(batch)
            log.error("batch at record %d failed (%s); its records count as missing", start, e)
            continue
        kept = ro.kept if ro is not None else []
        if len(kept) < len(batch):
            counts["skipped_prompt_too_long"] += len(batch) - len(kept)
            log.warning("prompt too long, skipped: %s", [r["id"] for i, r in enumerate(batch) if i not in kept])
        with open(out_path, "a", encoding="utf-8") as f:
            for text, i in zip(ro.texts if ro is not None else [], kept):
                preds[batch[i]["id"]] = text
                f.write(json.dumps({"id": batch[i]["id"], "prediction": text}, ensure_ascii=False) + "\n")
        log.info("%d / %d generated", min(start + args.batch_size, len(todo)), len(todo))


def score_mathvision(rec, answer):
    """MATH-V's official rule: the extracted answer equals the gold letter or its option text (eb.mathvision_extract,
    eb.mathvision_equal). One addition: for multiple choice, R1-VL's answer style 'B: 8' is its letter."""
    if rec["options"] and (m := re.match(r"([A-E]):\s", answer.strip())):
        return m.group(1) == rec["answer"]
    pred = eb.mathvision_extract(answer)
    gold_text = rec["options"][eb.LETTERS.index(rec["answer"])] if rec["options"] else ""
    return eb.mathvision_equal(pred, rec["answer"]) or eb.mathvision_equal(pred, gold_text)


# The rule that judges one answer, per benchmark (toy: rewards.is_correct, in score()).
SCORE = {"mathvista": eb.score_mathvista, "mathvision": score_mathvision, "dynamath": eb.score_dynamath,
         "hallusionbench": eb.score_hallusionbench, "mathverse": eb.score_mathverse,
         "mmstar": lambda rec, answer: eb.option_letter(answer, "ABCD", rec["options"]) == rec["answer"],
         "chartqa": lambda rec, answer: any(eb.relaxed_correct(answer, str(t)) for t in rec["answer"]),
         "mme": lambda rec, answer: eb.mme_label(answer) == rec["answer"]}


def score(bench, recs, preds, prompt, counts):
    """Correct or not, per record (no or an empty prediction is wrong); toy also gives format validity."""
    flags, valid = [], []
    for r in recs:
        text = preds.get(r["id"])
        counts["missing_predictions" if text is None else "empty_predictions"] += not (text or "").strip()
        answer = final_answer(text, prompt, counts) if (text or "").strip() else None
        if bench == "toy":
            import rewards
            valid.append(rewards.step_rvr(text) if answer is not None else 0.0)
            flags.append(answer is not None and bool(rewards.is_correct(answer, r["answer"])))
        else:
            flags.append(answer is not None and bool(SCORE[bench](r, answer)))
    return flags, valid


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True, choices=BENCHES, help="benchmark")
    p.add_argument("--data", help="benchmark file or folder (TSV, parquet, official JSON/JSONL/txt); not for toy")
    p.add_argument("--image_root", help="folder holding the images of official JSON files (default: beside them)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id, local directory or 'tiny': generate, then score")
    src.add_argument("--predictions", help="jsonl of {\"id\", \"prediction\"}: score only")
    p.add_argument("--prompt", default="r1vl", choices=["r1vl", "plain"], help="R1-VL sections or a short answer")
    p.add_argument("--out", help="predictions jsonl, appended to and resumed "
                                  "(default eval/<bench>_<model>_<prompt>.jsonl)")
    p.add_argument("--limit", type=int, help="first N records only (toy: N samples, default 200)")
    p.add_argument("--max_new_tokens", type=int, default=2048, help="the paper's evaluation budget")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--min_pixels", type=int, help="image pixel range (default: model.py's, as in training); "
                   "VLMEvalKit's Qwen2-VL runs used 1003520 to 12845056")
    p.add_argument("--max_pixels", type=int)
    p.add_argument("--max_prompt_len", type=int, help="longer prompts are skipped and counted (default: rollout's)")
    p.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", help="bf16 / fp32 (default: bf16 on GPU)")
    return p.parse_args(argv)


def load_records(args):
    if args.bench == "toy":
        import data
        recs = data.toy_dataset(split="test", n=args.limit or 200, seed=0)
        return [dict(r, images=[r["image"]]) for r in recs]
    if not args.data:
        sys.exit(f"--data is required for --bench {args.bench}")
    try:
        recs = eb.load(args.bench, args.data, args.image_root)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"cannot read {args.bench} data: {e}")
    return recs


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    recs = load_records(args)
    ids = {r["id"] for r in recs}                     # --limit keeps the first N; ids are checked against all
    recs = recs[:args.limit] if args.limit and args.bench != "toy" else recs
    counts = Counter()
    log.info("%s: %d records", args.bench, len(recs))
    if args.predictions:
        if not Path(args.predictions).is_file():
            sys.exit(f"--predictions {args.predictions} does not exist")
        preds = read_predictions(args.predictions, counts, ids)
        preds = {k: v for k, v in preds.items() if k in {r["id"] for r in recs}}
        out = Path(args.out) if args.out else None
    else:
        tag = Path(args.model.rstrip("/")).name
        out = Path(args.out or f"eval/{args.bench}_{tag}_{args.prompt}.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        preds = read_predictions(out, counts, ids)
        generate(recs, preds, args, out, counts)
    flags, valid = score(args.bench, recs, preds, args.prompt, counts)
    if counts["missing_predictions"]:
        log.warning("%d records have no prediction; they count as wrong", counts["missing_predictions"])
    m = metrics(args.bench, recs, flags, valid)
    summary = {"bench": args.bench, "headline": {HEADLINE[args.bench]: m[HEADLINE[args.bench]]},
               "source": args.model or args.predictions, "prompt": args.prompt, "data": args.data,
               "records": len(recs), "counts": {k: v for k, v in sorted(counts.items()) if v}, "metrics": m}
    if out is not None:
        out.with_name(out.stem + ".summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print(json.dumps(summary, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
