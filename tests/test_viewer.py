"""scripts/viewer.py: the page that shows why each completion got its reward, rendered by a real browser
(headless Chromium) from rollouts.jsonl rows written by training/logs.py."""
import json
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import rewards
from benchmarks import harness
from scripts import viewer
from training import logs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(not CHROMIUM, reason="needs a real browser: apt-get install -y chromium")
KEY_STEPS = {"Steps": [["3 red", "three red"], ["5 green"]]}
# Right answer, valid format, the second key step ("5 green") never stated.
RIGHT_ONE_MISSING = ("### Image Description:\nRed and green apples.\n### Rationales:\nCount, then add.\n"
                     "### Step 1:\nThere are 3 red apples.\n### Step 2:\nWith the others that makes 8.\n"
                     "### The final answer is: 8")
# Wrong answer, both key steps stated, the rationale after the steps.
WRONG_ORDER = ("### Image Description:\nApples.\n### Step 1:\n3 red and 5 green.\n### Rationales:\nAdd.\n"
               "### The final answer is: 9")


def write_run(folder):
    """A run folder: metrics.jsonl rows and the rollouts.jsonl rows logs.rollout_record writes for one group."""
    Image.new("RGB", (84, 56), (200, 40, 40)).save(folder / "apples.png")
    sample = {"id": "apples-1", "image_path": str(folder / "apples.png"), "problem": "How many apples?",
              "solution": "### The final answer is: 8", "key_steps": KEY_STEPS}
    texts = [RIGHT_ONE_MISSING, WRONG_ORDER]
    rs = [rewards.reward(t, sample) for t in texts]
    ro = SimpleNamespace(texts=texts, group=torch.tensor([0, 0]), completion_mask=torch.ones(2, 40),
                         truncated=torch.tensor([False, True]))
    batch = SimpleNamespace(rollout=ro, samples=[sample, sample], rewards=rs, advantages=torch.tensor([0.7071, -0.7071]))
    with open(folder / "rollouts.jsonl", "w") as f:
        for row in range(2):
            f.write(json.dumps(logs.rollout_record(4, batch, row)) + "\n")
    metrics = [dict(stage="sft", step=s, loss=2.0 / s) for s in (1, 2, 3)]
    metrics += [dict(stage="rl", step=s, reward=0.5 + 0.1 * s, accuracy=0.2 * s, step_rvr=0.5, kl=0.01 * s) for s in (1, 5)]
    metrics += [dict(stage="eval", step=s, bench="mathvista", headline="accuracy", accuracy=10.0 + s) for s in (0, 5)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


def test_a_rollout_row_records_image_spans_failed_rule_and_advantage(tmp_path):
    right, wrong = [json.loads(l) for l in open(write_run(tmp_path) / "rollouts.jsonl")]
    assert right["image"].endswith("apples.png") and right["gold"] == "8" and right["key_steps"] == KEY_STEPS["Steps"]
    assert right["correct"] and right["matched"] == ["3 red", None] and right["invalid"] is None
    assert RIGHT_ONE_MISSING[slice(*right["spans"][0])] == "3 red" and right["spans"][1] is None
    assert wrong["invalid"] == "wrong_order" and wrong["advantage"] == pytest.approx(-0.7071) and wrong["truncated"]


def chromium(*flags, tmp_path):
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", *flags], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@needs_chromium
def test_the_browser_shows_a_right_answer_with_one_key_step_missing(tmp_path):
    page = viewer.main([str(write_run(tmp_path))])
    chromium("--window-size=1300,900", f"--screenshot={tmp_path / 'page.png'}", page.as_uri(), tmp_path=tmp_path)
    shot = Image.open(tmp_path / "page.png")
    assert shot.size == (1300, 900) and len(shot.convert("L").getcolors(1 << 16)) > 10        # drawn, not blank
    dom = chromium("--dump-dom", page.as_uri(), tmp_path=tmp_path)
    right, wrong = dom.split('<div class="completion ')[1:3]
    assert right.startswith("right") and "hidden" not in right        # every section of it shown
    assert '<span class="verdict right">answer right</span>' in right
    assert '<mark class="k0" data-group="1">3 red</mark>' in right and "<mark" not in right.replace(
        '<mark class="k0" data-group="1">3 red</mark>', "")
    assert "key steps 1/2 (1 missing)" in right and "format valid" in right and "StepRAR 1.05" in right
    assert '<span class="verdict wrong">answer wrong</span>' in wrong and "sections out of order" in wrong
    assert "advantage -0.707" in wrong and "truncated" in wrong and wrong.count("<mark") == 2
    assert "1 prompts shown" in dom                                     # the script ran
    assert "<svg" in dom and "held-out mathvista accuracy" in dom


def test_a_predictions_page_shows_wrong_answers_first_with_extracted_and_gold(tmp_path):
    recs = harness.load("toy", toy_n=3)
    preds = [f"### The final answer is: {recs[0]['answer']}", "### The final answer is: 99", "no header at all"]
    path = tmp_path / "toy_tiny.jsonl"
    path.write_text(json.dumps({"produced_by": {"bench": "toy", "data": "toy level 2", "limit": 3, "prompt": "r1vl"}}) + "\n"
                    + "".join(json.dumps({"id": r["id"], "prediction": p}) + "\n" for r, p in zip(recs, preds)))
    page = viewer.main([str(path)]).read_text()
    order = [page.index(r["id"]) for r in recs]
    assert order[0] > max(order[1:])                                   # the right answer comes last
    assert "extracted: 99" in page and f"gold: <b>{recs[1]['answer']}</b>" in page and "1 of 3 right" in page
