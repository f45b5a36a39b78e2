"""grading/official_rewards.py: the rewards as the released R1-VL code computes them, for A/B runs against the paper's.

The official accuracy_reward and validity_reward (jingyi0000/R1-VL, src/r1-vl/src/open_r1/grpo.py),
rewritten step by step in our words. Every quirk below is the official code's, kept on purpose;
rewards.py lists where the paper's equations (our default) differ. `train.py --reward_impl official`
trains with these.

    reward(completion, sample, kind="step")   # the same dict as rewards.reward

One addition: a think block (rewards.visible_reply) is removed first; the released code never met one.
"""
import json
import re
import threading

from math_verify import parse, verify

from rewards import ALPHA, KINDS, combine, validate_key_steps, visible_reply

_OFFICIAL_HEADERS = ("### Image Description:", "### Rationales:", "### Step 1:", "### The final answer is:")
_OFFICIAL_STEP = re.compile(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", re.S)   # body: up to the next "\n###"
_OFFICIAL_STEP_HEAD = re.compile(r"### Step (\d+):")
_OFFICIAL_ANSWER = re.compile(r"### The final answer is:\s*\n?(.*)")


def official_answer(text):
    """The official string answer: the rest of the line after the first '### The final answer is:'
    (whitespace and blank lines after the header skipped), stripped, nothing else removed; without
    the header, the whole text stripped. The official code applies it to the solution too."""
    m = _OFFICIAL_ANSWER.search(text)
    return m.group(1).strip() if m else text.strip()


def official_correct(completion, solution):
    """The official correctness test, in its order:
    1. math-verify on the whole completion: verify(parse(completion), parse(solution)) with the
       library's defaults (LaTeX and plain expressions; 5 s timeouts). parse keeps one expression:
       the rightmost after 'final answer ... is' or in \\boxed{}, else after 'answer', else the
       last number or $...$ anywhere. So the steps' last number is the answer when the answer
       section is missing, '8 or 9' is read as 8, and undelimited LaTeX such as 2\\sqrt{3} as 2.
       The completion sits in verify's gold slot; math-verify is asymmetric, so an inequality
       answer is right against an interval solution, not the reverse. A timeout or any error
       counts as 'not equal'.
    2. Failing that, exact equality of official_answer(completion) and official_answer(solution):
       no case folding, option letters or LaTeX, so '(C)', 'c' and 'Yes.' are wrong against 'C' / 'Yes'.
    math-verify's timeouts are signal alarms, main thread only: elsewhere the official call raises,
    which would leave only step 2, so off the main thread we call it without timeouts instead.
    """
    main = threading.current_thread() is threading.main_thread()
    no_alarm = ({}, {}) if main else ({"parsing_timeout": None}, {"timeout_seconds": None})
    try:
        if float(verify(parse(completion, **no_alarm[0]), parse(solution, **no_alarm[0]), **no_alarm[1])) > 0:
            return True
    except Exception:
        pass
    try:
        return official_answer(completion) == official_answer(solution)
    except Exception:   # a solution that is no string
        return False


def official_key_steps(completion, key_steps):
    """(k, matched) as the official code counts key steps: the '### Step N:' bodies (exact header
    spelling; a body ends at the next line starting with '###') joined by spaces and lowercased;
    a group is found if one alternative, lowercased, is a substring: '12' is found in '120', and an
    empty alternative is found even in no text. Alternatives are not stripped. Empty groups are
    never found and count in the denominator ([] as in the official code; null, on which the
    official code fails, likewise). Malformed key_steps raise as in validate_key_steps."""
    if key_steps is None:
        return 0.0, []
    validate_key_steps(key_steps)
    raw = json.loads(key_steps) if isinstance(key_steps, str) else key_steps
    raw = raw["Steps"] if isinstance(raw, dict) else raw
    groups = [[] if g is None else list(g) if isinstance(g, (list, tuple)) else [g] for g in raw]
    text = " ".join(_OFFICIAL_STEP.findall(completion)).lower()
    matched = [next((a for a in alts if str(a).lower() in text), None) for alts in groups]
    return (sum(m is not None for m in matched) / len(groups) if groups else 0.0), matched


def official_validity(text):
    """The official validity reward, 1.0 or 0.0:
    complete -- '### Image Description:', '### Rationales:', '### Step 1:' and '### The final answer
                is:' occur somewhere (case and spacing exact); nothing is checked about their order,
                count or content: empty sections, repeated answers and sections after the answer pass.
    logical  -- the first answer header starts after the end of the last '### Step N:' header,
                except that a text ending in an empty answer header skips this check (so it passes
                with no answer and with the answer before the steps); and the step numbers, in
                order of appearance, are exactly 1, 2, ..., n.
    """
    if not all(header in text for header in _OFFICIAL_HEADERS):
        return 0.0
    if not text.strip().endswith(_OFFICIAL_HEADERS[3]):
        last_step_end = [m.end() for m in _OFFICIAL_STEP_HEAD.finditer(text)][-1]   # "### Step 1:" is there
        if text.index(_OFFICIAL_HEADERS[3]) < last_step_end:
            return 0.0
    numbers = [int(n) for n in _OFFICIAL_STEP_HEAD.findall(text)]
    return 1.0 if numbers == list(range(1, len(numbers) + 1)) else 0.0


def step_rar(completion, solution, key_steps, alpha=ALPHA):
    """The official accuracy reward: 1 if official_correct else 0, plus α·k with k from
    official_key_steps, also when there is no answer (the official α is 0.1 = ALPHA)."""
    text = visible_reply(completion) if isinstance(completion, str) else ""
    return float(official_correct(text, solution)) + alpha * official_key_steps(text, key_steps)[0]


def step_rvr(completion):
    """The official validity reward (official_validity)."""
    return official_validity(visible_reply(completion) if isinstance(completion, str) else "")


def reward(completion, sample, kind="step", alpha=ALPHA):
    """rewards.reward as the official code computes it: "step" is the official total, accuracy +
    validity; "answer" is official_answer, or None without an answer header; `correct` may be
    True without one (math-verify found the number in the steps)."""
    if kind not in KINDS:
        raise ValueError(f"reward kind {kind!r}: expected one of {KINDS}")
    text, sample = visible_reply(completion) if isinstance(completion, str) else "", sample or {}
    correct = official_correct(text, sample.get("solution"))
    k, matched = official_key_steps(text, sample.get("key_steps"))
    answer = official_answer(text) if _OFFICIAL_ANSWER.search(text) else None
    return combine(kind, float(correct) + alpha * k, official_validity(text), correct, answer, k, matched)
