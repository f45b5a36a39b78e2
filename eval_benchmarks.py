"""eval_benchmarks.py: read the R1-VL benchmarks into records, and judge one answer by rule.

Formats, detected from the file (a folder is searched for the benchmark's files): VLMEvalKit TSV (base64
images; an image cell of at most 64 characters is the `index` of the row whose image it reuses; a "[...]"
cell holds several images), Hugging Face parquet (image structs; pyarrow is imported only for these), and
the official JSON / JSONL / MME txt lists with an image folder. Record: {"id" (per benchmark and format: the
table in evaluate.py), "images" (sources, decoded only when a model runs), "question", "answer", ...}.
"""
import ast
import csv
import json
import math
import re
import sys
from contextlib import suppress
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from rapidfuzz.distance import Levenshtein

LETTERS = "ABCDEFGHIJ"
# What a --data folder is searched for, per benchmark: the first pattern with matches wins (official
# files, VLMEvalKit TSV, then the evaluated split of the Hugging Face parquet shards).
FILES = {"mathvista": ["testmini.json", "*.tsv", "testmini*.parquet"], "mmstar": ["*.tsv", "*.parquet"],
         "mathvision": ["test.jsonl", "*.tsv", "test-*.parquet"], "chartqa": ["test_*.json", "*.tsv", "test-*.parquet"],
         "dynamath": ["trial*/dataset.json", "dataset.json", "*.tsv", "*variant*.parquet"],
         "hallusionbench": ["HallusionBench.json", "*.tsv", "image-*.parquet"],
         "mathverse": ["testmini.json", "*.tsv", "testmini*.parquet"], "mme": ["*.txt", "*.tsv", "*.parquet"]}
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"   # as written in answers: -1,234.5 or .5


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
    split = str(row.get("split") or row.get("type") or row.get("human_or_machine") or file.stem)
    label = _literal(row.get("label", row.get("answer")))
    return dict(id=str(row["index"]) if fmt == "tsv" else f"{file.stem}/{i}",
                images=img(row, [f"png/{row.get('imgname')}", str(row.get("imgname"))]),
                question=row.get("query") or row["question"], answer=label if isinstance(label, list) else [str(label)],
                split="augmented" if "aug" in split or split == "1" else "human")    # human_or_machine: 1 = machine


def _dynamath(row, fmt, file, i, img):
    variant = row.get("varid") or (re.findall(r"(?:trial|variant)_?(\d+)", str(file)) or ["0"])[-1]
    qid = str(row.get("qid") or row.get("id") or row["_key"])
    return dict(id=str(row["index"]) if fmt == "tsv" else f"{qid}/{variant}", images=img(row, row.get("image")),
                question=row["question"], answer=str(row.get("answer", row.get("ground_truth"))),
                atype=row["answer_type"], qid=qid, subject=row.get("subject", ""),
                level=row.get("level") or row.get("knowledge_level", ""))


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


CONVERT = {"mathvista": _mathvista, "mmstar": _mmstar, "mathvision": _mathvision, "chartqa": _chartqa,
           "dynamath": _dynamath, "hallusionbench": _hallusionbench, "mathverse": _mathverse, "mme": _mme}


def load(bench, path, image_root=None):
    """All records of `bench` under `path`; raises on missing files, malformed rows or duplicate ids."""
    records = {}                                            # id -> record, in file order
    for file in find_files(bench, path):
        fmt, rows = file.suffix.lower().lstrip("."), read_rows(file)
        if bench == "mathvista" and fmt == "json" and (q := file.parent / "query.json").is_file():
            queries = json.loads(q.read_text(encoding="utf-8"))     # MathVista's built prompts, beside testmini.json
            rows = [dict(r, query=queries.get(str(r["pid"]))) for r in rows]
        img = image_sources(fmt, rows, file, image_root)
        for i, row in enumerate(rows):
            try:
                rec = CONVERT[bench](row, fmt, file, i, img)
            except (KeyError, TypeError, ValueError, SyntaxError) as e:
                raise ValueError(f"{file}, row {i + 1}: not a {bench} record ({type(e).__name__}: {e})") from e
            if rec is not None and rec["id"] in records:
                raise ValueError(f"{file}, row {i + 1}: duplicate id {rec['id']!r}")
            if rec is not None:
                records[rec["id"]] = rec
    return list(records.values())


# ----------------------------------------------------------------------------- answer rules
def to_float(s):
    with suppress(ValueError):
        return float(str(s).strip().replace(",", ""))
    return None


def option_letter(text, letters="ABCD", options=()):
    """The option an answer names: 'B', '(B)', 'B. x', 'B: x', 'answer is B', a lone letter, a unique option text."""
    t = text.strip()
    m = re.match(rf"\(?([{letters}])(?:[).:,]|\s|$)", t) or re.search(rf"answer is:?\s*\(?([{letters}])\b", t, re.I)
    lone = set(re.findall(rf"(?<![\w'])([{letters}])(?![\w'])", t))
    named = [L for L, o in zip(letters, options) if o and str(o).lower() in t.lower()]
    return m.group(1).upper() if m else lone.pop() if len(lone) == 1 else named[0] if len(named) == 1 else None


def yes_no(text):
    """VLMEvalKit's rule: 'yes' if the words contain yes and not no, 'no' the other way, else None."""
    found = {"yes", "no"}.intersection(re.sub(r"[^\w\s]", " ", text.lower()).split())
    return found.pop() if len(found) == 1 else None


def mme_label(text):
    """The official MME parse: exactly yes/no, else yes/no within the first 4 characters, else 'other'."""
    t = text.lower()
    return t if t in ("yes", "no") else "yes" if "yes" in t[:4] else "no" if "no" in t[:4] else "other"


def relaxed_correct(pred, target):
    """ChartQA relaxed accuracy: within 5 % of a non-zero numeric target ('%' divides by 100), else exact text."""
    def num(s):
        s = s.strip()
        with suppress(ValueError):
            return float(s[:-1]) / 100 if s.endswith("%") else float(s)
        return None
    p, t = num(pred), num(target)
    return abs(p - t) / abs(t) <= 0.05 if p is not None and t else pred.strip().lower() == target.strip().lower()


def mathvista_extract(text, rec):
    """Rule-based stand-in for MathVista's GPT-4 extraction. Official quick rules first (a response equal
    to a choice, or an int/float, is the answer); then multi-choice: 'answer is (X)', '\\boxed{X}', '(X)', a
    leading 'X.', a trailing lone letter, else the last choice text named; list: the last [...];
    numbers: 'answer is N', '\\boxed{N}', '**N**', else the last number."""
    r, choices = text.strip(), rec["choices"] or []
    if not r or (rec["qtype"] == "multi_choice" and r in choices) or (
            rec["atype"] in ("integer", "float") and to_float(r) is not None and "," not in r):
        return r
    if rec["qtype"] == "multi_choice":
        L = LETTERS[:len(choices)]
        for p in (rf"answer is:?\s*\(?([{L}])\b", rf"\\boxed\{{\(?([{L}])\)?\}}", rf"\(([{L}])\)",
                  rf"^([{L}])(?:[.:)]|\s|$)", rf"\b([{L}])\.?$"):
            if m := re.search(p, r, re.M):
                return m.group(1)
        hits = [(r.rfind(c), c) for c in choices if c and c in r]
        return max(hits)[1] if hits else r
    if rec["atype"] == "list":
        return (re.findall(r"\[[^\[\]]*\]", r) or [r])[-1]
    for p in (rf"answer is:?\s*\$?({NUMBER})", rf"\\boxed\{{({NUMBER})\}}", rf"\*\*({NUMBER})", f"({NUMBER})"):
        if found := re.findall(p, r, re.I):
            return found[-1].replace(",", "")
    return r


def score_mathvista(rec, answer, extracted=False):
    """Our extraction of `answer` (or, if `extracted`, `answer` itself: an official GPT-4 extraction) after the
    official normalisation (calculate_score.py), against the gold: letter or nearest choice text; int; rounded
    float; list. Integers are truncated exactly (Decimal; float("0.999…9") is 1): so were the published scores."""
    ext = answer if extracted else mathvista_extract(answer, rec)
    if rec["qtype"] == "multi_choice":
        ext, choices = str(ext).strip(), rec["choices"]
        letter = re.findall(r"\(([a-zA-Z])\)", ext)
        ext = letter[0].upper() if letter else ext
        return (choices[LETTERS.index(ext)] if ext in LETTERS[:len(choices)]
                else min(choices, key=lambda c: Levenshtein.distance(ext, c))) == rec["answer"]
    with suppress(ValueError, TypeError, ArithmeticError):      # not a number: wrong
        if rec["atype"] == "integer":
            return str(int(Decimal(str(ext).strip()))) == rec["answer"]
        return (str(round(float(ext), rec["precision"])) if rec["atype"] == "float" else str(ext)) == rec["answer"]
    return False


# MATH-V: the official rule scorer (evaluation/evaluate.py, utils.py), reimplemented; used by evaluate.score_mathvision.
MATHV_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")
MATHV_CLEAN = [(" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""),
               ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""),
               ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""), ("{units}", ""), ("units", ""),
               ("{km}", ""), ("km", ""),  # then MATH's _strip_string:
               ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\$", ""), ("$", "")]


def mathvision_extract(response):
    """Option-letter endings, a number after 'is ', the text after 'the answer is'-like phrases, then LaTeX cleanup."""
    a = response.strip()
    for c in "ABCDE":
        if a.endswith((f" {c}.", f" ({c}).")) or a.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n")):
            a = c
    tail = a.split("is ")[-1].rstrip(".")
    a = tail if to_float(tail) is not None and "," not in tail else a
    if "oxed{" not in a:
        for flag in (f for flag in MATHV_FLAGS for f in (flag, flag.replace("the", "The"))):
            cut, a = flag in a, a.split(flag)[-1].strip()
            a = a.split("\n")[0].split(". ")[0] if cut else a
    elif a.count("oxed{") > 1:
        a = "\\boxed{" + a.split("oxed{")[-1]
    s = a.lower().replace("{}", "")
    s = (re.findall(r"oxed{(.*)}", s, flags=re.S) or [s])[-1]
    s = s.split("}")[0] if "}" in s and ("{" not in s or s.find("}") < s.find("{")) else s
    s = s.split("=")[-1].split("\\approx")[-1]
    for old, new in MATHV_CLEAN:
        s = s.replace(old, new)
    s = s.split("\\text{ ")[0].replace("\\%", "").replace("{.", "{0.")
    s = "0" + s if s[:1] == "." else s
    s = re.sub(r"\\sqrt([^{])", r"\\sqrt{\1}", s)
    if "sqrt" in s:                                          # official: fractions fixed only next to a sqrt
        s = re.sub(r"\\frac([^{])\{", r"\\frac{\1}{", re.sub(r"\\frac([^{])([^{])", r"\\frac{\1}{\2}", s))
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    s = "\\frac{1}{2}" if s == "0.5" else f"\\frac{{{m[1]}}}{{{m[2]}}}" if m and s == f"{int(m[1])}/{int(m[2])}" else s
    for c in "abcde":
        s = s.replace(f"({c})", c).replace("{%s}" % c, c)
    return s.rstrip(".").lstrip(":").strip()


@lru_cache(maxsize=None)
def _value(s):
    """round(value, 2) of a number or LaTeX expression, else None (official: eval(str(latex2sympy(s)))).
    What the official, older latex2sympy2 cannot parse (degrees, π, \\!, an escaped $) is refused here too;
    a bare word is a name, and only e and pi have values."""
    f = to_float(s) if "," not in s else None
    if f is None and s.isalpha():
        return {"e": 2.72, "pi": 3.14}.get(s)
    if f is None and not any(t in s for t in ("\\circ", "°", "π", "\\!", "\\$")):
        with suppress(Exception):            # any parse or evaluation failure means "not a number", as officially
            from latex2sympy2_extended import latex2sympy
            f = complex(latex2sympy(s).evalf())
            f = None if f.imag else f.real
    return None if f is None or math.isnan(f) or math.isinf(f) else round(f, 2)


def mathvision_equal(a, b):
    """The official is_equal: case-insensitive text, element-wise (a,b)/[a,b] values, or values equal to 2 decimals."""
    def tup(s):
        if len(s) < 2 or s[0] + s[-1] not in ("()", "[]") or "," not in s:
            return s
        vals = [p if "infty" in p or p in ("a", "-a") else _value(p) for p in s[1:-1].split(",")]
        return s if None in vals else s[0] + ",".join(map(str, vals)) + s[-1]
    a, b = a.lower(), b.lower()
    if not a.replace(" ", "") or not b.replace(" ", ""):
        return False
    # the prediction's value first: most are no number, so the gold is never parsed
    return a.strip() == b.strip() or tup(a) == tup(b) or (_value(a) is not None and _value(a) == _value(b))


def score_dynamath(rec, answer):
    """DynaMath's official rules on the 'short answer' of a JSON reply (else the whole answer). float: the
    first token (× π if it holds π) within 0.001 (our fallback for prose: the last number); multiple
    choice: the letter, or the gold letter in the first 3 characters; text: the gold string inside."""
    text, gold = answer.strip(), rec["answer"]
    with suppress(ValueError, KeyError, TypeError):
        text = str(json.loads(text[text.find("{"):text.rfind("}") + 1].replace("\\", ""), strict=False)["short answer"])
    if rec["atype"] == "multiple choice":
        return text == gold if len(text) == 1 else gold in text[:3]
    if to_float(gold) is None or rec["atype"] == "text":
        return gold in text
    first = text.split(" ")[0].split("π")                  # officially "2π/3" reads as 2π
    value = to_float(first[0]) * (math.pi if len(first) > 1 else 1) if to_float(first[0]) is not None else None
    value = value if value is not None else to_float((re.findall(NUMBER, text) or ["x"])[-1])
    return value is not None and abs(value - float(gold)) <= 0.001


def score_hallusionbench(rec, answer):
    """yes/no by VLMEvalKit's word rule; an r1vl answer 'A'/'B' (the A: Yes / B: No choices) maps back first."""
    m = re.match(r"\(?([AB])\b", answer.strip())
    return ({"A": "yes", "B": "no"}[m.group(1)] if m else yes_no(answer)) == rec["answer"]


def score_mathverse(rec, answer):
    """Approximate (the official judge is an LLM): option letter for multi-choice, else rewards.is_correct."""
    if rec["qtype"] == "multi-choice" or re.fullmatch(r"[A-F]", rec["answer"]):
        return option_letter(answer, "ABCDEF") == rec["answer"][:1]
    import rewards
    return rewards.is_correct(answer, rec["answer"])
