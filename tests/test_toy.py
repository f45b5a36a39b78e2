"""The toy task's guarantees: determinism, disjoint splits, full reward for its own reference
paths, no answer in the question text, a difficulty knob."""
import collections
import re

import pytest

import model as M
import rewards
from qwen import tiny as qwen_tiny
from toy import task as T

LEVELS = sorted(T.LEVELS)


@pytest.fixture(scope="module")
def toy():
    """{(split, level): samples}, generated once for the whole module."""
    return {(split, d): T.dataset(split, n, seed=0, difficulty=d)
            for d in LEVELS for split, n in (("train", 1000), ("test", 500))}


def cells(img):
    """Colour name of every 28×28 cell, row by row, read from the pixels."""
    by_rgb = {rgb: name for name, rgb in T.PALETTE.items()}
    return [by_rgb[img.getpixel((c * T.CELL + 14, r * T.CELL + 14))]
            for r in range(img.height // T.CELL) for c in range(img.width // T.CELL)]


def signature(sample):
    return sample["image"].tobytes(), sample["problem"], sample["solution"], sample["answer"], sample["key_steps"]


def test_same_seed_gives_identical_samples():
    a, b = T.dataset("train", 50, seed=3), T.dataset("train", 50, seed=3)
    assert [signature(s) for s in a] == [signature(s) for s in b]
    assert [s["id"] for s in a] == [s["id"] for s in b]


def test_different_seed_gives_different_samples():
    a, b = T.dataset("train", 50, seed=3), T.dataset("train", 50, seed=4)
    assert sum(signature(x) != signature(y) for x, y in zip(a, b)) > 40


@pytest.mark.parametrize("level", LEVELS)
def test_train_and_test_share_no_problem(toy, level):
    key = lambda s: (s["image"].tobytes(), s["problem"])  # noqa: E731
    train = {key(s) for s in toy["train", level]}
    test = {key(s) for s in toy["test", level]}
    assert len(test) > 300 and not train & test


def test_splits_stay_disjoint_across_seeds_and_levels():
    """The partition is by problem, not by seed: another seed's test set is still unseen."""
    train = {(s["image"].tobytes(), s["problem"]) for d in (3, 4) for s in T.dataset("train", 300, 1, d)}
    test = {(s["image"].tobytes(), s["problem"]) for d in (3, 4) for s in T.dataset("test", 300, 2, d)}
    assert not train & test


@pytest.mark.parametrize("level", LEVELS)
def test_reference_solution_gets_full_reward(toy, level):
    for s in toy["test", level][:150]:
        assert rewards.step_rvr(s["solution"]) == 1, s["id"]
        assert rewards.step_rar(s["solution"], s["answer"], s["key_steps"]) == pytest.approx(1.1), s["id"]
        assert rewards.step_rar(s["solution"], s["solution"], s["key_steps"]) == pytest.approx(1.1), s["id"]
        assert rewards.is_correct(rewards.extract_answer(s["solution"]), s["answer"]), s["id"]


@pytest.mark.parametrize("level", LEVELS)
def test_key_steps_pass_validation(toy, level):
    for s in toy["train", level][:100]:
        assert rewards.validate_key_steps(s["key_steps"]["Steps"], where=s["id"]) == s["key_steps"]["Steps"]


def test_right_counts_with_wrong_arithmetic_earn_partial_credit(toy):
    """The design goal: a wrong answer reached through the right counts scores α·k = 0.1·2/3."""
    s = next(s for s in toy["test", 2] if s["answer"].isdigit())
    body = s["key_steps"]["Steps"][-1][0]  # the reference's last step, e.g. "3 - 1 = 2"
    wrong = str(int(s["answer"]) + 1)
    completion = (s["solution"].replace(f"\n{body}\n", f"\n{body.rsplit('= ', 1)[0]}= {wrong}\n")
                  .replace(f"is: {s['answer']}", f"is: {wrong}"))
    assert completion != s["solution"] and rewards.step_rvr(completion) == 1
    assert rewards.step_rar(completion, s["answer"], s["key_steps"]) == pytest.approx(0.1 * 2 / 3)


@pytest.mark.parametrize("level", LEVELS)
def test_each_key_step_is_credited_only_for_its_own_correct_step(toy, level):
    """Making one step's result wrong (its last number + 1) loses exactly that group: no key step
    is found in a neighbouring step or in a wrong count, so α·k measures the intermediate steps."""
    for s in toy["test", level][:60]:
        groups = s["key_steps"]["Steps"]
        for i, alts in enumerate(groups):
            wrong = re.sub(r"\d+(?!.*\d)", lambda m: str(int(m.group()) + 1), alts[0])
            completion = s["solution"].replace(f"### Step {i + 1}:\n{alts[0]}\n", f"### Step {i + 1}:\n{wrong}\n")
            _, matched = rewards.match_key_steps(completion, s["key_steps"])
            assert [m is None for m in matched] == [j == i for j in range(len(groups))], (s["id"], wrong)


@pytest.mark.parametrize("level", LEVELS)
def test_imperfect_teacher_slips_one_count_and_keeps_the_problem(toy, level):
    """teacher_noise only changes the warm-up paths: the same problems, answers and key steps; a
    slipped path is well formed, has exactly one count one lower than the truth (the rest of the
    path follows from it), and the share of slipped paths is close to the noise."""
    clean = toy["train", level][:400]
    noisy = T.dataset("train", 1000, seed=0, difficulty=level, teacher_noise=0.3)[:400]
    assert [signature(s) for s in clean] == [signature(s) for s in noisy]
    assert all(s["teacher_solution"] == s["solution"] for s in clean)
    slipped = [s for s in noisy if s["teacher_solution"] != s["solution"]]
    assert 0.2 < len(slipped) / len(noisy) <= 0.35
    counts = lambda text: dict(re.findall(r"^([a-z]+) = (\d+)$", text, re.M))  # noqa: E731
    for s in slipped:
        assert rewards.step_rvr(s["teacher_solution"]) == 1, s["id"]
        true, told = counts(s["solution"]), counts(s["teacher_solution"])
        assert true.keys() == told.keys()
        assert sorted(int(true[c]) - int(told[c]) for c in true) == [0] * (len(true) - 1) + [1], s["id"]
    wrong = sum(not rewards.is_correct(rewards.extract_answer(s["teacher_solution"]), s["answer"]) for s in slipped)
    assert wrong / len(slipped) > 0.5   # most slips change the answer ("compare" may survive one)


def test_late_teacher_counts_right_and_slips_at_the_last_operation(toy):
    """teacher_slip="late": the same problems; a slipped path keeps every step but the last, whose result (and the
    answer) is one off, so its key-step match is L/(L + 1) with a wrong answer; A/B/C questions keep the truth."""
    clean = toy["train", 4][:300]
    late = T.dataset("train", 1000, seed=0, difficulty=4, teacher_noise=1.0, teacher_slip="late")[:300]
    assert [signature(s) for s in clean] == [signature(s) for s in late]
    for s in late:
        truth, told = s["solution"].split("### Step"), s["teacher_solution"].split("### Step")
        assert truth[:-1] == told[:-1] and truth[-1] != told[-1], s["id"]
        k, _ = rewards.match_key_steps(s["teacher_solution"], s["key_steps"])
        assert k == pytest.approx(4 / 5), s["id"]
        answer = rewards.extract_answer(s["teacher_solution"])
        assert abs(int(answer) - int(s["answer"])) == 1 and rewards.step_rvr(s["teacher_solution"]) == 1, s["id"]
    letters = [s for s in T.dataset("train", 200, difficulty=2, teacher_noise=1.0, teacher_slip="late") if s["answer"] in "ABC"]
    assert letters and all(s["teacher_solution"] == s["solution"] for s in letters)
    with pytest.raises(ValueError, match="teacher_slip"):
        T.dataset(n=1, teacher_slip="early")


@pytest.mark.parametrize("noise", [-0.1, 1.5])
def test_teacher_noise_outside_0_1_is_an_error(noise):
    with pytest.raises(ValueError, match="teacher_noise"):
        T.dataset(n=1, teacher_noise=noise)


@pytest.mark.parametrize("level", LEVELS)
def test_question_text_alone_is_at_chance(toy, level):
    """Best text-only guess (per question text, its most common train answer) on test ≈ uniform
    guessing among that question's answers, far below the 100 % of a reader of the image."""
    by_text = collections.defaultdict(collections.Counter)
    for s in toy["train", level]:
        by_text[s["problem"]][s["answer"]] += 1
    test = toy["test", level]
    assert all(s["problem"] in by_text for s in test)
    acc = sum(by_text[s["problem"]].most_common(1)[0][0] == s["answer"] for s in test) / len(test)
    chance = sum(1 / len(by_text[s["problem"]]) for s in test) / len(test)
    assert abs(acc - chance) <= 0.05 and acc < 0.35, (acc, chance)


@pytest.mark.parametrize("level, size", [(1, (84, 56)), (2, (84, 56)), (3, (84, 84)), (4, (84, 84))])
def test_difficulty_sets_grid_and_number_of_steps(toy, level, size):
    """One key-step group per step, whose first alternative is the step as the reference writes it."""
    for s in toy["train", level][:200]:
        steps = re.findall(r"^### Step (\d+):\n(.*)$", s["solution"], re.M)
        assert [int(i) for i, _ in steps] == list(range(1, level + 2))
        assert [body for _, body in steps] == [alts[0] for alts in s["key_steps"]["Steps"]]
        assert s["image"].size == size


@pytest.mark.parametrize("level", LEVELS)
def test_image_is_an_rgb_grid_of_solid_cells_aligned_to_28_px(toy, level):
    for s in toy["train", level][:50]:
        img = s["image"]
        assert img.mode == "RGB" and img.width % 28 == 0 and img.height % 28 == 0
        for r in range(img.height // 28):
            for c in range(img.width // 28):
                assert len(img.crop((c * 28, r * 28, c * 28 + 28, r * 28 + 28)).getcolors()) == 1


@pytest.mark.parametrize("level", LEVELS)
def test_description_and_counts_agree_with_the_pixels(toy, level):
    for s in toy["test", level][:100]:
        grid = cells(s["image"])
        rows = re.findall(r"Row \d+: ([a-z, ]+)\.", s["solution"])
        assert [c for row in rows for c in row.split(", ")] == grid
        for colour, n in re.findall(r"^### Step \d+:\n([a-z]+) = (\d+)$", s["solution"], re.M):
            assert grid.count(colour) == int(n), s["id"]


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"difficulty": 0}, {"difficulty": 5}])
def test_unknown_split_or_difficulty_raises(kwargs):
    with pytest.raises(ValueError):
        T.dataset(n=1, **kwargs)


def test_tiny_tokenizer_has_phrase_tokens_and_round_trips(tiny):
    tok = tiny[1]
    s = T.dataset("train", n=1)[0]
    for phrase in qwen_tiny.PHRASES:                             # the fixed text is one token each
        assert len(tok(phrase, add_special_tokens=False)["input_ids"]) == 1
    near = "### Image Descriptions:\n### Step 12: ### The final answer is 7"   # near-misses fall back to BPE
    for text in (M.prompt_text(tok, s["problem"]), s["solution"], near):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # rollouts decode with special tokens dropped: phrase tokens are not special, so they stay
    assert tok.decode(tok(s["solution"])["input_ids"], skip_special_tokens=True) == s["solution"]
    # about half the length a word-level tokenizer gives (prompt ≈ 100 → ≈ 30, response ≈ 90 → ≈ 60)
    assert len(tok(M.prompt_text(tok, s["problem"]), add_special_tokens=False)["input_ids"]) < 40
    assert len(tok(s["solution"], add_special_tokens=False)["input_ids"]) < 70
