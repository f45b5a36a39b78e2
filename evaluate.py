"""evaluate.py: measure a model on the R1-VL benchmarks, or score saved predictions, by rule only.

    python evaluate.py --bench mathvista --model Qwen/Qwen2-VL-2B-Instruct --data MathVista_MINI.tsv
    python evaluate.py --bench mme --data eval_tool/Your_Results --image_root MME_Benchmark_release_version \
        --model runs/r1vl-2b --out preds/mme.jsonl
    python evaluate.py --bench mathvision --data MATH-V/data/test.jsonl --predictions run.jsonl --prompt plain
    python evaluate.py --bench mathvista --data testmini.json --predictions gpt4_extractions.jsonl --extracted
    python evaluate.py --bench toy --model tiny --limit 8

Generation is greedy and batched through rollout.generate. Every prediction is appended to --out
({"id", "prediction"} per line, the same format --predictions reads) as soon as its batch is done,
and a re-run with the same --out generates only what is missing. The first line of --out records what
produced it (model, a fingerprint of its weights, prompt, max_new_tokens, data); a run with different
settings refuses to add to it (use a new --out, or --overwrite); the header is written once the model has
loaded, and a run holds a lock on --out, so a second evaluate.py writing the same file stops with one line. An id
given twice with different predictions is refused (the score would depend on line order); generating for records
most of whose images cannot be found is refused (pass --image_root). The last line printed is a JSON summary
(headline number, breakdowns, counts of everything skipped); it is also written to <out stem>.summary.json.
Per benchmark (loader, scorer, metrics, headline): benchmarks/catalog.py; answer rules: benchmarks/scorers.py;
what training's held-out evaluation shares with this file (records, question, image, verdicts): benchmarks/harness.py.

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
"### The final answer is:" (rewards.extract_answer). Without it (--prompt plain, or no header: counted as
no_final_answer) the official rules that read a whole reply get it; where the official pipeline asks an LLM for
the answer (mmstar, mathverse, dynamath's replies without JSON) answers.stated_answer reads it. Then:
  mathvista      accuracy: our regex extraction (mathvista_extract) + the official normalisation by
                 question/answer type and precision; --extracted scores GPT-4 extractions as the official
                 calculate_score.py does. Gaps from raw responses: README and tests/test_evaluate.py.
  mmstar         accuracy (per category, l2 category): the option letter named by the answer.
  mathvision     accuracy (per level, subject): the official rule scorer, reimplemented; its LaTeX numbers are
                 read as latex2sympy2 reads them (benchmarks/latex_value.py).
  chartqa        relaxed accuracy (human, augmented, overall): numbers within 5 %, text exact; an official
                 label is one string ("[2014, 2016]" whole), a TSV's "[...]" answer lists alternatives.
  dynamath       average-case and worst-case accuracy (all 10 variants right): the official rules.
  hallusionbench aAcc, fAcc (all questions of a figure right), qAcc (a question right on all its
                 figures) and their mean, the reported "HallBench" number; yes/no by VLMEvalKit's rule;
                 the 951 questions with an image (the official JSON's 178 text-only ones are left out).
  mathverse      accuracy over the 5 image versions, APPROXIMATE: the official scorer asks an LLM; we
                 match option letters and use rewards.is_correct for free-form answers.
  mme            perception + cognition: per subtask 100·acc + 100·acc+ (both questions of an image
                 right), the official yes/no prefix rule.
  toy            accuracy (rewards.is_correct) and format validity (mean rewards.step_rvr), as FRACTIONS in
                 [0, 1] like train.py's summaries; every benchmark's metrics are percentages ("unit").
Multi-image rows are pasted side by side into one image.
Prompts: the question text of question_text() inside rollout's r1vl or plain instruction. The paper's
numbers came from VLMEvalKit (its own prompts, images of 1003520 to 12845056 pixels); the default
pixel range here is model.py's, as in training (see --min_pixels / --max_pixels / --max_prompt_len).
"""
import argparse
import fcntl
import hashlib
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import model
import rollout
from benchmarks import harness
from benchmarks.harness import final_answer, headline, metrics, open_image, question, score  # noqa: F401 (shared with training)
from qwen import tiny
from toy import task as toy
from training import flags

log = logging.getLogger("evaluate")
BENCHES = harness.BENCHES
BENCH_MAX_NEW_TOKENS = 2048                            # the paper's evaluation budget
TOY_MAX_NEW_TOKENS = toy.MAX_NEW_TOKENS   # the toy preset's, as in training


# ----------------------------------------------------------------------------- predictions and what made them
def weights_fingerprint(name):
    """A short hash of a local model directory's files (names, sizes, small files whole, the first and last
    64 KiB of large ones): cheap, and different for different checkpoints. Hub ids and 'tiny' are themselves."""
    path = Path(name)
    if not path.is_dir():
        return name
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read() if size <= 1 << 20 else fh.read(1 << 16))
            if size > 1 << 20:
                fh.seek(-(1 << 16), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def provenance(args):
    """What produced a predictions file; a resumed run must match it exactly."""
    local = Path(args.model).is_dir()
    return {"bench": args.bench, "model": str(Path(args.model).resolve()) if local else args.model,
            "weights": weights_fingerprint(args.model), "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
            "data": str(Path(args.data).resolve()) if args.data else f"toy level {args.difficulty}",
            "limit": None if args.data else args.limit,
            "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "max_prompt_len": args.max_prompt_len}


def default_out(args):
    """eval/<bench>_<model dir name>_<hash of the full model path>_<prompt>.jsonl: two runs' 'final' differ."""
    full = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    tag = hashlib.sha1(full.encode()).hexdigest()[:8]
    return Path(f"eval/{args.bench}_{Path(args.model.rstrip('/')).name}_{tag}_{args.prompt}.jsonl")


def read_predictions(path, counts, known=None):
    """({id: raw text}, the file's "produced_by" header or None) from a jsonl file; malformed lines
    (a line cut short by a killed run, too) and unknown ids are counted and logged. An id given twice with
    the same text is counted; with different texts the score would depend on line order: refused, one line."""
    preds, header, line_of = {}, None, {}
    if not Path(path).is_file():
        return preds, header
    for n, line in enumerate(open(path, encoding="utf-8-sig"), 1):   # a byte-order mark is not part of line 1
        try:
            row = json.loads(line)
            if n == 1 and isinstance(row, dict) and "produced_by" in row:
                header = row["produced_by"]
                continue
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
        text = text if isinstance(text, str) else ""
        if rid in preds and preds[rid] != text:
            sys.exit(f"{path}: id {rid!r} has two different predictions (lines {line_of[rid]} and {n}); the score "
                     "would depend on line order: keep one line per id")
        if rid in preds:
            counts["duplicate_prediction_ids"] += 1
            log.warning("%s line %d: id %r repeats line %d word for word, counted once", path, n, rid, line_of[rid])
        preds[rid], line_of[rid] = text, line_of.get(rid, n)
    return preds, header


def claim_out(out):
    """Hold an exclusive lock on --out until this run ends (the returned file; closing it lets go), so that a
    second evaluate.py writing the same file stops with one line instead of mixing its predictions in."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = open(out, "a", encoding="utf-8")
    except OSError as e:
        sys.exit(f"cannot write --out {out}: {e.strerror or e}")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        sys.exit(f"another evaluate.py is writing to --out {out}: wait for it to end, or pass another --out")
    return f


def check_out(out, produced_by, overwrite):
    """Refuse to add to an --out made with other settings; True when --out starts afresh (new, empty or
    --overwrite). Nothing is written here: the header goes in once generation starts (start_out)."""
    if overwrite or out.stat().st_size == 0:
        return True
    _, header = read_predictions(out, Counter())
    if header != produced_by:
        diff = sorted(k for k in produced_by if (header or {}).get(k) != produced_by[k])
        sys.exit(f"--out {out} holds predictions made with other settings ({', '.join(diff)} differ"
                 f"{'' if header else ': it has no produced_by header'}); pass a new --out, or --overwrite to replace it")
    return False


def start_out(out, produced_by, fresh):
    """Write --out's produced_by header (fresh), or end a line cut short by a killed run so it stays counted."""
    if fresh:
        out.write_text(json.dumps({"produced_by": produced_by}, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    with open(out, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) != b"\n":
            f.write(b"\n")


def check_images(recs, min_share=0.5):
    """Refuse, in one line, to generate for records most of whose images cannot be found: the images are in
    a folder the loader did not look in. (A few missing ones are skipped and counted as bad_images.)"""
    missing = [next(s[1] for s in r["images"] if isinstance(s, tuple)) for r in recs
               if any(isinstance(s, tuple) for s in r["images"])]
    if recs and len(missing) > min_share * len(recs):
        sys.exit(f"the images of {len(missing)} of {len(recs)} records cannot be read ({missing[0]}): "
                 "pass --image_root, the folder that holds them")


# ----------------------------------------------------------------------------- generation
def generate(recs, preds, args, out_path, counts, produced_by, fresh):
    """Greedy answers for the records without a prediction, appended to out_path batch by batch; out_path's
    header is written once the model has loaded, so a failed load leaves --out as it was."""
    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    todo = [r for r in recs if r["id"] not in preds]
    log.info("%d of %d records to generate (%d already in %s)", len(todo), len(recs), len(recs) - len(todo), out_path)
    if not todo:
        return
    check_images(recs)
    try:
        policy, tokenizer, image_processor = model.load(args.model, device=args.device, dtype=args.dtype,
                                                        build=tiny.builder(args.model), **pixels)
    except (OSError, ValueError) as e:                # e.g. a hub id that cannot be reached or does not exist
        sys.exit(f"cannot load model {args.model!r}: {str(e).strip().splitlines()[0]}")
    start_out(out_path, produced_by, fresh)
    with logging_redirect_tqdm(), tqdm(total=len(todo), desc=f"{args.bench} generate", unit="rec",
                                       file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), args.batch_size):
            generate_batch(todo[start:start + args.batch_size], preds, args, out_path, counts,
                           policy, tokenizer, image_processor)
            bar.update(len(todo[start:start + args.batch_size]))
    if counts["bad_images"] > len(recs) / 2:
        sys.exit(f"the images of {counts['bad_images']} of {len(recs)} records could not be read (the warnings above "
                 f"say why; the other predictions are kept in {out_path}): check --data and --image_root")


def generate_batch(chunk, preds, args, out_path, counts, policy, tokenizer, image_processor):
    batch, images = [], []
    for r in chunk:
        try:
            images.append(open_image(r["images"]))
            batch.append(r)
        except ValueError as e:
            counts["bad_images"] += 1
            log.warning("%s: skipped, %s", r["id"], e)
    if not batch:
        return
    questions = [question(r, args.bench, args.prompt) for r in batch]
    try:
        ro = rollout.generate(policy, tokenizer, image_processor, images, questions, num_samples=1, greedy=True,
                              max_new_tokens=args.max_new_tokens, style=args.prompt, compile=args.compile,
                              **({"max_prompt_len": args.max_prompt_len} if args.max_prompt_len else {}))
    except (RuntimeError, ValueError) as e:           # e.g. out of memory: keep what is done, report the batch
        counts["generation_errors"] += len(batch)
        log.error("batch at record %s failed (%s); its records count as missing", batch[0]["id"], e)
        return
    kept = ro.kept if ro is not None else []
    if len(kept) < len(batch):
        counts["skipped_prompt_too_long"] += len(batch) - len(kept)
        log.warning("prompt too long, skipped: %s", [r["id"] for i, r in enumerate(batch) if i not in kept])
    with open(out_path, "a", encoding="utf-8") as f:
        for text, i in zip(ro.texts if ro is not None else [], kept):
            preds[batch[i]["id"]] = text
            f.write(json.dumps({"id": batch[i]["id"], "prediction": text}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- scoring
# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.ShowDefaults)
    p.add_argument("--bench", required=True, choices=BENCHES, help="benchmark")
    p.add_argument("--data", help="benchmark file or folder (TSV, parquet, official JSON/JSONL/txt); not for toy")
    p.add_argument("--image_root", help="folder holding the images of official JSON files (default: beside them)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id, local directory or 'tiny': generate, then score")
    src.add_argument("--predictions", help="jsonl of {\"id\", \"prediction\"}: score only")
    p.add_argument("--extracted", action="store_true", help="with --predictions: they are final answers already "
                   "(MathVista: GPT-4's `extraction`, scored as the official calculate_score.py)")
    p.add_argument("--prompt", default="r1vl", choices=["r1vl", "plain"], help="R1-VL sections or a short answer")
    p.add_argument("--out", help="predictions jsonl, appended to and resumed "
                                  "(default eval/<bench>_<model name>_<hash of model path>_<prompt>.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming it")
    p.add_argument("--limit", type=int, help="first N records only (toy: N samples, default 200)")
    p.add_argument("--difficulty", type=int, default=2, choices=sorted(toy.LEVELS), help="toy task level")
    p.add_argument("--max_new_tokens", type=int, help=f"generation budget (default {BENCH_MAX_NEW_TOKENS}, the "
                   f"paper's; toy: {TOY_MAX_NEW_TOKENS}, as in training)")
    p.add_argument("--batch_size", type=int, default=8, help="records per generation batch")
    p.add_argument("--compile", action="store_true", help="decode with CUDA graphs (rollout.py; CUDA only)")
    p.add_argument("--min_pixels", type=int, help="image pixel range (default: model.py's, as in training); "
                   "VLMEvalKit's Qwen2-VL runs used 1003520 to 12845056")
    p.add_argument("--max_pixels", type=int, help="upper end of the pixel range (default: model.py's)")
    p.add_argument("--max_prompt_len", type=int, help="longer prompts are skipped and counted (default: rollout's)")
    p.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", help="bf16 / fp32 (default: bf16 on GPU)")
    args = p.parse_args(argv)
    for name in ("limit", "max_new_tokens", "batch_size", "min_pixels", "max_pixels", "max_prompt_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        p.error(f"--min_pixels {args.min_pixels} is above --max_pixels {args.max_pixels}")
    if args.predictions and args.overwrite:
        p.error("--overwrite restarts the --out of a generation; with --predictions nothing is generated")
    if args.bench == "toy" and args.data:
        p.error("--bench toy makes its own questions (--difficulty, --limit): drop --data")
    if args.max_new_tokens is None:
        args.max_new_tokens = TOY_MAX_NEW_TOKENS if args.bench == "toy" else BENCH_MAX_NEW_TOKENS
    return args


def check_inputs(args):
    """Every file and folder named on the command line, before anything is loaded: one line if one is wrong."""
    if args.extracted and not args.predictions:
        sys.exit("--extracted scores saved answers: use it with --predictions, not --model")
    if args.predictions and not Path(args.predictions).is_file():
        sys.exit(f"--predictions {args.predictions} does not exist")
    if args.compile and not model.cuda_config("cuda" if torch.cuda.is_available() else "cpu"):
        sys.exit("--compile captures the decode step as CUDA graphs: it needs a CUDA device")
    if args.model and args.model not in tiny.TINY_MODELS:
        path = Path(args.model).expanduser()
        first = Path(args.model.split("/")[0])
        local = args.model.startswith((".", "/", "~")) or args.model.count("/") != 1 or first.is_dir()
        if local and not path.is_dir():
            sys.exit(f"--model {args.model}: no such directory (a hub id is 'org/name')")
        if path.is_dir() and not (path / "config.json").is_file():
            sys.exit(f"--model {args.model}: no config.json in it; pass the folder a checkpoint was saved to")
    if args.bench != "toy" and not args.data:
        sys.exit(f"--data is required for --bench {args.bench}")
    if args.data and not Path(args.data).exists():
        sys.exit(f"--data {args.data} does not exist")
    if args.out and Path(args.out).is_dir():
        sys.exit(f"--out {args.out} is a folder: pass a file in it, e.g. {Path(args.out) / 'predictions.jsonl'}")


def check_predictions(args, header, preds, counts, min_share=0.5):
    """Refuse, in one line, predictions made for another benchmark or data file: by the produced_by header's
    bench and data (file or folder name, so moved data still scores), or by ids (under min_share of them known)."""
    data = Path(args.data).resolve().name if args.data else f"toy level {args.difficulty}"
    made = f"--predictions {args.predictions} holds predictions made for"
    if header and header.get("bench") != args.bench:
        sys.exit(f"{made} --bench {header.get('bench')} (its produced_by header), not {args.bench}")
    if header and header.get("data") and Path(header["data"]).name != data:
        sys.exit(f"{made} --data {header['data']} (its produced_by header), not {args.data}: pass that file")
    if not preds or len(preds) < min_share * (len(preds) + counts["unknown_prediction_ids"]):
        sys.exit(f"{made} other records: {len(preds)} of its {len(preds) + counts['unknown_prediction_ids']} ids are "
                 f"ids of {args.bench} {args.data or ''} (at least {min_share:.0%} must be); another benchmark or split?")


def load_records(args):
    try:
        return harness.load(args.bench, args.data, args.image_root, toy_n=args.limit or 200, difficulty=args.difficulty)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"cannot read {args.bench} data: {e}")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    check_inputs(args)
    recs = load_records(args)
    ids = {r["id"] for r in recs}                     # --limit keeps the first N; ids are checked against all
    recs = recs[:args.limit] if args.limit and args.bench != "toy" else recs
    counts = Counter()
    log.info("%s: %d records", args.bench, len(recs))
    if args.predictions:
        preds, header = read_predictions(args.predictions, counts, ids)
        check_predictions(args, header, preds, counts)
        preds = {k: v for k, v in preds.items() if k in {r["id"] for r in recs}}
        out = Path(args.out) if args.out else None
    else:
        out = Path(args.out) if args.out else default_out(args)
        with claim_out(out):                          # locked until generation ends
            produced_by = provenance(args)
            fresh = check_out(out, produced_by, args.overwrite)
            preds, _ = ({}, None) if fresh else read_predictions(out, counts, ids)
            generate(recs, preds, args, out, counts, produced_by, fresh)
    flags, valid = score(args.bench, recs, preds, args.prompt, counts, args.extracted)
    if counts["missing_predictions"]:
        log.warning("%d records have no prediction; they count as wrong", counts["missing_predictions"])
    m = metrics(args.bench, recs, flags, valid)
    summary = {"bench": args.bench, "headline": {headline(args.bench): m[headline(args.bench)]},
               "unit": "fraction" if args.bench == "toy" else "percent",
               "source": args.model or args.predictions, "prompt": args.prompt, "data": args.data,
               "records": len(recs), "counts": {k: v for k, v in sorted(counts.items()) if v}, "metrics": m}
    if out is not None:
        out.with_name(out.stem + ".summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    print(json.dumps(summary, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
