"""Rewards as a specification: Eq. 2 (StepRAR), Eq. 3 (StepRVR), answers, key steps, reward hacking."""
import threading
import time

import pytest

from grading import official_rewards as official
from training.data import key_steps_from_solution
import rewards
from rewards import (ALPHA, MAX_STEP_CHARS, extract_answer, is_correct, match_key_steps, reward, step_rar, step_rvr,
                     validate_key_steps)

DESC = "### Image Description:\nA basket with 3 red apples and 5 green apples."
RAT = "### Rationales:\nCount the apples of each colour, then add them."
THINK = "### Let's think step by step."
S1 = "### Step 1:\nThere are 3 red apples and 5 green apples."
S2 = "### Step 2:\nAdding them gives 3 + 5 = 8."
S3 = "### Step 3:\nSo the basket holds 8 apples."
ANS = "### The final answer is: 8"
KEY = {"Steps": [["3 + 5 = 8", "3 plus 5 equals 8"], ["8 apples", "eight apples"]]}
SAMPLE = {"solution": "8", "key_steps": KEY}


def fmt(*sections):
    return "\n\n".join(sections)


GOOD = fmt(DESC, RAT, THINK, S1, S2, S3, ANS)
ONLY_HEADERS = fmt(*(s.split("\n")[0] for s in (DESC, RAT, THINK, S1, S2, S3)), "### The final answer is:")

# ---------------------------------------------------------------------------- Eq. 2 (StepRAR)


@pytest.mark.parametrize("completion, solution, expected", [
    (GOOD, "8", 1 + ALPHA),                                       # correct, k = 1
    (fmt(DESC, RAT, S1, ANS), "8", 1.0),                           # correct, k = 0
    (fmt(DESC, RAT, S1, S2, ANS), "8", 1 + ALPHA / 2),            # correct, k = 1/2
    (GOOD.replace(ANS, "### The final answer is: 9"), "8", ALPHA),  # wrong, k = 1
    (fmt(DESC, RAT, S1, S2, "### The final answer is: 9"), "8", ALPHA / 2),  # wrong, k = 1/2
    (fmt(DESC, RAT, S1, S2, S3), "8", 0.0),                        # no answer: 0 whatever k is
])
def test_step_rar_follows_eq2(completion, solution, expected):
    assert step_rar(completion, solution, KEY) == pytest.approx(expected)


def test_no_answer_scores_zero_but_official_adds_alpha_k():
    no_answer = fmt(DESC, RAT, S1, S2, "### Step 3:\nSo 9 remain.")   # k = 1/2; its last number is wrong
    assert step_rar(no_answer, "8", KEY) == 0.0
    assert official.step_rar(no_answer, "8", KEY) == pytest.approx(ALPHA / 2)


def test_alpha_scales_the_key_step_term():
    assert step_rar(GOOD, "8", KEY, alpha=0.5) == pytest.approx(1.5)


def test_zero_key_step_groups_give_k_zero():
    assert match_key_steps(GOOD, {"Steps": []}) == (0.0, [])
    assert step_rar(GOOD, "8", []) == 1.0


# ---------------------------------------------------------------------------- Eq. 3 (StepRVR)
S2_FIRST = "### Step 2:\nAdding them gives 3 + 5 = 8."


@pytest.mark.parametrize("name, completion, expected, released", [
    ("complete and logical", GOOD, 1.0, 1.0),
    ("without the optional think line", fmt(DESC, RAT, S1, ANS), 1.0, 1.0),
    ("answer on the next line", fmt(DESC, RAT, S1, "### The final answer is:\n8"), 1.0, 1.0),
    ("step text on the header line", fmt(DESC, RAT, "### Step 1: 3 + 5 = 8", ANS), 1.0, 1.0),
    ("answer with no steps", fmt(DESC, RAT, THINK, ANS), 0.0, 0.0),
    ("steps with no rationale", fmt(DESC, S1, S2, ANS), 0.0, 0.0),
    ("steps with no description", fmt(RAT, S1, S2, ANS), 0.0, 0.0),
    ("answer before steps", fmt(DESC, RAT, ANS, S1, S2), 0.0, 0.0),
    ("steps out of order", fmt(DESC, RAT, S2_FIRST, S1, ANS), 0.0, 0.0),
    ("step numbers skipping", fmt(DESC, RAT, S1, S3, ANS), 0.0, 0.0),
    ("steps starting at 2", fmt(DESC, RAT, S2, S3, ANS), 0.0, 0.0),
    ("a step number repeated", fmt(DESC, RAT, S1, S1, ANS), 0.0, 0.0),
    ("no final answer", fmt(DESC, RAT, S1, S2), 0.0, 0.0),
    ("empty final answer", fmt(DESC, RAT, S1, "### The final answer is:"), 0.0, 1.0),
    ("empty step", fmt(DESC, RAT, "### Step 1:", S2.replace("2", "1", 1), ANS), 0.0, 0.0),
    ("empty description", fmt("### Image Description:", RAT, S1, ANS), 0.0, 1.0),
    ("answer header twice, same answer", fmt(DESC, RAT, S1, ANS, ANS), 0.0, 1.0),
    ("answer header twice, different answers", fmt(DESC, RAT, S1, ANS, "### The final answer is: 9"), 0.0, 1.0),
    ("two descriptions", fmt(DESC, DESC, RAT, S1, ANS), 0.0, 1.0),
    ("rationale after the steps", fmt(DESC, S1, S2, RAT, ANS), 0.0, 1.0),
    ("description after the rationale", fmt(RAT, DESC, S1, ANS), 0.0, 1.0),
    ("only headers", ONLY_HEADERS, 0.0, 1.0),
    ("", "", 0.0, 0.0),
])
def test_step_rvr_follows_eq3(name, completion, expected, released):
    assert step_rvr(completion) == expected, name
    assert official.step_rvr(completion) == released, name


@pytest.mark.parametrize("completion, rule", [
    (GOOD, None),
    (fmt(DESC, S1, S2, ANS), "missing_section"),                    # no rationale
    (fmt(DESC, RAT, S1, ANS, ANS), "missing_section"),              # a section repeated
    (fmt(DESC, RAT, S1, S3, ANS), "step_numbering"),
    (fmt(DESC, RAT, S1, S2, ANS, "### Step 3:\nmore"), "answer_not_last"),
    (fmt(DESC, S1, S2, RAT, ANS), "wrong_order"),
])
def test_validity_failure_names_the_rule_eq3_fails(completion, rule):
    assert rewards.validity_failure(completion) == rule
    assert step_rvr(completion) == float(rule is None)


def test_key_step_spans_point_at_the_matched_text_in_the_steps():
    text = fmt(DESC, RAT, "### Step 1:\nThere are 3 red and 5 blue=8 cells.", ANS)
    k, matched = match_key_steps(text, [["3 red"], ["blue = 8"], ["green"]])
    spans = rewards.key_step_spans(text, matched)
    assert [text[a:b] for a, b in spans[:2]] == ["3 red", "blue=8"] and spans[2] is None
    assert all(a > text.index("### Step 1") for a, _ in spans[:2])     # never in the description


# ---------------------------------------------------------------------------- extract_answer
@pytest.mark.parametrize("text, expected", [
    ("### The final answer is: B", "B"),
    ("### The final answer is:\nB", "B"),
    ("### The final answer is:\n\n  42  ", "42"),
    ("### The final answer is: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("### The final answer is: $12$.", "12"),
    ("### the final answer is: yes", "yes"),
    ("so x equals \\boxed{\\frac{\\sqrt{2}}{2}} here", "\\frac{\\sqrt{2}}{2}"),
    ("Adding up the bars. The answer is 17.", "17"),
    ("The final answer is: C", "C"),
    ("### The final answer is:", None),
    ("### The final answer is:   \n\n", None),
    ("### The final answer is: \\boxed{}", None),
    ("### The final answer is:\n### Step 3:\nmore", None),
    ("### The final answer is: 8\n\n### The final answer is: 8", "8"),
    ("### The final answer is: 8\n\n### The final answer is: 9", None),
    ("### The final answer is: A\n### The final answer is: B\n### The final answer is: C", None),
    ("### Step 1:\n3 + 5 = 8", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------- is_correct
REF_PATH = fmt(DESC, RAT, S1, S2, "### The final answer is: B: 8")


@pytest.mark.parametrize("prediction, truth, expected", [
    # option letters
    ("B", "B", True), ("(B)", "B", True), ("B: 8", "B", True), ("B. 8", "B", True),
    ("b", "B", True), ("B", "(B)", True), ("Option B", "B", True), ("B", "B: 8", True),
    ("8", "B: 8", True), ("B: 8", "8", True), ("B", REF_PATH, True), ("8", REF_PATH, True),
    ("A", "B", False), ("(C)", "B", False), ("A: 8", "B", False), ("A, B, C, D", "B", False),
    ("A B C D", "B", False), ("B or C", "B", False), ("ABCD", "B", False), ("9", "B: 8", False),
    ("8", "B", False),
    # numbers
    ("8", "8", True), ("2", "2.0", True), ("2.0", "2", True), ("1,000", "1000", True),
    ("1000", "1,000", True), ("12 cm", "12", True), ("12", "12 cm^2", True), ("5.", "5", True),
    ("50%", "50", True), ("50%", "0.5", True), ("$12", "12", True), ("x = 5", "5", True),
    ("30°", "30", True), ("30^\\circ", "30 degrees", True), ("-3", "-3.0", True),
    ("0.333333", "1/3", True), ("0.3333", "1/3", False), ("12", "120", False), ("120", "12", False),
    ("1.5", "11.5", False),
    ("2", "2.1", False), ("1, 2", "12", False), ("5 and 6", "5", False), ("1, 2, 3", "2", False),
    ("0.5", "5", False), ("-3", "3", False), ("1/0", "2/0", False), ("1" + "0" * 400, "2" + "0" * 400, False),
    # LaTeX and expressions
    ("\\frac{1}{2}", "0.5", True), ("0.5", "\\frac{1}{2}", True), ("\\dfrac{3}{4}", "0.75", True),
    ("1/2", "\\frac{1}{2}", True), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True), ("x+1", "1+x", True), ("\\frac{1}{3}", "0.5", False),
    ("\\sqrt{3}", "\\sqrt{2}", False), ("2\\pi", "\\pi", False),
    # text
    ("Yes", "yes", True), ("yes.", "Yes", True), ("Red apple", "red  apple", True),
    # a lone number word, Unicode roots, a yes/no sentence; never a hedge or a longer phrase
    ("eight", "8", True), ("8", "Eight", True), ("Eight.", "8", True), ("B: eight", "8", True),
    ("eight", "9", False), ("one third", "1", False),
    ("2√3", "2\\sqrt{3}", True), ("2\\sqrt{3}", "2√3", True), ("√3/2", "\\frac{\\sqrt{3}}{2}", True),
    ("2π", "2\\pi", True), ("2√3", "2\\sqrt{2}", False), ("2√3", "2", False),
    ("Yes, the red bar is taller.", "yes", True), ("No, there is no red bar.", "no", True),
    ("Yes, the red bar is taller.", "no", False), ("No, the red bar is taller.", "yes", False),
    ("Yes, no.", "yes", False), ("Yes. No.", "yes", False), ("yes or no", "yes", False),
    ("no", "yes", False), ("blue", "red", False), ("on", "no", False), ("ab", "ba", False),
    ("5 or more", "5", False), ("5 to 6", "5", False),
    # no answer
    ("", "8", False), (None, "8", False), ("8", None, False), ("8", "", False),
    # a full completion as the prediction: several different final answers are no answer
    (fmt(S1, ANS), "8", True), (fmt(S1, ANS, "### The final answer is: 9"), "8", False),
])
def test_is_correct(prediction, truth, expected):
    assert is_correct(prediction, truth) is expected


def test_is_correct_works_outside_the_main_thread():
    out = {}
    worker = threading.Thread(target=lambda: out.update(
        yes=is_correct("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), no=is_correct("\\sqrt{3}", "\\sqrt{2}")))
    worker.start()
    worker.join(10)
    assert out == {"yes": True, "no": False}


def test_pathological_math_is_bounded():
    start = time.perf_counter()
    assert not is_correct("10^{10^{10^{10^{10}}}}", "1")
    assert not is_correct("(" * 200 + "1" + ")" * 200, "1")
    assert time.perf_counter() - start < 2


# ---------------------------------------------------------------------------- key-step matching
def steps(*bodies):
    return fmt(*(f"### Step {i}:\n{b}" for i, b in enumerate(bodies, 1)))


@pytest.mark.parametrize("body, alternative, expected", [
    ("So \\frac{12}{2} = 6.", "12/2=6", True),
    ("So 12/2 = 6.", "\\frac{12}{2} = 6", True),
    ("We get $6 \\times 4 = 24$.", "6*4=24", True),
    ("We get 6 x 4 = 24.", "6 \\times 4 = 24", True),
    ("We get 6 \\cdot 4 = 24.", "6 × 4 = 24", True),
    ("Hence AE = 1/2 AD.", "ae=1/2ad", True),
    ("The total is 1,000 dollars.", "1000 dollars", True),
    ("Angle ABC is 30^\\circ.", "ABC is 30°", True),
    ("The triangle is isoceles, so AB = AC.", "isosceles", True),
    ("Since the lines are paralell", "parallel", True),
    ("There are 3 red balls.", "3 red", True),
    ("The value is 12.", "12", True),
    ("The value is 120.", "12", False),
    ("The value is 112.", "12", False),
    ("The value is 12.5.", "12", False),
    ("The value is 11.5.", "1.5", False),
    ("The total is 16 apples", "the total is 15 apples", False),
    ("There are 13 red balls.", "3 red", False),
    ("The triangle is right-angled.", "isosceles", False),
    ("The triangle is equilateral.", "isosceles", False),
    ("The lines are perpendicular.", "parallel", False),
    ("The sales decrease.", "increase", False),
    ("The diameter is 10.", "perimeter", False),
    ("There are two green cells.", "one green cells", False),
    ("There is one green cell.", "one green cell", True),
    ("Green has the most cells.", "red has the most cells", False),
    ("Use the cosine rule.", "sine", False),
    ("Both triangles are similar.", "triangle", True),
    ("It is a triangle.", "angle", False),
    ("green = 2", "green = 1", False),
])
def test_soft_matching_accepts_equivalent_forms_but_never_another_number(body, alternative, expected):
    k, matched = match_key_steps(steps(body), [[alternative]])
    assert (k == 1.0) is expected
    assert matched == [alternative if expected else None]


def test_both_key_step_formats_give_the_same_k():
    as_list = [["3 + 5 = 8", "3 plus 5 equals 8"], "8 apples"]
    assert match_key_steps(GOOD, KEY) == match_key_steps(GOOD, as_list) == (1.0, ["3 + 5 = 8", "8 apples"])


def test_any_alternative_of_a_group_counts():
    group = ["3 + 5 = 8", "three plus five equals eight"]
    k, matched = match_key_steps(steps("Three plus five equals eight."), [group])
    assert (k, matched) == (1.0, ["three plus five equals eight"])


@pytest.mark.parametrize("where", ["description", "rationale", "after the answer", "no step headers"])
def test_key_steps_outside_the_steps_do_not_count(where):
    pasted = "3 + 5 = 8, 8 apples"
    completion = {
        "description": fmt(DESC + " " + pasted, RAT, "### Step 1:\nCount.", ANS),
        "rationale": fmt(DESC, RAT + " " + pasted, "### Step 1:\nCount.", ANS),
        "after the answer": fmt(DESC, RAT, "### Step 1:\nCount.", ANS + "\n" + pasted),
        "no step headers": pasted,
    }[where]
    assert match_key_steps(completion, KEY) == (0.0, [None, None])


def test_over_long_step_text_earns_no_key_step_credit():
    long_steps = steps("3 + 5 = 8 and 8 apples. " + "x" * MAX_STEP_CHARS)
    assert match_key_steps(long_steps, KEY)[0] == 0.0


# ---------------------------------------------------------------------------- reward and its kinds
@pytest.mark.parametrize("kind, expected", [
    ("step", 2 + ALPHA), ("steprar", 1 + ALPHA), ("steprvr", 1.0), ("outcome", 1.0)])
def test_reward_kinds_on_a_good_completion(kind, expected):
    assert reward(GOOD, SAMPLE, kind=kind)["total"] == pytest.approx(expected)


@pytest.mark.parametrize("kind, expected", [
    ("step", ALPHA + 1.0), ("steprar", ALPHA), ("steprvr", 1.0), ("outcome", 0.0)])
def test_reward_kinds_on_a_wrong_answer(kind, expected):
    wrong = GOOD.replace(ANS, "### The final answer is: 9")
    assert reward(wrong, SAMPLE, kind=kind)["total"] == pytest.approx(expected)


def test_reward_reports_its_parts():
    r = reward(GOOD, SAMPLE)
    assert r == {"total": pytest.approx(2 + ALPHA), "step_rar": pytest.approx(1 + ALPHA), "step_rvr": 1.0,
                 "correct": True, "answer": "8", "k": 1.0, "matched": ["3 + 5 = 8", "8 apples"]}


def test_both_modes_agree_on_a_good_completion():
    assert official.reward(GOOD, SAMPLE) == reward(GOOD, SAMPLE)


# ---------------------------------------------------------------------------- official.py: the released code
NO_NUMBERS = "### Step 1:\nCount the apples."


def answered(answer):
    """A well-formed completion whose only number, if any, is in its answer."""
    return fmt(DESC, RAT, NO_NUMBERS, f"### The final answer is: {answer}")


# completion, solution, key_steps, (step_rar, step_rvr) official, (step_rar, step_rvr) paper
OFFICIAL = [
    # correctness: math-verify on the whole completion, completion in verify's gold slot
    pytest.param(fmt(DESC, RAT, S1, S2, S3), "8", KEY, (1 + ALPHA, 0.0), (0.0, 0.0),
                 id="math-verify reads the steps' last number when there is no answer section"),
    pytest.param(fmt(DESC, RAT, S1, S2, S3, "### The final answer is: 8 or 9"), "8", KEY, (1 + ALPHA, 1.0),
                 (ALPHA, 1.0), id="math-verify accepts the hedge '8 or 9'"),
    pytest.param(answered("$1 \\le x \\le 2$"), "$[1, 2]$", KEY, (1.0, 1.0), (0.0, 1.0),
                 id="verify(completion, solution): an inequality is right against its interval"),
    pytest.param(answered("$[1, 2]$"), "$1 \\le x \\le 2$", KEY, (0.0, 1.0), (1.0, 1.0),
                 id="verify(completion, solution): an interval is wrong against its inequality"),
    pytest.param(answered("2√3"), "2\\sqrt{2}", KEY, (1.0, 1.0), (0.0, 1.0),
                 id="parse reads only the 2 of 2√3 and of an undelimited 2 sqrt 2"),
    pytest.param(answered("$2\\sqrt{3}$"), "2\\sqrt{3}", KEY, (0.0, 1.0), (1.0, 1.0),
                 id="a delimited root is wrong against the same root undelimited"),
    # correctness: then exact strings after the first answer header
    pytest.param(answered("(C)"), "C", KEY, (0.0, 1.0), (1.0, 1.0), id="exact strings: (C) is wrong against C"),
    pytest.param(answered("c"), "C", KEY, (0.0, 1.0), (1.0, 1.0), id="exact strings: c is wrong against C"),
    pytest.param(answered("Yes."), "Yes", KEY, (0.0, 1.0), (1.0, 1.0), id="exact strings: Yes. is wrong against Yes"),
    pytest.param(answered("eight"), "8", KEY, (0.0, 1.0), (1.0, 1.0), id="exact strings: eight is wrong against 8"),
    pytest.param(answered("Yes, the red bar is taller."), "yes", KEY, (0.0, 1.0), (1.0, 1.0),
                 id="exact strings: a yes sentence is wrong against yes"),
    pytest.param(fmt(DESC, RAT, NO_NUMBERS, "### The final answer is:\n\nC"), "C", KEY, (1.0, 1.0), (1.0, 1.0),
                 id="the answer may stand lines below its header"),
    pytest.param(answered("C"), answered("C"), KEY, (1.0, 1.0), (1.0, 1.0),
                 id="a reference path as solution gives the text after its header"),
    pytest.param("", "", KEY, (1.0, 0.0), (0.0, 0.0), id="an empty completion equals an empty solution"),
    # key steps: lowercase substrings of the '### Step N:' bodies
    pytest.param(steps("The value is 120."), "5", {"Steps": [["12"]]}, (ALPHA, 0.0), (0.0, 0.0),
                 id="substring search: 12 is found in 120, even without an answer"),
    pytest.param(fmt(DESC, RAT, "### Step 1:\nThe RED BAR is taller.", ANS), "9", {"Steps": [["red bar"]]},
                 (ALPHA, 1.0), (ALPHA, 1.0), id="lowercase substring: red bar is found in RED BAR"),
    pytest.param(fmt(DESC, RAT, "### Step1:\n3 + 5 = 8 apples", ANS), "9", KEY, (0.0, 0.0), (ALPHA, 1.0),
                 id="exact header spelling: a '### Step1:' body is not searched"),
    pytest.param(fmt(DESC, RAT, "### Step 1:\nCount.\n### Note: 3 + 5 = 8 apples", ANS), "9", KEY, (0.0, 1.0),
                 (ALPHA, 1.0), id="a step body ends at the next line starting with ###"),
    pytest.param(answered("9"), "8", {"Steps": [[""], ["zzz"]]}, (ALPHA / 2, 1.0), (0.0, 1.0),
                 id="an empty alternative is found in any text"),
    # validity: four headers somewhere, steps 1..n before the first answer header
    pytest.param(fmt(DESC, RAT, S1, "### The final answer is:"), "9", KEY, (0.0, 1.0), (0.0, 0.0),
                 id="a text ending in an empty answer header is valid"),
    pytest.param(fmt(DESC, RAT, "### The final answer is: 9", S1, S2, "### The final answer is:"), "8", KEY,
                 (ALPHA / 2, 1.0), (0.0, 0.0), id="an empty answer header at the end skips the order check"),
    pytest.param(fmt(DESC, RAT, S1, ANS, "### The final answer is: 9"), "8", KEY, (1.0, 1.0), (0.0, 0.0),
                 id="several answers are valid; math-verify reads the last, the string test the first"),
    pytest.param(fmt(DESC, RAT, S1, ANS, RAT), "8", KEY, (1.0, 1.0), (1.0, 0.0),
                 id="a section after the answer is valid"),
    pytest.param(fmt("### Image Description:", RAT, S1, ANS), "8", KEY, (1.0, 1.0), (1.0, 0.0),
                 id="an empty section is valid"),
    pytest.param(fmt(DESC, S1, S2, S3, RAT, ANS), "8", KEY, (1 + ALPHA, 1.0), (1 + ALPHA, 0.0),
                 id="the rationale after the steps is valid"),
    pytest.param(fmt(DESC, "### Rationale:\nCount.", S1, ANS), "8", KEY, (1.0, 0.0), (1.0, 1.0),
                 id="exact header spelling: '### Rationale:' is invalid"),
    pytest.param(fmt(DESC, RAT, "### Step 1.\n3 + 5 = 8", ANS), "8", KEY, (1.0, 0.0), (1 + ALPHA / 2, 1.0),
                 id="exact header spelling: '### Step 1.' is no step"),
    pytest.param(fmt(DESC, RAT, S1, "### the final answer is: 8"), "8", KEY, (1.0, 0.0), (1.0, 1.0),
                 id="exact header spelling: a lowercase answer header is invalid"),
    pytest.param(fmt(DESC, RAT, S1, ANS, S2), "8", KEY, (1 + ALPHA / 2, 0.0), (1 + ALPHA / 2, 0.0),
                 id="a step after the first answer header is invalid"),
]


@pytest.mark.parametrize("completion, solution, key_steps, released, paper", OFFICIAL)
def test_official_mode_is_the_official_code(completion, solution, key_steps, released, paper):
    sample = {"solution": solution, "key_steps": key_steps}
    for mode, expected in ((True, released), (False, paper)):
        r = (official.reward if mode else reward)(completion, sample)
        assert (r["step_rar"], r["step_rvr"]) == pytest.approx(expected), "official" if mode else "paper"
        assert r["total"] == pytest.approx(sum(expected))


@pytest.mark.parametrize("kind, expected", [("step", 1 + ALPHA), ("steprar", 1 + ALPHA), ("steprvr", 0.0),
                                            ("outcome", 1.0)])
def test_official_mode_keeps_the_reward_kinds(kind, expected):
    no_answer = fmt(DESC, RAT, S1, S2, S3)   # right by math-verify, invalid by its missing answer header
    assert official.reward(no_answer, SAMPLE, kind=kind)["total"] == pytest.approx(expected)


def test_official_mode_off_the_main_thread_scores_the_same():
    cases = [(fmt(DESC, RAT, S1, S2, S3), SAMPLE), (answered("2√3"), {"solution": "2\\sqrt{2}", "key_steps": KEY})]
    out = []
    worker = threading.Thread(target=lambda: out.extend(official.reward(c, s) for c, s in cases))
    worker.start()
    worker.join(30)
    assert out == [official.reward(c, s) for c, s in cases]


def test_unknown_reward_kind_is_an_error():
    with pytest.raises(ValueError, match="reward kind"):
        reward(GOOD, SAMPLE, kind="format")


# ---------------------------------------------------------------------------- reward hacking
HONEST = reward(GOOD, SAMPLE)["total"]
PASTED = fmt(DESC + " 3 + 5 = 8, 8 apples", RAT, "### Step 1:\nCount.", ANS + " 3 + 5 = 8")


@pytest.mark.parametrize("name, completion, solution, at_most", [
    # each hack against the same sample; an honest correct completion scores 2 + α
    ("empty answer", GOOD.replace(ANS, "### The final answer is:"), "8", 0.0),
    ("answer header repeated with several answers",
     GOOD.replace(ANS, "\n".join(f"### The final answer is: {n}" for n in range(5, 12))), "8", 0.0),
    ("every option letter", GOOD.replace(ANS, "### The final answer is: A, B, C, D"), "B", 1 + ALPHA),
    ("every option letter, boxed", GOOD.replace(ANS, "### The final answer is: \\boxed{A, B, C, D}"), "B", 1 + ALPHA),
    ("key steps pasted outside the steps", PASTED, "8", 2.0),
    ("only headers", ONLY_HEADERS, "8", 0.0),
    ("number hunting, huge", "### Step 1:\n" + "3 + 5 = 8 8 apples 12 120 1.5 " * 6700, "8", 0.0),
])
def test_reward_hacks_score_below_honest_reasoning(name, completion, solution, at_most):
    r = reward(completion, {"solution": solution, "key_steps": KEY})
    assert r["total"] <= at_most < HONEST, name


def test_huge_number_listing_is_fast_and_earns_nothing():
    hunt = "### Step 1:\n" + "3 + 5 = 8 8 apples 12 120 " * 8000
    assert len(hunt) > 200_000
    well_formed = fmt(DESC, RAT, hunt, ANS)
    start = time.perf_counter()
    bare, formatted = reward(hunt, SAMPLE), reward(well_formed, SAMPLE)
    assert time.perf_counter() - start < 2
    assert bare["total"] == 0.0 and bare["k"] == 0.0
    assert formatted["k"] == 0.0 and formatted["total"] < HONEST   # correct answer, yet no hunting gain


# ---------------------------------------------------------------------------- robustness
WEIRD = [None, "", "   ", 12345, "### Step 1:\n面积 = 12 ✓ 🙂\n### The final answer is: 十二",
         "\x00\ufffd" * 1000, "#" * 300_000, "{" * 100_000 + "\\boxed{" * 1000,
         "### The final answer is: " + "9" * 200_000, "### The final answer is:\n" + " ." * 100_000 + "x",
         "The answer is " + " ." * 100_000 + "x", "### Step 1:\n" + "\\frac{" * 20_000,
         "### The final answer is: \\boxed{" + "{" * 50_000, "### Step 99999999:\n1\n" * 1000]


@pytest.mark.parametrize("completion", WEIRD, ids=range(len(WEIRD)))
@pytest.mark.parametrize("sample", [SAMPLE, None, {}, {"solution": None, "key_steps": None},
                                    {"solution": "", "key_steps": {"Steps": []}}])
def test_no_exception_escapes_reward(completion, sample):
    start = time.perf_counter()
    r = reward(completion, sample)
    assert time.perf_counter() - start < 2
    assert set(r) == {"total", "step_rar", "step_rvr", "correct", "answer", "k", "matched"}
    assert 0.0 <= r["total"] <= 2 + ALPHA and not r["correct"]


@pytest.mark.parametrize("completion", WEIRD, ids=range(len(WEIRD)))
def test_no_exception_escapes_official_reward(completion):
    r = official.reward(completion, SAMPLE)
    assert set(r) == {"total", "step_rar", "step_rvr", "correct", "answer", "k", "matched"}
    assert 0.0 <= r["total"] <= 2 + ALPHA


# ---------------------------------------------------------------------------- validate_key_steps
@pytest.mark.parametrize("key_steps, expected", [
    ({"Steps": [["a = 1", "a is 1"], ["b"]]}, [["a = 1", "a is 1"], ["b"]]),
    ([["a = 1"], "b"], [["a = 1"], ["b"]]),
    ('{"Steps": [["x"], ["y", "z"]]}', [["x"], ["y", "z"]]),
    ([[12, "twelve"], [" 3 red ", ""]], [["12", "twelve"], ["3 red"]]),
    ({"Steps": []}, []),
    ([["a"], [], None, ["", "  "]], [["a"], [], [], []]),   # empty groups stay, to count as not found
    ('{"Steps": [["a"], null]}', [["a"], []]),
])
def test_validate_key_steps_normalises_both_formats(key_steps, expected):
    assert validate_key_steps(key_steps) == expected


@pytest.mark.parametrize("key_steps, message", [
    (5, "got int"), (None, "got NoneType"), ({"steps": [["a"]]}, "'Steps' key"), ({"Steps": 5}, "got int"),
    ([["a", None]], "group 0"),
    ("not json", "not JSON"), ([True], "group 0"), ([{"a": 1}], "group 0"),
])
def test_malformed_key_steps_raise_with_location(key_steps, message):
    with pytest.raises(ValueError, match=message) as err:
        validate_key_steps(key_steps, where="data.jsonl line 12")
    assert "data.jsonl line 12" in str(err.value)


@pytest.mark.parametrize("released", [False, True], ids=["paper", "official"])
def test_empty_key_step_groups_are_never_found_but_count(released):
    key_steps = {"Steps": [["8 apples"], [], None]}
    match = official.official_key_steps if released else match_key_steps
    assert match(GOOD, key_steps) == (pytest.approx(1 / 3), ["8 apples", None, None])
    r = (official.reward if released else reward)(GOOD, {"solution": "8", "key_steps": key_steps})
    assert r["total"] == pytest.approx(2 + ALPHA / 3)


def test_reward_rejects_malformed_key_steps():
    with pytest.raises(ValueError, match="group 0"):
        reward(GOOD, {"solution": "8", "key_steps": [[None]]})


# ---------------------------------------------------------------------------- offline key steps
GEOMETRY = """### Image Description:
Triangle ABC with point D on side BC. AD is perpendicular to BC, AB = 10, BD = 6 and DC = 9.

### Rationales:
The question asks for the area of triangle ABC. AD is the height, found with the Pythagorean theorem.

### Let's think step by step.

### Step 1:
In the right triangle ABD, AD^2 = AB^2 - BD^2 = 10^2 - 6^2 = 64, so AD = 8.

### Step 2:
The base is BC = BD + DC = 6 + 9 = 15.

### Step 3:
The area is \\frac{1}{2} \\times BC \\times AD = \\frac{1}{2} \\times 15 \\times 8 = 60.

### The final answer is: 60"""

ARITHMETIC = """### Image Description:
A basket holds 3 red apples and 5 green apples; 4 children stand next to it.

### Rationales:
The question asks how many apples each child gets if the apples are shared equally.

### Let's think step by step.

### Step 1:
Count the apples: there are 3 red apples and 5 green apples, so 3 + 5 = 8 apples in total.

### Step 2:
Share them among 4 children: 8/4 = 2, so each child gets 2 apples.

### The final answer is: 2"""

CHART = """### Image Description:
A bar chart titled "Annual Sales" shows sales in millions of dollars: 2019 (45), 2020 (30), 2021 (60).

### Rationales:
The question asks for the percentage increase in sales from 2020 to 2021.

### Let's think step by step.

### Step 1:
Read the bar for 2020: the sales are 30 million.

### Step 2:
Read the bar for 2021: the sales are 60 million.

### Step 3:
The increase is 60 - 30 = 30, so the percentage increase is \\frac{30}{30} \\times 100\\% = 100\\%.

### The final answer is: 100%"""

PATHS = {"geometry": (GEOMETRY, "60"), "arithmetic": (ARITHMETIC, "2"), "chart": (CHART, "100%")}


@pytest.mark.parametrize("name", PATHS)
def test_a_reference_path_matches_all_its_own_key_steps(name):
    path, answer = PATHS[name]
    key_steps = key_steps_from_solution(path)
    assert len(key_steps["Steps"]) >= 3
    assert validate_key_steps(key_steps) == key_steps["Steps"]
    assert match_key_steps(path, key_steps)[0] == 1.0
    assert step_rar(path, answer, key_steps) == pytest.approx(1 + ALPHA)
    assert reward(path, {"solution": answer, "key_steps": key_steps})["total"] == pytest.approx(2 + ALPHA)
    assert key_steps_from_solution(path) == key_steps   # deterministic


@pytest.mark.parametrize("name, expected_group", [
    ("geometry", ["AD = 8", "8 = AD"]),
    ("geometry", ["BC = 15", "6 + 9 = 15"]),
    ("geometry", ["1/2 × BC × AD = 1/2 × 15 × 8 = 60", "1/2 × 15 × 8 = 60", "1/2 × BC × AD = 60"]),
    ("arithmetic", ["8/4 = 2", "8 divided by 4 equals 2", "\\frac{8}{4} = 2", "2 = 8/4"]),
    ("arithmetic", ["3 red", "three red"]),
    ("chart", ["60 - 30 = 30", "30 = 60 - 30"]),
    ("chart", ["30 million"]),
    ("chart", ["increase"]),
])
def test_key_steps_are_augmented_into_equivalent_forms(name, expected_group):
    groups = key_steps_from_solution(PATHS[name][0])["Steps"]
    assert any(set(expected_group) <= set(group) for group in groups), groups


def test_other_reasoning_matches_fewer_key_steps():
    key_steps = key_steps_from_solution(GEOMETRY)
    other = fmt(DESC, RAT, "### Step 1:\nAD = 7 and BC = 16.", "### Step 2:\nThe area is 56.",
                "### The final answer is: 56")
    assert match_key_steps(other, key_steps)[0] < 0.5
    assert step_rar(other, "60", key_steps) < ALPHA / 2


# ---------------------------------------------------------------------------- final answers stated in a free-form reply
from grading.answers import stated_answer  # noqa: E402


@pytest.mark.parametrize("reply, answer", [
    ("The legs are 6 and 8.\n### The final answer is: 10", "10"),          # R1-VL's header first
    ("First, 6 + 8 = 14.\nFinal answer: 14", "14"),
    ("Adding the sides, the answer is 14 cm.\nThat is all.", "14 cm"),     # the phrase wins over the last line
    ("So the perimeter is $\\boxed{14}$ in total.", "14"),
    ("两边相加，所以答案是 14。", "14"),
    ("由图可知\n答案：B", "B"),
    ("最终答案为 7", "7"),
    ("We count the apples.\nThere are 5 apples.", "5 apples"),            # the last line, cut after its 'is'/'are'
    ("Thinking.\n(-2, 1)", "(-2, 1)"),
    ("  ", None),
])
def test_stated_answer_reads_the_final_answer_of_a_chain_of_thought(reply, answer):
    assert stated_answer(reply) == answer
