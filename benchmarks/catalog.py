"""benchmarks/catalog.py: one entry per R1-VL benchmark (BENCHES): how its files are read into records, the rule
that judges one answer (scorers.py), how the judgements add up, and the headline number.

Adding a benchmark: a converter (row -> record), its FILES patterns, a scorer, and one Bench line.

Formats, detected from the file (a folder is searched for the benchmark's files): VLMEvalKit TSV (base64
images; an image cell of at most 64 characters is the `index` of the row whose image it reuses; a "[...]"
cell holds several images), Hugging Face parquet (image structs; pyarrow is imported only for these), and
the official JSON / JSONL / MME txt lists with an image folder. Record: {"id" (per benchmark and format: the
table in evaluate.py), "images" (sources, decoded only when a model runs), "question", "answer", ...}.
Metrics are percentages, as the official scorers print them.
"""
import ast
import csv
import json
import math
import re
import sys
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks import scorers
from benchmarks.scorers import LETTERS

# What a --data folder is searched for, per benchmark: the first pattern with matches wins (official
# files, VLMEvalKit TSV, then the evaluated split of the Hugging Face parquet shards).
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
FILES = {"mathvista": ["testmini.json", "*.tsv", "testmini*.parquet"], "mmstar": ["*.tsv", "*.parquet"],
         "mathvision": ["test.jsonl", "*.tsv", "test-*.parquet"], "chartqa": ["test_*.json", "*.tsv", "test-*.parquet"],
         "dynamath": ["trial*/dataset.json", "dataset.json", "*.tsv", "*variant*.parquet"],
         "hallusionbench": ["HallusionBench.json", "*.tsv", "image-*.parquet"],
         "mathverse": ["testmini.json", "*.tsv", "testmini*.parquet"], "mme": ["*.txt", "*.tsv", "*.parquet"]}


# ----------------------------------------------------------------------------- reading files
def find_files(bench, path):
    """The data files of `path`: itself if a file, else the files of FILES[bench] found below it."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path} does not exist")
    for pattern in FILES[bench]:
        if found := sorted(p for p in path.rglob(pattern) if p.name.lower() != "readme.txt"):
            return found
    raise FileNotFoundError(f"no {bench} data under {path}: expected one of {FILES[bench]}, or pass the file")


def read_rows(path):
    """Rows of a TSV, parquet, JSON (a list, or a dict: its key goes in "_key"), JSONL or tab-separated txt file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # only parquet input needs pyarrow
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix == ".tsv":
            csv.field_size_limit(sys.maxsize)
            return list(csv.DictReader(f, delimiter="\t"))
        if suffix == ".json":
            data = json.load(f)
            return [dict(v, _key=k) for k, v in data.items()] if isinstance(data, dict) else data
        if suffix in (".jsonl", ".txt"):
            return [json.loads(l) if suffix == ".jsonl" else l.rstrip("\r\n").split("\t") for l in f if l.strip()]
    raise ValueError(f"{path}: unknown data format {suffix!r} (expected .tsv, .parquet, .json, .jsonl or .txt)")


def image_sources(fmt, rows, file, image_root):
    """A function (row, relative paths) -> image sources: base64 str (TSV), bytes (parquet) or Path (files).
    An unresolvable one is ("error", message), raised only when opened: one bad row never fails a load."""
    if fmt == "tsv":
        cells = {str(r.get("index")): (r.get("image") or "").strip() for r in rows}

        def resolve(cell):
            cell = str(cell).strip()
            if cell.startswith("["):
                return [s for c in ast.literal_eval(cell) for s in resolve(c)]
            if len(cell) > 64 or len(cells.get(cell, "")) > 64:   # a reference must name a row with a real image
                return [cell if len(cell) > 64 else cells[cell]]
            return [("error", f"{file}: image cell {cell!r} is neither base64 nor the index of a row with an image")]
        return lambda row, rels=None: resolve(row.get("image") or "")
    if fmt == "parquet":
        def get(row, rels=None):
            v = row.get("decoded_image") or row.get("image")
            v = v.get("bytes") if isinstance(v, dict) else v
            return [v] if isinstance(v, bytes) else [("error", f"{file}: row has no image bytes")]
        return get
    roots = ([Path(image_root)] if image_root else []) + [file.parent, file.parent.parent]

    def locate(row, rels):
        rels = [r.removeprefix("./") for r in ([rels] if isinstance(rels, str) else rels) if r]
        missing = ("error", f"image {rels[0] if rels else '?'} not found under {', '.join(map(str, roots))}")
        return [next((p for root in roots for rel in rels for sub in ("", "images", "hallusion_bench")
                      if (p := root / sub / rel).is_file()), missing)]
    return locate


def _literal(v):
    """A list stored as a Python literal string in TSVs ("['a', 'b']"), else the value itself."""
    with suppress(ValueError, SyntaxError):
        return ast.literal_eval(v) if isinstance(v, str) and v.strip().startswith("[") else v
    return v


def _empty(v):
    return v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() in ("", "nan", "None")


# ----------------------------------------------------------------------------- records per benchmark
# Each converter: (row, format, file, row number, image getter) -> record, or None to leave the row out.
def _mathvista(row, fmt, file, i, img):
    choices = _literal(row.get("choices"))
    choices = None if _empty(choices) or not choices else list(choices)
    answer, qtype, atype, precision = str(row["answer"]), row["question_type"], row["answer_type"], row.get("precision")
    if qtype == "multi_choice" and answer not in choices and answer in LETTERS[:len(choices)]:
        answer = choices[LETTERS.index(answer)]           # some TSVs store the letter
    if atype == "float" and _empty(precision):             # no such column: as many decimals as the answer
        precision = len(answer.split(".")[1]) if "." in answer else 0
    return dict(id=str(row["index"] if fmt == "tsv" else row["pid"]), images=img(row, row.get("image")),
                question=row.get("query") or row["question"], answer=answer, choices=choices, qtype=qtype,
                atype=atype, precision=None if _empty(precision) else int(float(precision)),
                task=row.get("task") or (row.get("metadata") or {}).get("task", ""))


def _mmstar(row, fmt, file, i, img):
    return dict(id=str(row["index"]), images=img(row), question=row["question"], kind="mcq",
                hint="" if _empty(row.get("hint")) else f"Hint: {row['hint']}\n",
                options=[str(row[L]) for L in "ABCD" if not _empty(row.get(L))], answer=str(row["answer"]).strip(),
                category=row.get("category", ""), l2=row.get("l2-category") or row.get("l2_category", ""))


def _mathvision(row, fmt, file, i, img):
    options = list(_literal(row.get("options", row.get("choices"))) or [])
    question = re.sub(r"\n?<image\d+>", "", row["question"]).strip()
    if options and options != list(LETTERS[:len(options)]):   # letters only: the options are in the image
        question += "".join(f"\n({L}) {o}" for L, o in zip(LETTERS, options))
    return dict(id=str(row["index"] if fmt == "tsv" else row["id"]), images=img(row, row.get("image")),
                question=question, answer=str(row["answer"]), options=options,
                level=str(row.get("level", "")), subject=row.get("subject") or row.get("category", ""))


def _chartqa(row, fmt, file, i, img):
    """The official test_*.json label is one string, compared whole ("[2014, 2016]" is one answer, as the
    official relaxed accuracy reads it); a TSV's "[...]" answer lists alternatives, as VLMEvalKit reads it."""
    split = str(row.get("split") or row.get("type") or row.get("human_or_machine") or file.stem)
    if fmt == "json":                                       # official: imgname, query, label
        question, label, images = row["query"], str(row["label"]), img(row, [f"png/{row['imgname']}", row["imgname"]])
    elif fmt == "tsv":
        question, label, images = row["question"], _literal(row["answer"]), img(row)
    elif fmt == "parquet":                                  # HuggingFaceM4: query, label [str]; lmms-lab: question, answer
        question, label, images = row.get("query") or row["question"], row["label"] if "label" in row else row["answer"], img(row)
    else:
        raise ValueError(f"ChartQA comes as test_*.json, TSV or parquet, not {fmt}")
    return dict(id=str(row["index"]) if fmt == "tsv" else f"{file.stem}/{i}", images=images, question=question,
                answer=[str(a) for a in label] if isinstance(label, list) else [str(label)],
                split="augmented" if "aug" in split or split == "1" else "human")    # human_or_machine: 1 = machine


def _dynamath(row, fmt, file, i, img):
    variant = row.get("varid") or (re.findall(r"(?:trial|variant)_?(\d+)", str(file)) or ["0"])[-1]
    qid = str(row.get("qid") or row.get("id") or row["_key"])
    return dict(id=str(row["index"]) if fmt == "tsv" else f"{qid}/{variant}", images=img(row, row.get("image")),
                question=row["question"], answer=str(row.get("answer", row.get("ground_truth"))),
                atype=row["answer_type"], qid=qid, subject=row["subject"],
                level=row["level"] if "level" in row else row["knowledge_level"])


def _hallusionbench(row, fmt, file, i, img):
    if str(row.get("visual_input")) == "0":
        return None                                         # text-only questions: not in the 951-question set
    cat, sub = row.get("category"), row.get("subcategory")
    keys = [row.get(k) for k in ("set_id", "figure_id", "question_id")]
    if fmt == "tsv":                                        # VLMEvalKit: index "<cat>_<sub>_<..>_<set>_<fig>_<q>"
        cat, sub = str(row.get("l2-category", f"{cat}_{sub}")).split("_", 1)
        keys = str(row["index"]).split("_")[3:6] if None in keys else keys
    gt = str(row.get("gt_answer", row.get("answer"))).strip().lower()
    return dict(id=str(row["index"]) if fmt == "tsv" else "/".join(map(str, [cat, sub, *keys])),
                images=img(row, row.get("filename")), question=row["question"], kind="yn",
                answer="yes" if gt in ("1", "yes") else "no", category=cat, subcategory=sub,
                set=keys[0], figure=keys[1], qnum=keys[2])


def _mathverse(row, fmt, file, i, img):
    if row.get("problem_version") == "Text Only":
        return None                                         # no image; not part of the reported "All"
    return dict(id=str(row["index"] if fmt == "tsv" else row["sample_index"]), images=img(row, row.get("image")),
                question=row.get("query_wo") or row["question"], answer=str(row["answer"]).strip(),
                qtype=row.get("question_type", ""), version=row.get("problem_version", ""),
                subject=(row.get("metadata") or {}).get("subject") or row.get("subject", ""))


def _mme(row, fmt, file, i, img):
    if fmt == "txt":                                        # image <TAB> question <TAB> Yes/No, two lines per image
        name, question, answer = row[:3]
        return dict(id=f"{file.stem}/{i + 1}", images=img(row, [f"{file.stem}/{name}", f"{file.stem}/images/{name}"]),
                    question=question, answer=answer.strip().lower(), category=file.stem, pair=f"{file.stem}/{name}")
    return dict(id=str(row["index"]) if fmt == "tsv" else f"{file.stem}/{i}", images=img(row),
                question=row["question"], answer=str(row["answer"]).strip().lower(), category=row["category"],
                pair=f"{row['category']}/{row.get('image_path') or row.get('question_id')}")


LEFT_OUT = {"mathverse": "its text-only version has no image", "hallusionbench": "its questions without an image"}


def load(bench, path, image_root=None):
    """All records of `bench` under `path`; raises on missing files, malformed rows, duplicate ids or no record."""
    records, left_out = {}, 0                               # id -> record, in file order
    for file in find_files(bench, path):
        fmt, rows = file.suffix.lower().lstrip("."), read_rows(file)
        if bench == "mathvista" and fmt == "json" and (q := file.parent / "query.json").is_file():
            queries = json.loads(q.read_text(encoding="utf-8"))     # MathVista's built prompts, beside testmini.json
            rows = [dict(r, query=queries.get(str(r["pid"]))) for r in rows]
        img = image_sources(fmt, rows, file, image_root)
        for i, row in enumerate(rows):
            try:
                rec = BENCHES[bench].convert(row, fmt, file, i, img)
            except (KeyError, TypeError, ValueError, SyntaxError) as e:
                raise ValueError(f"{file}, row {i + 1}: not a {bench} record ({type(e).__name__}: {e})") from e
            if rec is not None and rec["id"] in records:
                raise ValueError(f"{file}, row {i + 1}: duplicate id {rec['id']!r}")
            if rec is not None:
                records[rec["id"]] = rec
        left_out += len(rows)
    if not records:
        raise ValueError(f"{path} holds no {bench} record to score ({left_out} rows, all left out: "
                         f"{LEFT_OUT.get(bench, 'none kept')})")
    return list(records.values())


# ----------------------------------------------------------------------------- the question sent
def question_text(rec, style):
    """The question sent to the model, with its options and each prompt style's wording.

    plain follows VLMEvalKit's Qwen2-VL prompts ("Options:\nA. ..."); r1vl follows R1-VL's
    evaluation ("Choices:\nA: ...", and HallusionBench's yes/no asked as choices A: Yes / B: No).
    """
    kind, q, plain = rec.get("kind"), rec["question"], style == "plain"
    if kind == "mcq":
        head, sep = ("Options", ". ") if plain else ("Choices", ": ")
        opts = "".join(f"\n{L}{sep}{o}" for L, o in zip(LETTERS, rec["options"]))
        return (f"{rec['hint']}{'Question: ' if plain else ''}{q}" + (f"\n{head}:{opts}" if opts else "")
                + f"\nPlease select the correct answer from the {head.lower()} above.")
    if kind == "yn":
        return q + (" Please answer yes or no." if plain else "\nChoices:\nA: Yes\nB: No")
    return q


# ----------------------------------------------------------------------------- metrics (percent)
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


def accuracy(recs, flags, *groups, key="accuracy"):
    """Accuracy with its counts, and a by_<field> breakdown per field in `groups`."""
    acc = {key: pct(sum(flags), len(flags)), "correct": sum(flags), "total": len(flags)}
    return dict(acc, **{f"by_{g}": by_group(recs, flags, g) for g in groups})


# ----------------------------------------------------------------------------- one entry per benchmark
@dataclass(frozen=True)
class Bench:
    convert: Callable      # (row, format, file, row number, image getter) -> record, or None to leave the row out
    score: Callable        # (record, final answer) -> right or not
    metrics: Callable      # (records, flags) -> {metric: value}, percent
    headline: str          # the metric the paper reports
    extract: bool = False  # the official pipeline extracts the final answer (an LLM): ours is answers.stated_answer,
    #                        and score takes reply= (the whole reply it was stated in: scorers.stated_option)


BENCHES = {
    "mathvista": Bench(_mathvista, scorers.score_mathvista,
                       lambda recs, flags: accuracy(recs, flags, "qtype", "atype", "task"), "accuracy"),
    "mmstar": Bench(_mmstar, scorers.score_mmstar,
                    lambda recs, flags: accuracy(recs, flags, "category", "l2"), "accuracy", extract=True),
    "mathvision": Bench(_mathvision, scorers.score_mathvision,
                        lambda recs, flags: accuracy(recs, flags, "level", "subject"), "accuracy"),
    "chartqa": Bench(_chartqa, scorers.score_chartqa,
                     lambda recs, flags: accuracy(recs, flags, "split", key="relaxed_accuracy"), "relaxed_accuracy"),
    "dynamath": Bench(_dynamath, scorers.score_dynamath, dynamath_metrics, "average_case"),
    "hallusionbench": Bench(_hallusionbench, scorers.score_hallusionbench, hallusion_metrics, "mean_aAcc_fAcc_qAcc"),
    "mathverse": Bench(_mathverse, scorers.score_mathverse,   # approximate: the official judge is an LLM
                       lambda recs, flags: accuracy(recs, flags, "version", "subject", key="accuracy_approx"),
                       "accuracy_approx", extract=True),
    "mme": Bench(_mme, scorers.score_mme, mme_metrics, "perception_plus_cognition"),
}


def metrics(bench, recs, flags):
    return BENCHES[bench].metrics(recs, flags)
