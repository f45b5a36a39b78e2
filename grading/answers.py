"""grading/answers.py: the final answer of a completion, and whether it equals the ground truth.

    extract_answer("... ### The final answer is: \\boxed{8}")   # "8"
    is_correct("B: 8", "8")                                     # True

Used by the rewards (rewards.py, Eq. 2) and by evaluation. How an answer is read and compared, and
where that departs from the released code, is in rewards.py's docstring (differences 3, 5 and 6).
"""
import math
import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

MAX_ANSWER_CHARS = 500      # no real final answer is longer
MV_MAX_CHARS = 120          # longer strings never reach sympy
NUM_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

_ANSWER = re.compile(r"^[ \t]*#{2,4}[ \t]*the final answer is[ \t]*:?[ \t]*(.*)$", re.I | re.M)
_ANSWER_IS = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*(.+)", re.I | re.S)
_NEXT_LINE = re.compile(r"\s*([^\n]*)")


def _boxed(s):
    """Content of the last \\boxed{...}, nested braces allowed; None if absent or unclosed."""
    if "\\boxed" not in s or (open_ := s.find("{", s.rfind("\\boxed"))) < 0:
        return None
    depth = 0
    for i in range(open_, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return s[open_ + 1:i]
    return None


def _clean(ans):
    """Strip the wrappers around an answer: \\boxed{}, $...$, 'The answer is', a final period."""
    ans = ans.strip()
    if len(ans) > MAX_ANSWER_CHARS:  # no regex work on giant strings: an answer, and a wrong one
        return ans[:MAX_ANSWER_CHARS + 1]
    if "\\boxed" in ans:
        ans = _boxed(ans) or ""
    ans = _ANSWER_IS.sub(r"\1", ans).strip().rstrip(".")
    ans = re.sub(r"^(\$+|\\\(|\\\[)|(\$+|\\\)|\\\])$", "", ans).strip().rstrip(".").strip()
    return None if not ans or ans.startswith("#") else ans


def visible_reply(text):
    """The reply without thinking: the text after the last '</think>', cut at a '<think>' never closed.
    Qwen3.5 may think although the prompt switched it off; rewards and answers judge only the reply."""
    return text.rsplit("</think>", 1)[-1].split("<think>", 1)[0]


def extract_answer(text):
    """The final answer of a completion, or None when it gives none.

    The answer follows '### The final answer is:' on the same line or the next non-empty line. Several
    headers count only if their answers agree; differing answers are a hedge, so None. Without a
    header, the last \\boxed{...} or a closing 'The answer is X' is accepted. An empty answer is None.
    """
    text = visible_reply(text) if isinstance(text, str) else ""
    if not text.strip():
        return None
    answers = set()
    for m in _ANSWER.finditer(text):
        answers.add(_clean(m.group(1).strip() or _NEXT_LINE.match(text, m.end()).group(1)))
        if len(answers) > 1:
            return None
    if answers:
        return answers.pop()
    if "\\boxed" in text:
        return _clean(_boxed(text) or "")
    tail = text.strip()[-300:]
    at = tail.lower().rfind("answer is")
    return _clean(tail[at:].split("\n")[0]) if at >= 0 else None


# Phrases that state a final answer, English and Chinese; the text after the last one is the answer.
_STATED = re.compile(r"(?:\b(?:the\s+)?(?:final|correct)\s+answer\s*(?:is|:)|\bthe\s+answer\s*(?:is|:)|^\s*answer\s*:"
                     r"|最终答案\s*(?:是|为)?|答案\s*(?:是|为|(?=[:：])))[ \t]*[:：]?[ \t]*", re.I | re.M)
_OPENING_LETTER = re.compile(r"\s*(?:\(([A-J])\)|([A-J])[.:)])(?=\s|$)")
_IS_TAIL = re.compile(r"\b(?:is|are|equals|was)\s+(?:approximately\s+|about\s+|roughly\s+)?(?=\S)|≈\s*", re.I)


def stated_answer(text):
    """The final answer of a free-form reply (a chain of thought, say), by rule, or None if it is empty.

    In order: what extract_answer reads (the '### The final answer is:' header, the last \\boxed{}, a
    closing 'The answer is X'); else the text after the last stated-answer phrase ('Final answer:',
    'the answer is', 'the correct answer is', 'Answer:', '答案是', '答案为', '最终答案'), on its line
    or the next non-empty one; else the last non-empty line, cut after its last 'is' when it is a
    sentence ('... the distance is approximately 22.3 meters.' gives '22.3 meters').
    """
    text = visible_reply(text) if isinstance(text, str) else ""
    if not text.strip():
        return None
    if (answer := extract_answer(text)) is not None:
        return answer
    if opening := _OPENING_LETTER.match(text):                       # 'B: text', '(B) text': the letter stated first
        return opening.group(1) or opening.group(2)
    if stated := list(_STATED.finditer(text)):
        rest = text[stated[-1].end():].strip()
        if rest and (answer := _clean(rest.split("\n")[0].rstrip("。"))):
            return answer
    last = text.strip().split("\n")[-1].strip().rstrip("\"',。")    # a quoted reply's closing quote, too
    cuts = list(_IS_TAIL.finditer(last))
    return _clean(last[cuts[-1].end():] if cuts and " " in last[cuts[-1].end():] + " " else last) or last


# ---------------------------------------------------------------------------- answer correctness
_CHOICE = re.compile(r"^(?i:option|choice)?\s*(?:\(([A-H])\)|([A-H])(?=[.:)]|$))\s*[.:)]?\s*(.*)$", re.S)
# [x =] [$] 1,000[.5] [/ 4] [%] [up to three unit words, never 'or'/'and'/'to': '5 or 6' is no number]
_NUMBER = re.compile(r"^(?:[a-z]{1,3}\s*=\s*)?[$€£¥]?\s*([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)"
                     r"(?:\s*/\s*(\d+(?:\.\d+)?))?\s*(%|percent)?"
                     r"(\s*(?!(?:or|and|to)\b)[a-z°]+(?:\^?[23]|[²³])?(?:/[a-z]+)?(?:\s+[a-z]+){0,2})?$")


def _as_answer(s):
    if not isinstance(s, str):
        return None
    return extract_answer(s) if _ANSWER.search(s) else _clean(s)


def _choice(s):
    """(letter, content) for a multiple-choice answer such as 'B', '(B)', 'B: 8', 'B. 8'; else None."""
    m = _CHOICE.match(s.upper() if len(s) <= 3 else s)   # 'b', '(b)' and 'b.' too
    return (m.group(1) or m.group(2), m.group(3).strip()) if m else None


def _norm_answer(s):
    s = re.sub(r"\\(?:text|mathrm|mathbf|textbf)\{([^{}]*)\}", r"\1", s.lower())
    s = re.sub(r"\^\s*\{?\\circ\}?", "°", s).replace("\\%", "%").replace("\\$", "")
    s = re.sub(r"\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}", r"\1/\2", s)
    s = re.sub(r"\\left|\\right|\\[,;!]|\$", "", s)
    return re.sub(r"\s+", " ", s).strip().strip("\"'").rstrip(".").strip()


def _number(s):
    """Candidate values of a numeric answer (units, separators, fractions, percent), or None."""
    m = _NUMBER.match(s)
    if not m:
        return None
    num, den = float(m.group(1).replace(",", "")), float(m.group(2) or 1)
    if not den or not math.isfinite(num / den):   # 1/0 or 400 digits: no comparable value
        return None
    return [num / den, num / den / 100] if m.group(3) else [num / den]   # '50%' read as 50 or as 0.5


def _mv_safe(s):
    """Has a digit or LaTeX (sympy reads 'on' as o·n = 'no'); short; no towers, big powers, factorials."""
    return (len(s) <= MV_MAX_CHARS and re.search(r"[\d\\]", s) is not None
            and not re.search(r"\^\s*[{(]?\s*-?\d{3}|\^[^^]{0,20}\^|!|binom", s))


# Unicode math that latex2sympy does not read: 2√3 -> 2\sqrt{3}, 2π -> 2\pi
_UNICODE_MATH = [(re.compile(r"√\s*(\d+(?:\.\d+)?|[A-Za-z]|\([^()]*\)|\{[^{}]*\})"),
                  lambda m: "\\sqrt{" + m.group(1).strip("{}") + "}"),
                 (re.compile(r"π"), lambda m: "\\pi ")]


def _latex(s):
    for pattern, repl in _UNICODE_MATH:
        s = pattern.sub(repl, s)
    return s


def _math_verify(gold, pred):
    gold, pred = _latex(gold), _latex(pred)
    if not (_mv_safe(gold) and _mv_safe(pred)):
        return False
    # verify(gold, prediction): math-verify is asymmetric, and the official code swaps the two.
    # Its timeout is signal.alarm, main thread only; elsewhere _mv_safe is the bound.
    t = 1 if threading.current_thread() is threading.main_thread() else None
    try:
        g, p = (parse("\\boxed{" + s + "}", parsing_timeout=t) for s in (gold, pred))
        return bool(g and p and verify(g, p, timeout_seconds=t))
    except (Exception, TimeoutException):
        return False


def _word_number(s):
    """'eight' -> '8': a whole answer that is a number word (not 'one third', not 'eight apples')."""
    return str(NUM_WORDS.index(s)) if s in NUM_WORDS else s


def _yes_no(s):
    """'yes' for 'yes, the red bar is taller' (likewise 'no'); None if the rest also says the opposite."""
    m = re.match(r"(yes|no)\s*[,.;:!]\s*(.*)", s, re.S)
    if not m:
        return None
    opposite = "no" if m.group(1) == "yes" else "yes"
    return None if re.search(r"\b%s\b" % opposite, m.group(2)) else m.group(1)


def _same_value(pred, gold):
    p, g = _norm_answer(pred), _norm_answer(gold)
    if p == g or (g in ("yes", "no") and _yes_no(p) == g):
        return True
    pn, gn = _number(_word_number(p)), _number(_word_number(g))
    if pn is not None and gn is not None:
        # relative tolerance 1e-6: 2 == 2.0 and 1/3 == 0.333333, never 12 == 120
        return any(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a in pn for b in gn)
    return _math_verify(gold, pred)


def is_correct(prediction, ground_truth):
    """Whether a predicted answer equals the ground truth (a bare answer or a reference path).

    Option letters compare as letters ('(B)', 'B: 8' vs 'B'), a letter with content also as its
    content ('B: 8' vs '8'); 'A, B, C, D' is no letter, so wrong. Numbers compare as values (a lone
    number word too: 'eight' = 8), LaTeX and expressions through math-verify (2√3 read as
    2\\sqrt{3}), text case-insensitively; a gold 'yes' or 'no' also accepts a sentence that opens
    with it ('Yes, the red bar is taller.') unless the sentence also says the opposite.
    """
    pred, gold = _as_answer(prediction), _as_answer(ground_truth)
    if not pred or not gold or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    pc, gc = _choice(pred), _choice(gold)
    if pc and gc:
        return pc[0] == gc[0]
    if pc or gc:  # a letter on one side only: compare its content, if it has one, with the other side
        content = (pc or gc)[1]
        return bool(content) and (_same_value(content, gold) if pc else _same_value(pred, content))
    return _same_value(pred, gold)
