"""Rewards of StepGRPO (R1-VL, arXiv 2503.12937). They judge completion text only; no torch here.

Completions follow the R1-VL format: ### Image Description: / ### Rationales: / ### Let's think step
by step. / ### Step 1: ... ### Step n: / ### The final answer is: <answer>, one header a line.

    step_rar -- paper Eq. 2, step-wise reasoning accuracy reward:
                r_rar = 1 + α·k if the answer is correct, α·k if it is wrong, 0 if there is none,
                with k = #(key-step groups found in the steps) / #groups and α = 0.1.
    step_rvr -- paper Eq. 3, step-wise reasoning validity reward:
                r_rvr = 1 if the completion is complete and its sections are in logical order, else 0.
    reward   -- r = r_rar + r_rvr ∈ [0, 2.1], plus the paper's Table 2 ablations and the
                outcome-only GRPO baseline (`kind`).

These follow the paper's equations. official.py reproduces the reward functions of the released
code (jingyi0000/R1-VL, src/r1-vl/src/open_r1/grpo.py: accuracy_reward and validity_reward), bugs
included, so the two can be compared (`train.py --reward_impl official`).

Deliberate differences from the released code:
1. Eq. 2 as written: no answer scores 0. The official code adds α·k regardless.
2. Eq. 3 as written: description and rationale precede the steps, each section once and non-empty,
   one non-empty final answer. The official code checks that four headers exist and that the
   steps are numbered 1..n before the first answer header (or that the text ends with the header).
3. The answer is the text after '### The final answer is:' (with \\boxed{}, $...$, option letters,
   numbers and number words, yes/no sentences compared by our rules), then math-verify as
   verify(gold, prediction). The official code runs math-verify on the whole completion, as
   verify(prediction, gold) (swapped; math-verify is asymmetric), so a number anywhere in the
   steps can count as the answer; then it compares the strings exactly.
4. Key-step matching is soft (LaTeX ~ plain forms, number words, typos in long words) but a number
   only matches the same whole number; the official substring search finds "12" inside "120".
5. Several final-answer headers: invalid for Eq. 3; no answer for Eq. 2 if their answers differ.
6. Bounded work: step text over MAX_STEP_CHARS earns k = 0, answers over MAX_ANSWER_CHARS are
   wrong, math-verify only sees short, tame strings and runs under a timeout (main thread).
"""
import json
import math
import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from rapidfuzz import fuzz

ALPHA = 0.1                 # α of Eq. 2
MAX_STEP_CHARS = 12_000     # ~3k tokens, above the 1,024-token rollout budget: only hunting exceeds it
MAX_ANSWER_CHARS = 500      # no real final answer is longer
MV_MAX_CHARS = 120          # longer strings never reach sympy
FUZZY_THRESHOLD = 85        # rapidfuzz ratio (0-100) of a word with a typo: isoceles ~ isosceles (94)
FUZZY_MIN_LEN = 6           # shorter words ("red", "one"), numbers and symbols must match exactly
KINDS = ("step", "outcome", "steprar", "steprvr")

# ---------------------------------------------------------------------------- parsing the format
_HEADER = re.compile(r"^[ \t]*#{2,4}[ \t]*(image description|rationales?|let'?s think step by step"
                     r"|step[ \t]*(\d{1,6})(?!\d)|the final answer is)[ \t]*[:.]?[ \t]*(.*)$", re.I | re.M)
_ANSWER = re.compile(r"^[ \t]*#{2,4}[ \t]*the final answer is[ \t]*:?[ \t]*(.*)$", re.I | re.M)
_ANSWER_IS = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*(.+)", re.I | re.S)
_NEXT_LINE = re.compile(r"\s*([^\n]*)")
_KIND = {"ima": "desc", "rat": "rat", "let": "think", "the": "answer"}


def _sections(text):
    """[(kind, step number or None, body)] per recognised header, in order of appearance."""
    heads = list(_HEADER.finditer(text))
    ends = [m.start() for m in heads[1:]] + [len(text)]
    return [("step" if m.group(2) else _KIND[m.group(1)[:3].lower()], int(m.group(2)) if m.group(2) else None,
             (m.group(3) + text[m.end():end]).strip()) for m, end in zip(heads, ends)]


def step_text(text):
    """The bodies of the '### Step N:' sections, joined: where key steps are searched."""
    return "\n".join(body for kind, _, body in _sections(text) if kind == "step")


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


# ---------------------------------------------------------------------------- key steps
NUM_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?|[^\sa-z\d]")
_MATCH_SUBS = [(re.compile(p), r) for p, r in [
    (r"\b(?:" + "|".join(NUM_WORDS) + r")\b", lambda m: str(NUM_WORDS.index(m.group()))),
    (r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", lambda m: "/".join(
        a if re.fullmatch(r"[\w.]+", a.strip()) else f"({a})" for a in m.groups())),
    (r"\\(?:text|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1"),
    (r"\^\s*\{?\\circ\}?|°", "°"), (r"\\(?:times|cdot|ast)|[×·∗⋅]", "*"),
    (r"(?<=\d)\s*x\s*(?=\d)", "*"), (r"\\div|÷", "/"),
    (r"\\left|\\right|\\[,;!: ]|\$|\\[()\[\]]", ""),
    (r"\\leq?(?![a-z])|≤", "<="), (r"\\geq?(?![a-z])|≥", ">="), (r"\\neq|≠", "!="),
    (r"\\pi|π", "pi"), (r"√", "sqrt"), (r"∠", "angle "),
    (r"\\", ""), (r"[{}]", ""), (r"(?<=\d),(?=\d{3}(?!\d))", ""),   # 1,000 -> 1000
    (r"\s*([=+\-*/^()<>,:])\s*", r"\1"),
    (r"(?<=\d) (?=[a-z])|(?<=[a-z]) (?=\d)", ""), (r"\s+", " "),   # 1/2 ad ~ 1/2ad
]]


def normalise(s):
    """Shared surface form of reasoning and key steps: \\frac{12}{2} ~ 12/2, \\times ~ * ~ x."""
    s = s.lower()
    for pattern, repl in _MATCH_SUBS:
        s = pattern.sub(repl, s)
    return s.strip()


def _same_token(a, b):
    return a == b or (len(a) >= FUZZY_MIN_LEN and (a + b).isalpha() and fuzz.ratio(a, b) >= FUZZY_THRESHOLD)


def _found(alt, text):
    """alt occurs in text on token boundaries: 12 ≠ 120, 1.5 ≠ 11.5, 'sine' is not in 'cosine'.
    Failing that, a near match (rapidfuzz) counts if it differs from alt only by typos inside
    words of FUZZY_MIN_LEN+ letters: numbers, symbols and short words ('red', '1') stay exact."""
    if not alt:
        return False
    pre = r"(?<![\d.])" if alt[0].isdigit() or alt[0] == "." else r"(?<![a-z])" if alt[0].isalpha() else ""
    post = r"(?!\.?\d)" if alt[-1].isdigit() else ""
    if re.search(pre + re.escape(alt) + post, text):
        return True
    if len(alt) > len(text) or not re.search(r"[a-z]{%d}" % FUZZY_MIN_LEN, alt):
        return False
    hit = fuzz.partial_ratio_alignment(alt, text, score_cutoff=FUZZY_THRESHOLD)
    if hit is None:
        return False
    # the aligned span, widened to whole tokens, must hold alt's tokens pairwise
    start = hit.dest_start - len(re.search(r"[\w.]*$", text[max(0, hit.dest_start - 40):hit.dest_start]).group())
    end = hit.dest_end + len(re.match(r"[\w.]*", text[hit.dest_end:hit.dest_end + 40]).group())
    want, got = _TOKEN.findall(alt), _TOKEN.findall(text[start:end])
    return any(all(map(_same_token, want, got[j:j + len(want)])) for j in range(len(got) - len(want) + 1))


def validate_key_steps(key_steps, where=""):
    """Either accepted key-step format -> list of groups of alternative strings; ValueError if malformed.

    Accepts {"Steps": [[alt, ...], ...]}, a list of strings or lists of strings, or either as JSON.
    Empty alternatives are dropped: "" is a substring of everything. A group that is empty, null or
    only empty strings stays as [], never found but counted in k's denominator (so an annotation
    error costs k, never inflates it); the official code counts [] the same way, and fails on null.
    """
    at = f" ({where})" if where else ""
    if isinstance(key_steps, str):
        try:
            key_steps = json.loads(key_steps)
        except json.JSONDecodeError as e:
            raise ValueError(f"key_steps{at}: a string that is not JSON ({e})") from None
    if isinstance(key_steps, dict):
        if "Steps" not in key_steps:
            raise ValueError(f"key_steps{at}: dict without a 'Steps' key, keys: {sorted(map(str, key_steps))}")
        key_steps = key_steps["Steps"]
    if not isinstance(key_steps, (list, tuple)):
        raise ValueError(f"key_steps{at}: expected {{'Steps': [[alt, ...], ...]}} or a list of groups, "
                         f"got {type(key_steps).__name__}")
    groups = []
    for i, group in enumerate(key_steps):
        alts = [] if group is None else group if isinstance(group, (list, tuple)) else [group]
        if not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in alts):
            raise ValueError(f"key_steps{at}: group {i} must be a string or a list of strings, got {group!r:.80}")
        groups.append([str(a).strip() for a in alts if str(a).strip()])
    return groups


def match_key_steps(reasoning, key_steps):
    """(k, matched): k of Eq. 2 = #(groups with an alternative found) / #groups; matched holds per
    group the first alternative found, or None. key_steps None or no groups give k = 0; an empty
    group is never found.

    Only the '### Step N:' bodies are searched, as in the official code: key steps pasted into the
    description, the rationale or after the answer must not count. Step text over MAX_STEP_CHARS
    earns k = 0: no rollout is that long, only a hunt listing numbers is. Within it, a list of
    numbers can still hit bare-number key steps (as in the official code); that gain is <= α.
    """
    groups = [] if key_steps is None else validate_key_steps(key_steps)
    steps = step_text(reasoning) if isinstance(reasoning, str) else ""
    if not groups or not steps or len(steps) > MAX_STEP_CHARS:
        return 0.0, [None] * len(groups)
    text = normalise(steps)
    matched = [next((a for a in alts if _found(normalise(a).rstrip("."), text)), None) for alts in groups]
    return sum(m is not None for m in matched) / len(groups), matched


# ---------------------------------------------------------------------------- Eq. 2 and Eq. 3
def _judge(text, solution, key_steps):
    """(answer, correct, k, matched) of one completion (its visible reply)."""
    text = visible_reply(text)
    answer = extract_answer(text)
    return (answer, answer is not None and is_correct(answer, solution)) + match_key_steps(text, key_steps)


def step_rar(completion, solution, key_steps, alpha=ALPHA):
    """Paper Eq. 2 (StepRAR): r = 1 + α·k if the answer is correct, α·k if wrong, 0 if there is none."""
    text = completion if isinstance(completion, str) else ""
    answer, correct, k, _ = _judge(text, solution, key_steps)
    return 0.0 if answer is None else float(correct) + alpha * k


def step_rvr(completion):
    """Paper Eq. 3 (StepRVR): r = 1 if the completion is complete and logical, else 0.

    Complete: one non-empty description, one non-empty rationale, non-empty steps, exactly one
    final-answer header with a non-empty answer. Logical: description, rationale (optional "Let's
    think step by step."), steps numbered 1..n in order, the answer last. Judged on the visible reply.
    """
    secs = _sections(visible_reply(completion)) if isinstance(completion, str) else []
    kinds = [kind for kind, _, _ in secs]
    steps = [i for i, kind in enumerate(kinds) if kind == "step"]
    complete = (kinds.count("desc") == kinds.count("rat") == kinds.count("answer") == 1
                and kinds.count("think") <= 1 and steps
                and all(body for kind, _, body in secs if kind in ("desc", "rat", "step"))
                and extract_answer(completion) is not None)
    if not complete:
        return 0.0
    numbered = [secs[i][1] for i in steps] == list(range(1, len(steps) + 1))
    head = [kinds.index("desc"), kinds.index("rat")] + ([kinds.index("think")] if "think" in kinds else [])
    contiguous = steps == list(range(steps[0], steps[-1] + 1))
    in_order = head == sorted(head) and head[-1] < steps[0] and contiguous
    return 1.0 if numbered and kinds[-1] == "answer" and in_order else 0.0


def reward(completion, sample, kind="step", alpha=ALPHA):
    """Reward of one completion for one sample {"solution", "key_steps"}; never raises on the completion.

    kind: "step" = StepRAR + StepRVR (StepGRPO), "steprar" / "steprvr" = one of them (Table 2
    ablations), "outcome" = 1 if the answer is correct else 0 (the GRPO baseline).
    Returns {"total", "step_rar", "step_rvr", "correct", "answer", "k", "matched"}. Malformed
    key_steps raise ValueError (the data loader validates them at load time).
    official.reward computes the same parts as the released code does.
    """
    if kind not in KINDS:
        raise ValueError(f"reward kind {kind!r}: expected one of {KINDS}")
    text, sample = completion if isinstance(completion, str) else "", sample or {}
    answer, correct, k, matched = _judge(text, sample.get("solution"), sample.get("key_steps"))
    rar = 0.0 if answer is None else float(correct) + alpha * k
    return combine(kind, rar, step_rvr(text), correct, answer, k, matched)


def combine(kind, rar, rvr, correct, answer, k, matched):
    """The reward dict of one completion from its parts; `kind` picks the total."""
    total = {"step": rar + rvr, "outcome": float(correct), "steprar": rar, "steprvr": rvr}[kind]
    return {"total": total, "step_rar": rar, "step_rvr": rvr, "correct": correct,
            "answer": answer, "k": k, "matched": matched}
