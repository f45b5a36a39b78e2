"""benchmarks/scorers.py: judge one answer by rule, per benchmark; every rule reimplements the benchmark's official
scorer (or says where it cannot: MathVerse's is an LLM). Each function takes a record of catalog.py and
the model's final answer, and returns True when it is right."""
import json
import math
import re
from contextlib import suppress
from decimal import Decimal

from rapidfuzz.distance import Levenshtein

import rewards
from grading import answers
from benchmarks.latex_value import latex_value

LETTERS = "ABCDEFGHIJ"
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"   # as written in answers: -1,234.5 or .5


# ----------------------------------------------------------------------------- shared rules
def to_float(s):
    with suppress(ValueError):
        return float(str(s).strip().replace(",", ""))
    return None


def option_letter(text, letters="ABCD", options=()):
    """The option an answer names: 'B', '(B)', 'B. x', 'B: x', 'answer is B', a lone letter, the option text it is,
    the one option text it holds (text compared without spaces, '$' and a closing period)."""
    t = text.strip()
    m = re.match(rf"\(?([{letters}])(?:[).:,]|\s|$)", t) or re.search(rf"answer is:?\s*\(?([{letters}])\b", t, re.I)
    lone = set(re.findall(rf"(?<![\w'])([{letters}])(?![\w'])", t))
    bare = lambda s: re.sub(r"[\s$]", "", str(s)).rstrip(".").lower()   # '$\frac{1}{12}$' as '\frac{1}{12}.'
    equal = [L for L, o in zip(letters, options) if bare(o) and bare(o) == bare(t)]
    named = equal or [L for L, o in zip(letters, options) if bare(o) and bare(o) in bare(t)]
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


# Option letters as replies state them (any capital; an out-of-range one goes to the most similar choice).
MATHVISTA_LETTER_RULES = [r"correct option letter is:?\s*\(?([A-Z])\b", r'answer is:?\s*"([A-Z])"',
                          r"答案是\s*[:：]?\s*\(?([A-Z])\b", r"选项\s*\(?([A-Z])\b"]


def mathvista_extract(text, rec):
    """Rule-based stand-in for MathVista's GPT-4 extraction. Official quick rules first (a response equal
    to a choice, or an int/float, is the answer; 'The answer is "text".'); then multi-choice: a stated option
    letter (MATHVISTA_LETTER_RULES), a reply opening 'Yes,' / 'No,' for a yes/no choice, 'answer is (X)', '\\boxed{X}', '(X)', a
    leading 'X.', a trailing lone letter, else the last choice text named; list: the last [...];
    numbers: 'answer is N', '\\boxed{N}', '**N**', else the last number."""
    r, choices = text.strip(), rec["choices"] or []
    if not r or (rec["qtype"] == "multi_choice" and r in choices) or (
            rec["atype"] in ("integer", "float") and to_float(r) is not None and "," not in r):
        return r
    if m := re.search(r'The answer is "(.*)"\.', r):            # the official quick extraction
        return m.group(1)
    if rec["qtype"] == "multi_choice":
        for rule in MATHVISTA_LETTER_RULES:                      # any capital: normalisation maps it to a choice
            if m := re.search(rule, r):
                return m.group(1)
        yes_no_choice = {c.lower(): c for c in choices if c.lower() in ("yes", "no")}
        if m := re.match(r"(yes|no)\b[,.!]", r, re.I):
            if m.group(1).lower() in yes_no_choice:
                return yes_no_choice[m.group(1).lower()]
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


def mathvision_equal(a, b):
    """The official is_equal: case-insensitive text, element-wise (a,b)/[a,b] values, or values equal to 2 decimals."""
    def tup(s):
        if len(s) < 2 or s[0] + s[-1] not in ("()", "[]") or "," not in s:
            return s
        vals = [p if "infty" in p or p in ("a", "-a") else latex_value(p) for p in s[1:-1].split(",")]
        return s if None in vals else s[0] + ",".join(map(str, vals)) + s[-1]
    a, b = a.lower(), b.lower()
    if not a.replace(" ", "") or not b.replace(" ", ""):
        return False
    # the prediction's value first: most are no number, so the gold is never parsed
    return a.strip() == b.strip() or tup(a) == tup(b) or (latex_value(a) is not None and latex_value(a) == latex_value(b))


def score_dynamath(rec, answer):
    """DynaMath's official rules on the 'short answer' of a JSON reply (else answers.stated_answer). float: the
    first token (× π if it holds π) within 0.001 (our fallback for prose: the last number); multiple
    choice: the letter, or the gold letter in the first 3 characters; text: the gold string inside."""
    text, gold = answer.strip(), rec["answer"]
    try:
        text = str(json.loads(text[text.find("{"):text.rfind("}") + 1].replace("\\", ""), strict=False)["short answer"])
    except (ValueError, KeyError, TypeError):          # no JSON: the official pipeline asks an LLM, we read it by rule
        text = answers.stated_answer(text) or text
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


def stated_option(answer, reply, letters, options=()):
    """The option a stated answer (answers.stated_answer of `reply`) names; if it names none, the one the whole
    reply names, as the reply was read before answers were extracted from it. No reply: the answer's option."""
    return option_letter(answer, letters, options) or (option_letter(reply, letters, options) if reply else None)


def score_mathverse(rec, answer, reply=None):
    """Approximate (the official judge is an LLM): option letter for multi-choice, else rewards.is_correct.
    `reply`: the whole reply `answer` was stated in, read when the answer names no option (stated_option)."""
    if rec["qtype"] == "multi-choice" or re.fullmatch(r"[A-F]", rec["answer"]):
        return stated_option(answer, reply, "ABCDEF") == rec["answer"][:1]
    return rewards.is_correct(answer, rec["answer"])


def score_mathvision(rec, answer):
    """MATH-V's official rule: the extracted answer equals the gold letter or its option text (mathvision_extract,
    mathvision_equal). One addition: for multiple choice, R1-VL's answer style 'B: 8' is its letter."""
    if rec["options"] and (m := re.match(r"([A-E]):\s", answer.strip())):
        return m.group(1) == rec["answer"]
    pred = mathvision_extract(answer)
    gold_text = rec["options"][LETTERS.index(rec["answer"])] if rec["options"] else ""
    return mathvision_equal(pred, rec["answer"]) or mathvision_equal(pred, gold_text)


def score_mmstar(rec, answer, reply=None):
    return stated_option(answer, reply, "ABCD", rec["options"]) == rec["answer"]


def score_chartqa(rec, answer):
    return any(relaxed_correct(answer, str(t)) for t in rec["answer"])


def score_mme(rec, answer):
    return mme_label(answer) == rec["answer"]


def score_toy(rec, answer):
    return bool(rewards.is_correct(answer, rec["answer"]))
