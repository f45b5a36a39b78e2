"""Held-out benchmark accuracy during training (training/heldout.py): scored through evaluate.py's own pieces
(benchmarks/harness.py) at each stage's start, every --eval_every steps and at its end, on a fixed subset,
without touching the training's random streams."""
import contextlib
import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import evaluate as ev
import train as T
from benchmarks import harness
from training import heldout

MATHVISTA = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "mathvista" / "data" / "testmini.json"


def mathvista_file(folder):
    """A small testmini.json in the official format: the shortest free-form and multiple-choice questions of the
    real file, with images made here (the real ones are not in the repository)."""
    rows = json.loads(MATHVISTA.read_text(encoding="utf-8"))
    keep = [min((pid for pid in rows if rows[pid]["question_type"] == kind), key=lambda pid: len(rows[pid]["question"]))
            for kind in ("free_form", "multi_choice")]
    (folder / "images").mkdir(parents=True)
    for pid in keep:
        Image.new("RGB", (56, 56), (40 * int(pid) % 255, 90, 160)).save(folder / rows[pid]["image"])
    (folder / "testmini.json").write_text(json.dumps({pid: rows[pid] for pid in keep}), encoding="utf-8")
    return folder / "testmini.json"


def rl_file(folder, n=4):
    """R1-VL-10K records (JSONL, one image each); the warm-up reads the same file, solutions as responses."""
    lines = []
    for i in range(n):
        Image.new("RGB", (56, 56), (60 * i, 120, 200)).save(folder / f"q{i}.png")
        lines.append(json.dumps({"id": f"q{i}", "image_path": f"q{i}.png", "problem": f"How many dots? ({i})",
                                 "solution": f"### Step 1:\ncount = {i}\n### The final answer is: {i}",
                                 "key_steps": {"Steps": [[f"count = {i}"]]}}))
    (folder / "r1vl.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "r1vl.jsonl"


FLAGS = ["--stage", "both", "--sft_steps", "2", "--sft_batch", "2", "--max_steps", "2", "--prompts_per_step", "1",
         "--grad_accum", "1", "--num_generations", "2", "--max_new_tokens", "8", "--micro_batch", "2",
         "--log_rollouts_every", "1", "--save_every", "100"]


def rows(out, stage):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["stage"] == stage]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short real-format run with a MathVista evaluation every step, and without any."""
    if not MATHVISTA.is_file():
        pytest.skip("shared/benchmarks (MathVista's testmini.json) is not beside the repository")
    folder = tmp_path_factory.mktemp("data")
    data, bench = rl_file(folder), mathvista_file(folder / "mathvista")
    out = {}
    for name, extra in (("eval", ["--eval_bench", "mathvista", "--eval_data", str(bench), "--eval_every", "1"]),
                        ("plain", [])):
        out[name] = tmp_path_factory.mktemp(name)
        T.main(["--data", str(data), "--out_dir", str(out[name]), *FLAGS, *extra])
    return out


def test_a_run_scores_the_benchmark_at_start_during_and_end_of_both_stages(runs):
    for stage in ("eval_sft", "eval"):
        held = rows(runs["eval"], stage)
        assert [r["step"] for r in held] == [0, 1, 2]
        assert all(r["bench"] == "mathvista" and r["total"] == 2 and "by_qtype" in r and r["seconds"] > 0 for r in held)
    assert (runs["eval"] / "training_curves.png").stat().st_size > 10_000


def test_the_final_summary_holds_each_stages_last_score(runs):
    from training import logs
    summary = logs.reward_summary(runs["eval"])
    assert summary["heldout_warmup"]["step"] == 2 and summary["heldout_rl"]["step"] == 2
    assert summary["accuracy_rl"] == summary["heldout_rl"]["accuracy"]
    assert "by_task" in summary["heldout_rl"]


def test_evaluating_does_not_change_the_samples_training_takes(runs):
    take = lambda out: [(r["step"], r["id"], r["completion"]) for r in map(json.loads, open(out / "rollouts.jsonl"))]
    assert take(runs["eval"]) == take(runs["plain"]) and len(take(runs["plain"])) == 4
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds", "tokens_per_s")}
    assert [drop(r) for r in rows(runs["eval"], "rl")] == [drop(r) for r in rows(runs["plain"], "rl")]


def test_the_subset_is_the_same_at_every_draw_and_leaves_the_global_stream_alone(tmp_path):
    recs = [{"id": str(i)} for i in range(50)]
    state = random.getstate()
    first = harness.subset(recs, 10, seed=0)
    assert random.getstate() == state
    assert first == harness.subset(recs, 10, seed=0) and len(first) == 10
    assert [int(r["id"]) for r in first] == sorted(int(r["id"]) for r in first)       # file order
    assert first != harness.subset(recs, 10, seed=1)
    assert harness.subset(recs, 0, seed=0) == recs and harness.subset(recs, 99, seed=0) == recs


def fake_run(bench, recs, texts, **args):
    """A one-rank run whose sampler answers each question with texts[id] (the rollout is replaced below)."""
    a = SimpleNamespace(max_new_tokens=8, max_prompt_len=1024, compile=False, eval_bench=bench, data="x", eval_n=0,
                        sft_steps=10, max_steps=10, eval_every=0, stage="rl", **args)
    return SimpleNamespace(args=a, rank=0, world=1, ddp=False, amp=contextlib.nullcontext(), sampler=None,
                           tokenizer=None, image_processor=None, eval_set=recs, device=None)


def canned(monkeypatch, texts, recs):
    def generate(model, tok, ip, images, questions, **kw):
        by_question = {harness.question(r, "toy"): r["id"] for r in recs}
        return SimpleNamespace(texts=[texts[by_question[q]] for q in questions], kept=list(range(len(questions))))
    monkeypatch.setattr(heldout.rollout, "generate", generate)


def test_toy_answers_are_judged_as_evaluate_judges_them(monkeypatch):
    """Training's toy accuracy is evaluate.py's: an answer without the final-answer header is read from the whole
    reply there (and so here), where the StepRAR reward would give it no answer at all."""
    recs = harness.load("toy", toy_n=3)
    texts = {recs[0]["id"]: f"### The final answer is: {recs[0]['answer']}", recs[1]["id"]: recs[1]["answer"],
             recs[2]["id"]: "### The final answer is: 99"}
    canned(monkeypatch, texts, recs)
    m, counts = heldout.evaluate(fake_run("toy", recs, texts), "toy", recs)
    flags, valid = ev.score("toy", recs, texts, "r1vl", Counter())
    assert m == ev.metrics("toy", recs, flags, valid) and m["correct"] == 2 and counts["no_final_answer"] == 1


@pytest.mark.parametrize("stage, step, every, run_stage, due", [
    ("sft", 0, 0, "both", False),   # the start only with --eval_every
    ("sft", 0, 5, "both", True),
    ("sft", 5, 5, "both", True),
    ("sft", 7, 5, "both", False),
    ("sft", 10, 0, "both", True),   # the end always
    ("rl", 0, 5, "both", False),    # the warm-up's end stands for it
    ("rl", 0, 5, "rl", True),
    ("rl", 10, 3, "rl", True),
])
def test_a_stage_is_scored_at_its_start_every_n_steps_and_at_its_end(stage, step, every, run_stage, due):
    run = fake_run("toy", [{"id": "1"}], {})
    run.args.eval_every, run.args.stage = every, run_stage
    assert heldout.due(run, stage, step) is due


def test_no_benchmark_no_scoring():
    run = fake_run(None, [], {})
    assert heldout.records(run.args) == [] and heldout.due(run, "rl", 10) is False


def test_a_benchmark_without_its_data_is_one_clear_error():
    with pytest.raises(ValueError, match="--eval_data"):
        heldout.records(fake_run("mathvista", [], {}, eval_data=None, eval_image_root=None, eval_limit=0,
                                 seed=0, difficulty=2).args)
