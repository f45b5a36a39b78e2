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

These follow the paper's equations. grading/official_rewards.py reproduces the reward functions of the released
code (jingyi0000/R1-VL, src/r1-vl/src/open_r1/grpo.py: accuracy_reward and validity_reward), bugs
included, so the two can be compared (`train.py --reward_impl official`).

Deliberate differences from the released code:
1. Eq. 2 as written: no answer scores 0. The official code adds α·k regardless.
2. Eq. 3 as written: description and rationale precede the steps, each section once and non-empty,
   one non-empty final answer. The official code checks that four headers exist and that the
   steps are numbered 1..n before the first answer header (or that the text ends with the header).
3. The answer is the text after '### The final answer is:' (with \\boxed{}, $...$, option letters,
   numbers and number words, yes/no sentences compared by the rules of grading/answers.py), then math-verify as
   verify(gold, prediction). The official code runs math-verify on the whole completion, as
   verify(prediction, gold) (swapped; math-verify is asymmetric), so a number anywhere in the
   steps can count as the answer; then it compares the strings exactly.
4. Key-step matching is soft (LaTeX ~ plain forms, number words, typos in long words) but a number
   only matches the same whole number; the official substring search finds "12" inside "120".
5. Several final-answer headers: invalid for Eq. 3; no answer for Eq. 2 if their answers differ.
6. Bounded work: step text over MAX_STEP_CHARS earns k = 0, answers over answers.MAX_ANSWER_CHARS
   are wrong, math-verify only sees short, tame strings and runs under a timeout (main thread).
"""
import json
import re

from rapidfuzz import fuzz

from grading.answers import NUM_WORDS, extract_answer, is_correct, visible_reply

ALPHA = 0.1                 # α of Eq. 2
MAX_STEP_CHARS = 12_000     # ~3k tokens, above the 1,024-token rollout budget: only hunting exceeds it
FUZZY_THRESHOLD = 85        # rapidfuzz ratio (0-100) of a word with a typo: isoceles ~ isosceles (94)
FUZZY_MIN_LEN = 6           # shorter words ("red", "one"), numbers and symbols must match exactly
KINDS = ("step", "outcome", "steprar", "steprvr")

# ---------------------------------------------------------------------------- parsing the format
_HEADER = re.compile(r"^[ \t]*#{2,4}[ \t]*(image description|rationales?|let'?s think step by step"
                     r"|step[ \t]*(\d{1,6})(?!\d)|the final answer is)[ \t]*[:.]?[ \t]*(.*)$", re.I | re.M)
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


# ---------------------------------------------------------------------------- key steps
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
    return 0.0 if validity_failure(completion) else 1.0


VALIDITY_RULES = ("missing_section", "step_numbering", "answer_not_last", "wrong_order")


def validity_failure(completion):
    """The first rule of Eq. 3 that a completion breaks (one of VALIDITY_RULES), or None when it is valid:
    a section missing, empty or repeated; steps not numbered 1..n; the answer not after the last step;
    description, rationale and steps out of order."""
    secs = _sections(visible_reply(completion)) if isinstance(completion, str) else []
    kinds = [kind for kind, _, _ in secs]
    steps = [i for i, kind in enumerate(kinds) if kind == "step"]
    complete = (kinds.count("desc") == kinds.count("rat") == kinds.count("answer") == 1
                and kinds.count("think") <= 1 and steps
                and all(body for kind, _, body in secs if kind in ("desc", "rat", "step"))
                and extract_answer(completion) is not None)
    if not complete:
        return "missing_section"
    if [secs[i][1] for i in steps] != list(range(1, len(steps) + 1)):
        return "step_numbering"
    if kinds[-1] != "answer":
        return "answer_not_last"
    head = [kinds.index("desc"), kinds.index("rat")] + ([kinds.index("think")] if "think" in kinds else [])
    contiguous = steps == list(range(steps[0], steps[-1] + 1))
    return None if head == sorted(head) and head[-1] < steps[0] and contiguous else "wrong_order"


def key_step_spans(completion, matched):
    """Where each matched key step (match_key_steps' `matched`) stands in the completion: [start, end] character
    offsets within its step sections, or None. The match itself is made on normalised text, so a span is the
    alternative where it occurs as written, else the line that holds its normalised form, else its closest
    stretch (a typo): for showing, not for scoring."""
    text = completion if isinstance(completion, str) else ""
    offset = text.rfind("</think>") + len("</think>") if "</think>" in text else 0
    heads = list(_HEADER.finditer(text, offset))
    first = next((m.start() for m in heads if m.group(2)), None)
    if first is None:
        return [None] * len(matched)
    end = next((m.start() for m in heads if m.start() > first and m.group(1)[:3].lower() == "the"), len(text))
    region, spans = text[first:end].lower(), []
    for alt in matched:
        if alt is None:
            spans.append(None)
            continue
        tokens = _TOKEN.findall(alt.lower())              # any spacing between tokens: "blue = 1" ~ "blue=1"
        pre = r"(?<![\d.])" if alt[0].isdigit() else r"(?<![a-z])" if alt[0].isalpha() else ""
        found = re.search(pre + r"\s*".join(map(re.escape, tokens)) + (r"(?!\.?\d)" if alt[-1].isdigit() else ""), region)
        if not found:                                     # LaTeX or worded forms: the line that holds it
            want = normalise(alt).rstrip(".")
            found = next((m for m in re.finditer(r"[^\n]+", region) if _found(want, normalise(m.group()))), None)
        hit = None if found else fuzz.partial_ratio_alignment(alt.lower(), region, score_cutoff=FUZZY_THRESHOLD)
        spans.append([first + found.start(), first + found.end()] if found else
                     [first + hit.dest_start, first + hit.dest_end] if hit else None)
    return spans


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
