"""evaluate.py / benchmarks.py / scorers.py / latex_value.py as a specification: published aggregates recomputed from the
published model outputs in shared/benchmarks, loaders on files built in every format, the rule
scorers, and the command line in score-only and generation mode."""
import base64
import csv
import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import catalog as bm
import evaluate as ev
from benchmarks import scorers as sc
from benchmarks.latex_value import latex_value

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/benchmarks is not beside the repository")


def score_all(bench, recs, preds, prompt="plain"):
    flags, _ = ev.score(bench, recs, preds, prompt, Counter())
    return ev.metrics(bench, recs, flags)


def png(color=(255, 0, 0), size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def b64(*args):
    return base64.b64encode(png(*args)).decode()


def write_tsv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- published aggregates

MATHV_RUNS = ["Random-Chance", "closed-source/Gemini/Gemini-Pro-CoT", "closed-source/Qwen/Qwen-VL-Max",
              "open-source/LLavA/LLaVA-v1.5-7B"]


@pytest.fixture(scope="module")
def mathvision_test():
    return bm.load("mathvision", SHARED / "mathvision/data/test.jsonl")


@needs_shared
@pytest.mark.parametrize("run", MATHV_RUNS)
def test_mathvision_rule_scorer_reproduces_official_results(run, mathvision_test):
    """Re-extracting every raw response gives the official `_result.json` exactly: -all, levels, subjects."""
    out = {json.loads(l)["id"]: json.loads(l)["response"] for l in open(SHARED / f"mathvision/outputs/{run}.jsonl")}
    m = score_all("mathvision", mathvision_test, out)
    official = json.loads((SHARED / f"mathvision/outputs/{run}_result.json").read_text())
    fmt = lambda g: f"{g['correct']}/{g['total']}={round(100 * g['correct'] / g['total'], 2)}%"
    levels = {k: v for k, v in official.items() if k.startswith("-level") and "_" not in k}
    subjects = {k: v for k, v in official.items() if not k.startswith("-") and "_level" not in k}
    assert fmt(m) == official["-all"]
    assert {f"-level{k}": fmt(g) for k, g in m["by_level"].items()} == levels
    assert {k: fmt(g) for k, g in m["by_subject"].items()} == subjects


MATHVISTA_RUNS = {"bard/output_bard.json": (34.8, 33.7), "idefics/output_idefics_9b_instruct.json": (19.8, 20.9),
                  "llava/output_llava_llama_2_13b.json": (26.1, 24.0)}


@pytest.fixture(scope="module")
def mathvista_mini():
    return bm.load("mathvista", SHARED / "mathvista/data/testmini.json")


@needs_shared
@pytest.mark.parametrize("run", MATHVISTA_RUNS)
def test_mathvista_official_extractions_reproduce_scores_files(run, mathvista_mini):
    """The official normalisation applied to the stored GPT-4 `extraction` gives scores_*.json exactly."""
    out = json.loads((SHARED / "mathvista/results" / run).read_text())
    flags = [sc.score_mathvista(r, out[r["id"]]["extraction"], extracted=True) for r in mathvista_mini]
    m = ev.metrics("mathvista", mathvista_mini, flags)
    official = json.loads((SHARED / "mathvista/results" / run.replace("output_", "scores_")).read_text())
    assert (m["accuracy"], m["correct"]) == (float(official["average"]["accuracy"]), official["average"]["correct"])
    for qtype, g in official["question_type"].items():
        assert (m["by_qtype"][qtype]["correct"], m["by_qtype"][qtype]["total"]) == (g["correct"], g["total"])


@needs_shared
@pytest.mark.parametrize("run", MATHVISTA_RUNS)
def test_mathvista_rule_extraction_within_3_points_of_gpt4(run, mathvista_mini):
    """Measured gap of our regex extraction vs the official GPT-4 extraction on the raw `response`:
    Bard 34.8 -> 33.7, IDEFICS-9B 19.8 -> 20.9, LLaVA-LLaMA2-13B 26.1 -> 24.0 (largest: 2.1 points)."""
    out = json.loads((SHARED / "mathvista/results" / run).read_text())
    m = score_all("mathvista", mathvista_mini, {pid: r["response"] for pid, r in out.items()})
    official, ours = MATHVISTA_RUNS[run]
    assert m["accuracy"] == ours
    assert abs(m["accuracy"] - official) <= 3.0


@needs_shared
@pytest.mark.parametrize("run", MATHVISTA_RUNS)
def test_mathvista_cli_extracted_reproduces_official_scores(run, tmp_path, capsys):
    """--extracted scores GPT-4's `extraction` field as calculate_score.py: the scores file's accuracy exactly."""
    out = json.loads((SHARED / "mathvista/results" / run).read_text())
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": pid, "prediction": r["extraction"]} for pid, r in out.items()])
    ev.main(["--bench", "mathvista", "--data", str(SHARED / "mathvista/data/testmini.json"),
             "--predictions", str(preds), "--extracted"])
    official = json.loads((SHARED / "mathvista/results" / run.replace("output_", "scores_")).read_text())["average"]
    m = last_json_line(capsys)["metrics"]
    assert (m["accuracy"], m["correct"]) == (float(official["accuracy"]), official["correct"])


@needs_shared
def test_mme_lavin_totals_from_score_only_cli(tmp_path, capsys):
    """LaVIN's bundled predictions give Perception 963.61 and Cognition 249.64, the README's figures."""
    preds = [{"id": f"{f.stem}/{i}", "prediction": line.rstrip("\n").split("\t")[3]}
             for f in sorted((SHARED / "mme/eval_tool/LaVIN").glob("*.txt"))
             for i, line in enumerate(open(f, encoding="utf-8"), 1)]
    out = tmp_path / "lavin.jsonl"
    ev.main(["--bench", "mme", "--data", str(SHARED / "mme/eval_tool/Your_Results"), "--prompt", "plain",
             "--predictions", str(write_jsonl(tmp_path / "p.jsonl", preds)), "--out", str(out)])
    summary = last_json_line(capsys)
    m = summary["metrics"]
    assert (m["perception"], m["cognition"]) == (963.61, 249.64)
    assert summary["headline"] == {"perception_plus_cognition": 1213.25}
    assert (m["subtasks"]["count"]["score"], m["subtasks"]["OCR"]["score"]) == (88.33, 107.5)
    assert summary["records"] == 2374 and summary["counts"] == {}
    assert json.loads((tmp_path / "lavin.summary.json").read_text()) == summary


DYNAMATH = {"GPT4o": (63.33, 34.73), "claude3.5": (64.83, 35.73), "Gemini1.5-Pro": (60.40, 27.15),
            "Qwen2-72B": (55.11, 28.54), "InternVL2-76B": (53.61, 24.55), "InternVL2-40B": (41.86, 14.17),
            "InternVL2-26b": (41.02, 14.37), "InternVL2-8b": (39.34, 10.38), "llama-3.2-90B": (44.29, 12.97),
            "llava1.6-34B": (27.19, 5.99), "llava1.6-vicuna-13B": (19.64, 2.79), "deepseek7B": (21.62, 4.19),
            "llava1.5-7B": (16.39, 1.80)}


@needs_shared
@pytest.mark.parametrize("name", DYNAMATH)
def test_dynamath_average_and_worst_case_from_result_csv(name):
    """Each CSV's correct/fail cells give the README's average-case and worst-case figures."""
    rows = [r for r in csv.reader(open(SHARED / f"dynamath/samples and result/{name}-result.csv", encoding="utf-8"))
            if r and r[0].startswith("Q") and r[0][1:].isdigit()]
    recs = [{"qid": r[0], "subject": r[12], "level": r[13]} for r in rows for _ in range(10)]
    m = ev.metrics("dynamath", recs, [cell == "correct" for r in rows for cell in r[1:11]])
    assert len(rows) == 501 and (m["average_case"], m["worst_case"]) == DYNAMATH[name]


def hb(cat, sub, s, fig, q):
    return {"category": cat, "subcategory": sub, "set": s, "figure": fig, "qnum": q}


def test_hallusionbench_metrics_on_a_hand_built_case():
    """VD set 0: figure 0 (q0 ✓, q1 ✓), figure 1 (q0 ✓, q1 ✗); VS set 1: q0 without chart ✗, with chart ✓.
    aAcc 4/6. fAcc: VD fig 0 ✓, VD fig 1 ✗, VS fig 1 ✓ (VS figure 0 is no figure) = 2/3.
    qAcc: VD q0 ✓, VD q1 ✗, VS q0 ✗ = 1/3. Headline: their mean."""
    recs = [hb("VD", "ocr", "0", "0", "0"), hb("VD", "ocr", "0", "0", "1"), hb("VD", "ocr", "0", "1", "0"),
            hb("VD", "ocr", "0", "1", "1"), hb("VS", "chart", "1", "0", "0"), hb("VS", "chart", "1", "1", "0")]
    m = ev.metrics("hallusionbench", recs, [True, True, True, False, False, True])
    assert m == {"aAcc": 66.67, "fAcc": 66.67, "qAcc": 33.33, "mean_aAcc_fAcc_qAcc": 55.56}


@needs_shared
def test_hallusionbench_sample_predictions_scored_against_the_dataset():
    """The 254 sample predictions carry no labels: join them to HallusionBench.json by their keys.
    No official figure exists for this file (upstream grades it with GPT-4); these are our values."""
    key = lambda r: tuple(r[k] for k in ("category", "subcategory", "set_id", "figure_id", "question_id"))
    gt = {key(r): r["gt_answer"] for r in json.loads((SHARED / "hallusionbench/HallusionBench.json").read_text())}
    sample = json.loads((SHARED / "hallusionbench/HallusionBench_result_sample.json").read_text())
    recs = [dict(hb(*key(r)), answer="yes" if gt[key(r)] == "1" else "no") for r in sample]
    flags = [sc.score_hallusionbench(rec, r["model_prediction"]) for rec, r in zip(recs, sample)]
    m = ev.metrics("hallusionbench", recs, flags)
    assert len(recs) == 254 and m["aAcc"] == bm.pct(sum(flags), 254)
    assert m["mean_aAcc_fAcc_qAcc"] == round((m["aAcc"] + m["fAcc"] + m["qAcc"]) / 3, 2)
    assert m == {"aAcc": 51.57, "fAcc": 20.29, "qAcc": 19.66, "mean_aAcc_fAcc_qAcc": 30.51}
    assert sum(sc.yes_no(r["model_prediction"]) is None for r in sample) == 49   # neither yes nor no: wrong


# ----------------------------------------------------------------------------- loaders

def mcq_row(index, image, answer="A", **options):
    return dict(index=index, image=image, question=f"Q{index}?", **options, answer=answer, category="c",
                **{"l2-category": "x"})


def test_tsv_loader_decodes_base64_index_references_and_image_lists(tmp_path):
    a, b = b64((255, 0, 0), (8, 6)), b64((0, 0, 255), (5, 9))
    rows = [mcq_row(10, a, A="red", B="blue", C="", D=""), mcq_row(11, "10", A="1", B="2", C="", D=""),
            mcq_row(12, str([a, b]), A="1", B="2", C="", D=""),          # a list of images
            mcq_row(13, "99", A="1", B="2", C="", D=""),                # a reference to no row
            mcq_row(14, "x" * 80, A="1", B="2", C="", D="")]            # not base64
    recs = bm.load("mmstar", write_tsv(tmp_path / "MMStar.tsv", rows))
    assert [r["id"] for r in recs] == ["10", "11", "12", "13", "14"] and recs[0]["options"] == ["red", "blue"]
    assert ev.open_image(recs[1]["images"]).size == (8, 6)
    assert ev.open_image(recs[2]["images"]).size == (13, 9)             # pasted side by side
    for bad in recs[3:]:
        with pytest.raises(ValueError):
            ev.open_image(bad["images"])
    assert bm.question_text(recs[0], "plain") == (
        "Question: Q10?\nOptions:\nA. red\nB. blue\nPlease select the correct answer from the options above.")
    assert bm.question_text(recs[0], "r1vl") == (
        "Q10?\nChoices:\nA: red\nB: blue\nPlease select the correct answer from the choices above.")


def test_parquet_loader_reads_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    common = dict(precision=None, question="x?", image="images/x.jpg", decoded_image={"bytes": png(), "path": "x.jpg"})
    rows = [dict(common, pid="7", query="Hint: integer.\nQuestion: How many?", choices=None, answer="3",
                 question_type="free_form", answer_type="integer", metadata={"task": "VQA"}),
            dict(common, pid="8", query="Q8", choices=["1.5", "2.5"], answer="2.5", question_type="multi_choice",
                 answer_type="text", metadata={"task": "FQA"})]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "testmini-00000.parquet")
    recs = bm.load("mathvista", tmp_path)
    assert [r["id"] for r in recs] == ["7", "8"] and recs[0]["question"].startswith("Hint")
    assert ev.open_image(recs[0]["images"]).size == (8, 6)
    assert sc.score_mathvista(recs[0], "There are 3.") and sc.score_mathvista(recs[1], "The answer is (B).")


@needs_shared
def test_official_jsonl_loader_finds_the_real_mathvision_images(tmp_path):
    mini = [json.loads(l) for l in open(SHARED / "mathvision/data/testmini.jsonl")]
    rows = [r for r in mini if r["id"] in ("4", "6")] + [dict(mini[0], id="99999", image="images/99999.jpg")]
    recs = bm.load("mathvision", write_jsonl(tmp_path / "test.jsonl", rows), image_root=SHARED / "mathvision")
    assert ev.open_image(recs[0]["images"]).size == Image.open(SHARED / "mathvision/images/4.jpg").size
    assert "<image1>" not in recs[1]["question"] and recs[1]["options"] == list("ABCDE")
    with pytest.raises(ValueError, match="99999.jpg not found"):
        ev.open_image(recs[2]["images"])


def test_official_json_loaders_and_their_ids(tmp_path):
    (tmp_path / "test/png").mkdir(parents=True)
    (tmp_path / "test/png/a.png").write_bytes(png())
    for name, label in (("human", "14"), ("augmented", "0.57")):
        rows = [{"imgname": "a.png", "query": "?", "label": label}]
        (tmp_path / f"test/test_{name}.json").write_text(json.dumps(rows))
    chart = bm.load("chartqa", tmp_path)
    assert [(r["id"], r["split"]) for r in chart] == [("test_augmented/0", "augmented"), ("test_human/0", "human")]
    assert ev.open_image(chart[0]["images"]).size == (8, 6)
    for n in (1, 2):
        (tmp_path / f"dm/trial{n}").mkdir(parents=True)
        row = dict(question="q", answer="2.0", image="image/image5.png", answer_type="float", subject="s", level="l")
        (tmp_path / f"dm/trial{n}/dataset.json").write_text(json.dumps({"5": row}))
    assert [r["id"] for r in bm.load("dynamath", tmp_path / "dm")] == ["5/1", "5/2"]
    hb_rows = [dict(category="VS", subcategory="chart", visual_input=v, set_id="0", figure_id=f, question_id="0",
                    question="Is it?", gt_answer=g, filename=fn)
               for v, f, g, fn in [("0", "0", "1", None), ("1", "1", "0", "./VS/chart/0_1.png")]]
    (tmp_path / "hb").mkdir()
    (tmp_path / "hb/HallusionBench.json").write_text(json.dumps(hb_rows))
    recs = bm.load("hallusionbench", tmp_path / "hb")
    assert [(r["id"], r["answer"]) for r in recs] == [("VS/chart/0/1/0", "no")]   # the text-only question is left out


def test_hallusionbench_tsv_keys_come_from_the_vlmevalkit_index(tmp_path):
    rows = [dict(index=f"VS_chart_1_3_{fig}_0", image=img, question="Is it 5?", answer=ans, category="VS",
                 **{"l2-category": "VS_chart"}) for fig, img, ans in [(1, b64(), "Yes"), (2, "VS_chart_1_3_1_0", "No")]]
    recs = bm.load("hallusionbench", write_tsv(tmp_path / "HallusionBench.tsv", rows))
    assert [(r["subcategory"], r["set"], r["figure"], r["qnum"], r["answer"]) for r in recs] == [
        ("chart", "3", "1", "0", "yes"), ("chart", "3", "2", "0", "no")]
    assert ev.open_image(recs[1]["images"]).size == (8, 6)
    assert bm.question_text(recs[0], "plain") == "Is it 5? Please answer yes or no."
    assert bm.question_text(recs[0], "r1vl") == "Is it 5?\nChoices:\nA: Yes\nB: No"


@needs_shared
def test_mme_official_lists_give_file_line_ids_and_image_pairs():
    recs = bm.load("mme", SHARED / "mme/eval_tool/Your_Results")
    assert len(recs) == 2374 and recs[0]["id"] == "OCR/1" and recs[0]["pair"] == recs[1]["pair"]
    assert Counter(r["category"] for r in recs)["celebrity"] == 340


def test_missing_data_and_unknown_bench_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        ev.main(["--bench", "mme", "--data", str(tmp_path / "nope"), "--predictions", "x.jsonl"])
    with pytest.raises(SystemExit):
        ev.main(["--bench", "mmbench", "--data", str(tmp_path), "--predictions", "x.jsonl"])


# ----------------------------------------------------------------------------- rules

@pytest.mark.parametrize("pred, target, ok", [("14", "14", True), ("14.6", "14", True), ("14.8", "14", False),
                                              ("57%", "0.57", True), ("0", "0", True), ("Yes.", "Yes", False),
                                              ("inspired", "Inspired", True)])
def test_chartqa_relaxed_accuracy(pred, target, ok):
    assert sc.relaxed_correct(pred, target) is ok


@pytest.mark.parametrize("text, label", [("yes", "yes"), ("No", "no"), ("Yes, there is.", "yes"), (" no.", "no"),
                                         ("There is a train.", "other"), ("nothing", "no")])
def test_mme_official_prefix_rule(text, label):
    assert sc.mme_label(text) == label


@pytest.mark.parametrize("answer, gold, ok", [("Yes, it is.", "yes", True), ("No", "no", True), ("A", "yes", True),
                                              ("yes and no", "yes", False), ("B: No", "no", True),
                                              ("(A) Yes", "no", False)])
def test_hallusionbench_yes_no_and_r1vl_choices(answer, gold, ok):
    assert sc.score_hallusionbench({"answer": gold}, answer) is ok


@pytest.mark.parametrize("text, letter", [("B", "B"), ("(C) cat", "C"), ("D: 8", "D"), ("The answer is A.", "A"),
                                          ("I pick option b", None), ("cat", "C"), ("none", None)])
def test_option_letter(text, letter):
    assert sc.option_letter(text, "ABCD", ["dog", "bird", "cat", "cow"]) == letter


@pytest.mark.parametrize("atype, gold, answer, ok", [
    ("float", "2.0944", "2.094", True), ("float", "2.0944", "2.09", False), ("float", "6.2832", "2π", True),
    ("float", "5.75", '{"solution": "mean", "short answer": "5.75"}', True),
    ("float", "5.75", "The mean is 5.750", True), ("multiple choice", "B", "B", True),
    ("multiple choice", "B", "(B) 4", True), ("multiple choice", "B", "A", False), ("text", "red", "red circle", True)])
def test_dynamath_official_rules(atype, gold, answer, ok):
    assert sc.score_dynamath({"answer": gold, "atype": atype}, answer) is ok


def vista(qtype="free_form", atype="integer", precision=None, choices=None, answer="5"):
    return dict(qtype=qtype, atype=atype, precision=precision, choices=choices, answer=answer)


@pytest.mark.parametrize("rec, answer, ok", [
    (vista(atype="float", precision=1, answer="1.2"), "d = 1.23 m", True),
    (vista(atype="float", precision=2, answer="1.23"), "1.2", False),
    (vista(), "The answer is 5.", True), (vista(), "**5** apples", True),
    (vista(atype="list", answer="[2014, 2016]"), "It is [2014, 2016].", True),
    (vista("multi_choice", "text", choices=["97", "102"], answer="102"), "(B)", True),
    (vista("multi_choice", "text", choices=["97", "102"], answer="102"), "so 103", True)])
def test_mathvista_extraction_and_official_normalisation(rec, answer, ok):
    assert sc.score_mathvista(rec, answer) is ok


@pytest.mark.parametrize("pred, gold, ok", [("8", "8.0", True), ("\\frac{1}{2}", "0.5", True),
                                            ("(1,2)", "(1.0,2)", True), ("120", "$120^{\\circ}$", False),
                                            ("e", "E", True), ("", "1", False), ("x0", "0", False),
                                            ("x 0", "0", False), ("e", "2.72", False), ("pi", "3.14", False),
                                            ("\\boxed{3}", "3", False), ("3}", "3", True), ("5. the answer", "5", True),
                                            ("12\\frac{1}{2}", "6", True)])
def test_mathvision_official_equality(pred, gold, ok):
    assert sc.mathvision_equal(pred, gold) is ok


@pytest.mark.parametrize("text, value", [
    ("3}", 3), ("3. the answer", 3), ("-2.b", -2), ("625 \\rightarrow 626 \\uparrow 627", 625), ("1 triangle", 1),
    ("3)", 3), ("\\boxed{3}", None), ("3 \\boxed{2}", None), ("x0", None), ("x 0", None), ("5cm", None),
    ("e", None), ("pi", None), ("\\pi", 3.14), ("e^{2}", 7.39), ("e^{1}", None), ("12\\frac{1}{2}", 6.0),
    ("111 111 111", 1367631), ("$20\\%$", 0.2), ("5%", None), ("120^\\circ", None), ("\\frac{1}{16}\"", None),
    ("105{,}000", None), ("[400,500]", 400500), ("3, 4", None), ("(1,2)", None), ("3 < 4", 1), ("3 = 3", None),
    ("\\csc 30", None), ("\\ln 2", None), ("\\log_2 8", 3.0), ("2\\sqrt{2}", 2.83), ("\\sqrt2", None),
    ("2^10", 1024), ("24!^{2}", 620448401733239439360000), ("\\text{5}", None), ("$6.$", 6), ("8.0", 8)])
def test_latex_value_reads_numbers_as_the_official_latex2sympy_pipeline(text, value):
    """The well-formed prefix counts; an unknown character next to it, a free letter or \\boxed gives no value."""
    assert latex_value(text) == value


@pytest.mark.parametrize("text, choices, extraction", [
    ("The correct option letter is B.", ["1", "2"], "B"), ('So the answer is "A".', ["1", "2"], "A"),
    ("答案是B", ["1", "2"], "B"), ("选项 A 正确", ["1", "2"], "A"), ("The correct option letter is F.", ["1", "2"], "F"),
    ('The answer is "two".', ["1", "2"], "two"), ("yes, it is.", ["Yes", "No"], "Yes"), ("NO. It is not", ["Yes", "No"], "No"),
    ("It depends", ["Yes", "No"], "It depends")])
def test_mathvista_extracts_stated_letters_and_yes_no_openings(text, choices, extraction):
    assert sc.mathvista_extract(text, vista("multi_choice", "text", choices=choices, answer=choices[0])) == extraction


def test_mathvista_out_of_range_letter_goes_to_the_most_similar_choice():
    rec = vista("multi_choice", "text", choices=["E", "2"], answer="E")
    assert sc.score_mathvista(rec, "The correct option letter is F.") is True     # "F" is nearest to "E"


@pytest.mark.parametrize("gold, answer, ok", [("B", "B", True), ("B", "B: 3 cm", True), ("B", "(C)", False),
                                              ("14", "14 cm", True), ("\\frac{1}{2}", "0.5", True),
                                              ("14", "13", False)])
def test_mathverse_letters_and_free_form_equivalence(gold, answer, ok):
    pytest.importorskip("rewards")
    qtype = "multi-choice" if gold.isalpha() else "free-form"
    assert sc.score_mathverse({"answer": gold, "qtype": qtype}, answer) is ok


# ----------------------------------------------------------------------------- command line

@needs_shared
def test_score_only_counts_unknown_missing_malformed_and_empty_predictions(tmp_path, capsys):
    lines = [json.dumps({"id": "OCR/1", "prediction": "Yes"}), json.dumps({"id": "OCR/2", "prediction": ""}),
             json.dumps({"id": "nope/1", "prediction": "Yes"}), "{not json"]
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ev.main(["--bench", "mme", "--data", str(SHARED / "mme/eval_tool/Your_Results"), "--predictions", str(p),
             "--limit", "60"])
    s = last_json_line(capsys)
    assert s["records"] == 60 and s["counts"] == {"empty_predictions": 1, "malformed_prediction_lines": 1,
                                                   "missing_predictions": 58, "unknown_prediction_ids": 1,
                                                   "no_final_answer": 1}   # r1vl prompt, a bare "Yes": still read
    assert s["metrics"]["subtasks"]["OCR"]["acc"] == 2.5


def test_toy_reference_solutions_score_full_accuracy_and_format_validity(tmp_path, capsys):
    """The toy's reference paths are R1-VL-formatted and right: accuracy and format validity 1 (fractions,
    as train.py reports them);
    a bare answer without the sections is still right but not valid."""
    samples = ev.toy.dataset(split="test", n=6, seed=0)
    preds = [{"id": s["id"], "prediction": s["solution"] if i < 5 else s["answer"]} for i, s in enumerate(samples)]
    ev.main(["--bench", "toy", "--limit", "6", "--predictions", str(write_jsonl(tmp_path / "p.jsonl", preds))])
    s = last_json_line(capsys)
    assert (s["metrics"]["accuracy"], s["metrics"]["format_valid"], s["unit"]) == (1.0, 0.8333, "fraction")


def test_generation_appends_predictions_and_resumes(tmp_path, capsys):
    """--model tiny on a TSV with one undecodable image: 2 answers written, 1 counted; a re-run generates nothing."""
    pytest.importorskip("rollout")
    rows = [mcq_row(0, b64(), A="x", B="y"), mcq_row(1, "0", A="x", B="y"), mcq_row(2, "!" * 100, A="x", B="y")]
    argv = ["--bench", "mmstar", "--data", str(write_tsv(tmp_path / "m.tsv", rows)), "--model", "tiny",
            "--max_new_tokens", "4", "--batch_size", "2", "--out", str(tmp_path / "out.jsonl")]
    first = ev.main(argv)
    assert first["counts"]["bad_images"] == 1 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    second = ev.main(argv)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3     # the produced_by header + 2
    assert second["metrics"]["total"] == 3 and second["counts"]["bad_images"] == 1
    assert last_json_line(capsys) == second


# ----------------------------------------------------------------------------- what produced the predictions

def tiny_mmstar(tmp_path):
    rows = [mcq_row(i, b64(), A="x", B="y") for i in range(3)]
    return ["--bench", "mmstar", "--data", str(write_tsv(tmp_path / "m.tsv", rows)), "--max_new_tokens", "4",
            "--batch_size", "2"]


def test_resuming_with_other_settings_is_refused_in_one_line(tmp_path):
    base = tiny_mmstar(tmp_path) + ["--model", "tiny", "--out", str(tmp_path / "o.jsonl"), "--limit", "1"]
    ev.main(base)
    for change in (["--prompt", "plain"], ["--max_new_tokens", "5"]):
        with pytest.raises(SystemExit, match="other settings.*--overwrite"):
            ev.main(base + change)
    assert ev.main(base + ["--prompt", "plain", "--overwrite"])["prompt"] == "plain"


def test_default_out_names_differ_for_two_models_both_called_final(tmp_path):
    names = set()
    for run in ("sft-2b", "r1vl-2b"):
        (tmp_path / run / "final").mkdir(parents=True)
        (tmp_path / run / "final/config.json").write_text(json.dumps({"run": run}))
        names.add(ev.default_out(ev.parse_args(["--bench", "toy", "--model", str(tmp_path / run / "final")])))
    assert len(names) == 2 and all(n.name.startswith("toy_final_") for n in names)


def test_weights_fingerprint_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 100)
    before = ev.weights_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"b" * 100)
    assert ev.weights_fingerprint(str(tmp_path)) != before


def test_a_line_cut_short_does_not_swallow_the_next_prediction(tmp_path):
    out = tmp_path / "o.jsonl"
    argv = tiny_mmstar(tmp_path) + ["--model", "tiny", "--out", str(out)]
    ev.main(argv + ["--limit", "1"])
    out.write_text(out.read_text() + '{"id": "1", "predic')                  # killed mid-write
    s = ev.main(argv)
    preds, _ = ev.read_predictions(out, Counter())
    assert set(preds) == {"0", "1", "2"} and s["counts"]["malformed_prediction_lines"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--bench", "toy", "--model", "out/nope/final"], "no such directory"),
    (["--bench", "toy", "--model", "./nope"], "no such directory"),
    (["--bench", "mme", "--predictions", "p.jsonl"], "does not exist"),
    (["--bench", "mme", "--model", "tiny"], "--data is required"),
    (["--bench", "mme", "--model", "tiny", "--data", "nope.tsv"], "does not exist"),
    (["--bench", "toy", "--model", "tiny", "--extracted"], "use it with --predictions"),
    pytest.param(["--bench", "toy", "--model", "tiny", "--compile"], "needs a CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA graphs are available"))])
def test_bad_input_exits_with_one_line_before_any_model_loads(argv, message, monkeypatch):
    monkeypatch.setattr(ev.model, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=message):
        ev.main(argv)


def test_model_folder_without_config_and_data_in_a_wrong_format_exit_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setattr(ev.model, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="no config.json"):
        ev.main(["--bench", "toy", "--model", str(tmp_path)])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SystemExit, match="unknown data format"):
        ev.main(["--bench", "mmstar", "--model", "tiny", "--data", str(tmp_path / "data.csv")])
    (tmp_path / "bad.tsv").write_text("x\ty\n1\t2\n")
    with pytest.raises(SystemExit, match="not a mmstar record"):
        ev.main(["--bench", "mmstar", "--model", "tiny", "--data", str(tmp_path / "bad.tsv")])


def test_help_shows_every_flag_with_a_default_and_a_line_of_help(capsys):
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    entries = {e.split()[0]: " ".join(e.split()[1:]) for e in re.split(r"\n  (?=-)", capsys.readouterr().out)[1:]}
    flags = ("--data", "--image_root", "--prompt", "--out", "--overwrite", "--limit", "--max_new_tokens",
             "--batch_size", "--min_pixels", "--max_pixels", "--max_prompt_len", "--device", "--dtype", "--extracted")
    for flag in flags:
        assert "default" in entries[flag] and len(entries[flag]) > 20, flag


def test_toy_generates_with_the_training_length_and_other_benches_with_the_papers():
    assert ev.parse_args(["--bench", "toy", "--model", "tiny"]).max_new_tokens == ev.TOY_MAX_NEW_TOKENS == 160
    assert ev.parse_args(["--bench", "mme", "--model", "tiny"]).max_new_tokens == 2048


# ----------------------------------------------------------------------------- refusals: the wrong file is never scored
SHARED_FILES = {"mathvision": "mathvision/data/test.jsonl", "mathvista": "mathvista/data/testmini.json",
                "hallusionbench": "hallusionbench/HallusionBench.json", "dynamath": "dynamath/dataset/dataset.json",
                "mme": "mme/eval_tool/Your_Results"}


@needs_shared
@pytest.mark.parametrize("own", SHARED_FILES)
def test_a_benchmark_file_loads_as_no_other_benchmark(own):
    for bench in set(bm.BENCHES) - {own}:
        with pytest.raises((ValueError, FileNotFoundError), match=f"not a {bench} record|no {bench} data") as err:
            bm.load(bench, SHARED / SHARED_FILES[own])
        assert "\n" not in str(err.value)


def refused(argv, capsys=None):
    with pytest.raises(SystemExit) as err:
        ev.main(argv)
    line = str(err.value) if err.value.code not in (0, 2) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in line
    return line


def mathv_predictions(tmp_path, header=None):
    rows = [json.loads(l) for l in open(SHARED / "mathvision/outputs/Random-Chance.jsonl")]
    return write_jsonl(tmp_path / "p.jsonl", ([{"produced_by": header}] if header else [])
                       + [{"id": r["id"], "prediction": r["response"]} for r in rows])


@needs_shared
def test_predictions_of_another_benchmark_are_refused_by_their_header(tmp_path):
    preds = mathv_predictions(tmp_path, {"bench": "mathvision", "data": str(SHARED / SHARED_FILES["mathvision"])})
    line = refused(["--bench", "mathvista", "--data", str(SHARED / SHARED_FILES["mathvista"]), "--predictions", str(preds)])
    assert "made for --bench mathvision" in line


@needs_shared
def test_predictions_made_on_another_data_file_are_refused_by_their_header(tmp_path):
    preds = mathv_predictions(tmp_path, {"bench": "mathvision", "data": str(SHARED / SHARED_FILES["mathvision"])})
    line = refused(["--bench", "mathvision", "--data", str(SHARED / "mathvision/data/testmini.jsonl"),
                    "--predictions", str(preds)])
    assert "test.jsonl" in line and "pass that file" in line


@needs_shared
def test_predictions_whose_ids_are_mostly_not_the_datas_are_refused(tmp_path):
    """No header: MATH-V's 3,040 ids against MathVista's 1,000 pids, a third known, are under the 50 % needed."""
    line = refused(["--bench", "mathvista", "--data", str(SHARED / SHARED_FILES["mathvista"]),
                    "--predictions", str(mathv_predictions(tmp_path))])
    assert "1000 of its 3040 ids" in line and "another benchmark or split" in line


def test_predictions_with_no_known_id_are_refused(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "nope", "prediction": "8"}])
    assert "0 of its 1 ids" in refused(["--bench", "toy", "--predictions", str(preds)])


@pytest.mark.parametrize("flags, message", [(["--limit", "0"], "--limit must be at least 1"),
                                            (["--limit", "-5"], "--limit must be at least 1"),
                                            (["--batch_size", "0"], "--batch_size must be at least 1"),
                                            (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
                                            (["--min_pixels", "900", "--max_pixels", "800"], "is above --max_pixels"),
                                            (["--data", "x.tsv"], "drop --data"),
                                            (["--overwrite"], "nothing is generated")])
def test_evaluate_refuses_ranges_and_contradictions_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as err:
        ev.parse_args(["--bench", "toy", "--predictions", "p.jsonl", *flags])
    assert err.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_file_with_nothing_to_score_is_an_error_that_says_why(tmp_path):
    rows = [{"sample_index": str(i), "problem_version": "Text Only", "question": "q", "answer": "1", "image": ""}
            for i in range(3)]
    (tmp_path / "testmini.json").write_text(json.dumps(rows))
    line = refused(["--bench", "mathverse", "--data", str(tmp_path / "testmini.json"), "--predictions",
                    str(write_jsonl(tmp_path / "p.jsonl", [{"id": "0", "prediction": "1"}]))])
    assert "no mathverse record to score" in line and "text-only" in line


def test_a_model_that_cannot_be_loaded_stops_with_one_line(tmp_path, monkeypatch):
    def unreachable(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")
    monkeypatch.setattr(ev.model, "load", unreachable)
    line = refused(["--bench", "toy", "--model", "Org/model", "--limit", "1", "--out", str(tmp_path / "p.jsonl")])
    assert line.startswith("cannot load model 'Org/model': We couldn't connect")


def test_a_failed_model_load_leaves_no_header_that_refuses_the_corrected_rerun(tmp_path, monkeypatch):
    out = tmp_path / "p.jsonl"
    with monkeypatch.context() as m:
        m.setattr(ev.model, "load", lambda *a, **k: (_ for _ in ()).throw(OSError("no such model")))
        refused(["--bench", "toy", "--model", "Org/model", "--limit", "1", "--out", str(out)])
    assert not out.exists() or out.read_text() == ""
    assert ev.main(["--bench", "toy", "--model", "tiny", "--limit", "1", "--max_new_tokens", "2", "--out", str(out)])
    assert json.loads(out.read_text().splitlines()[0])["produced_by"]["model"] == "tiny"


def test_a_second_evaluate_writing_the_same_out_is_refused(tmp_path, monkeypatch):
    """The first run holds a lock on --out (taken here as that run would); the second stops before loading."""
    import fcntl
    monkeypatch.setattr(ev.model, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "p.jsonl"
    with open(out, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = refused(["--bench", "toy", "--model", "tiny", "--limit", "1", "--out", str(out)])
    assert "another evaluate.py is writing to --out" in line and out.read_text() == ""


def test_out_naming_a_folder_is_one_line(tmp_path):
    line = refused(["--bench", "toy", "--model", "tiny", "--limit", "1", "--out", str(tmp_path)])
    assert "is a folder" in line


def test_an_id_predicted_twice_differently_is_refused_and_word_for_word_counted(tmp_path, capsys):
    samples = ev.toy.dataset(split="test", n=2, seed=0)
    rows = [{"id": s["id"], "prediction": s["answer"]} for s in samples]
    line = refused(["--bench", "toy", "--limit", "2", "--predictions",
                    str(write_jsonl(tmp_path / "a.jsonl", rows + [dict(rows[0], prediction="wrong")]))])
    assert f"id {samples[0]['id']!r} has two different predictions (lines 1 and 3)" in line
    ev.main(["--bench", "toy", "--limit", "2", "--predictions", str(write_jsonl(tmp_path / "b.jsonl", rows + rows[:1]))])
    assert last_json_line(capsys)["counts"]["duplicate_prediction_ids"] == 1


@needs_shared
def test_generating_when_most_images_cannot_be_found_is_refused_naming_image_root(tmp_path, monkeypatch):
    """MathVista's testmini.json without its images/ folder: one line, no model loaded, no --out written."""
    monkeypatch.setattr(ev.model, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "p.jsonl"
    line = refused(["--bench", "mathvista", "--data", str(SHARED / "mathvista/data/testmini.json"), "--model", "tiny",
                    "--limit", "20", "--out", str(out)])
    assert "the images of 20 of 20 records cannot be read" in line and "--image_root" in line
    assert out.read_text() == ""


def test_generation_where_most_images_do_not_decode_ends_with_one_line(tmp_path):
    """Images found but undecodable (2 of 3): the readable record's prediction is kept, the run says why it failed."""
    rows = [mcq_row(0, b64(), A="x", B="y"), mcq_row(1, "!" * 100, A="x", B="y"), mcq_row(2, "!" * 100, A="x", B="y")]
    out = tmp_path / "o.jsonl"
    line = refused(["--bench", "mmstar", "--data", str(write_tsv(tmp_path / "m.tsv", rows)), "--model", "tiny",
                    "--max_new_tokens", "2", "--out", str(out)])
    assert "the images of 2 of 3 records could not be read" in line and len(out.read_text().splitlines()) == 2


def test_a_text_only_model_folder_is_refused_naming_the_supported_families(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm/config.json").write_text(json.dumps({"model_type": "qwen2"}))
    line = refused(["--bench", "toy", "--model", str(tmp_path / "lm"), "--limit", "1", "--out", str(tmp_path / "p.jsonl")])
    from qwen.families import FAMILIES
    assert "has no vision tower (model_type 'qwen2'" in line and ", ".join(FAMILIES.values()) in line


def test_a_hub_id_fails_at_once_when_offline_and_loads_from_the_cache_when_there(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    class NoNetwork:
        def head(self, *a, **k):
            raise ConnectionError("Name or service not known")
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: NoNetwork())
    with pytest.raises(OSError, match="Org/model .*hub cannot be reached .*does not answer.*not in the local cache"):
        ev.model.load("Org/model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"\(HF_HUB_OFFLINE is set\)"):
        ev.model.hub_access("Org/model")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/cache/config.json")
    assert ev.model.hub_access("Org/model") == {"local_files_only": True}


# ----------------------------------------------------------------------------- ChartQA labels, final answers in a reply
def test_chartqa_official_label_is_one_string_compared_whole(tmp_path):
    (tmp_path / "test_human.json").write_text(json.dumps([{"imgname": "a.png", "query": "q", "label": "[2014, 2016]"}]))
    rec = bm.load("chartqa", tmp_path)[0]
    assert rec["answer"] == ["[2014, 2016]"]
    assert sc.score_chartqa(rec, "[2014, 2016]") and not sc.score_chartqa(rec, "2014")


def test_chartqa_tsv_list_answers_stay_alternatives_as_vlmevalkit_reads_them(tmp_path):
    write_tsv(tmp_path / "ChartQA_TEST.tsv", [{"index": 0, "image": b64() * 3, "question": "q",
                                              "answer": "['2013', '2016']", "split": "human"}])
    rec = bm.load("chartqa", tmp_path / "ChartQA_TEST.tsv")[0]
    assert rec["answer"] == ["2013", "2016"] and sc.score_chartqa(rec, "2013")


MATHVERSE_DEMO = {   # evaluation/prompts.py of ZrrSkywalker/MathVerse: model responses and their extracted answers
    "(-2, 1)": "Rounded to two decimal places, the perimeter of the sector is approximately:\n\n(-2, 1)",
    "D": "at those points.\n\nTherefore, the correct option that represents the meaning of the intersection points of "
         "the graphs is:\n\nD. They give the solutions to the equation $f(t)=g(t)$.\",",
    "Domain: \\((-3, 3]\\)\nRange: \\((-4, 1]\\)": " at 1 (there's a closed circle at y = 1), the range in interval "
         "notation is \\((-4, 1]\\).\n\nFinal values:\nDomain: \\((-3, 3]\\)\nRange: \\((-4, 1]\\)",
    "22.3": "Given that AB = 17.6 meters, we can now substitute into the equation:\n\nd = 17.6 / cos(38\u00b0)\n\n"
            "Therefore, to one decimal place, the distance d between Ned and Bart is approximately 22.3 meters.",
    "f(x) = -x^2 - 2x + 1": " have all the coefficients for the quadratic function:\n\\( f(x) = ax^2 + bx + c \\)\n"
        "\\( f(x) = -1x^2 - 2x + 1 \\)\n\nTherefore, the equation for the graphed function \\( f \\) is:\n"
        "\\( f(x) = -x^2 - 2x + 1 \\)\"",
}


@pytest.mark.parametrize("prompt", ["plain", "r1vl"])
def test_mathverse_scores_the_stated_final_answer_of_its_published_example_replies(prompt):
    """The single-value examples (not the two-line Domain/Range one) are right by their stated answer; the free-form
    ones were wrong when the whole reply was compared with the gold."""
    demo = {gold: reply for gold, reply in MATHVERSE_DEMO.items() if "\n" not in gold}
    recs = [{"id": str(i), "answer": gold, "qtype": "multi-choice" if gold == "D" else "free-form"}
            for i, gold in enumerate(demo)]
    counts = Counter()
    flags, _ = ev.score("mathverse", recs, dict(zip((r["id"] for r in recs), demo.values())), prompt, counts)
    assert flags == [True] * 4 and counts["no_final_answer"] == (4 if prompt == "r1vl" else 0)
    assert not any(sc.score_mathverse(r, reply) for r, reply in zip(recs, demo.values()) if r["qtype"] == "free-form")


def test_official_rules_that_read_the_whole_reply_still_get_it():
    """MATH-V's rule scorer extracts by itself: a reply ending on a stray line is not cut to that line."""
    rec = {"id": "1", "answer": "B", "options": ["3", "8"]}
    reply = "The answer is B.\nI hope this helps"
    flags, _ = ev.score("mathvision", [rec], {"1": reply}, "plain", Counter())
    assert flags == [bool(sc.score_mathvision(rec, reply))]


@pytest.mark.parametrize("reply, ok", [("The sides add up.\nFinal answer: 14", True), ("so the answer is 14 cm.", True),
                                       ("Hence $\\boxed{14}$ is the value.", True), ("所以答案是 14。", True),
                                       ("it is 15, not 14", False)])
def test_dynamath_reads_the_stated_answer_of_a_reply_without_json(reply, ok):
    assert sc.score_dynamath({"answer": "14", "atype": "float"}, reply) is ok


@pytest.mark.parametrize("prompt", ["plain", "r1vl"])
@pytest.mark.parametrize("reply, options", [
    ("B: 8\nThe triangle's height is 4.", ["4", "8", "2", "6"]),                  # the letter stated first wins
    ("(B) 8, since the height is 4", ["4", "8", "2", "6"]),
    ("$\\frac{1}{6}$", ["$\\frac{1}{12}$", "$\\frac{1}{6}$", "x", "y"]),            # the option text, '$' or not
    ("The Maya-number for 17 is B.\n17 = 15 + 2 = 3 lines and 2 points.", ["A", "B", "C", "D"])])  # no option stated
def test_mmstar_reads_the_option_a_reply_states(reply, options, prompt):
    rec = {"id": "1", "options": options, "answer": "B", "kind": "mcq"}
    assert ev.score("mmstar", [rec], {"1": reply}, prompt, Counter())[0] == [True]


def test_a_reply_opening_with_an_option_letter_states_that_letter():
    from grading import answers
    assert answers.stated_answer("B: 8\nThe triangle's height is 4.") == "B"
    assert answers.stated_answer("(C) parallel\nso the lines never meet") == "C"
    assert answers.stated_answer("Because the height is 4.\nThe answer is 8.") == "8"


# MMStar's and MathVerse's option rules on MATH-V's 1,532 multiple-choice replies of each published run (plain prompt):
# correct before answers.stated_answer was used, and now. The stated answer must not lose what the whole reply gave.
OPTION_RULES = {"Random-Chance": {"mmstar": (260, 263), "mathverse": (94, 94)},
                "closed-source/Gemini/Gemini-Pro-CoT": {"mmstar": (259, 294), "mathverse": (296, 331)},
                "closed-source/Qwen/Qwen-VL-Max": {"mmstar": (280, 298), "mathverse": (302, 302)},
                "open-source/LLavA/LLaVA-v1.5-7B": {"mmstar": (272, 272), "mathverse": (245, 245)}}


@needs_shared
@pytest.mark.parametrize("run", OPTION_RULES)
def test_option_rules_on_published_replies_score_as_before_the_stated_answer_or_better(run, mathvision_test):
    out = {json.loads(l)["id"]: json.loads(l)["response"] for l in open(SHARED / f"mathvision/outputs/{run}.jsonl")}
    recs = [dict(r, kind="mcq", qtype="multi-choice") for r in mathvision_test if r["options"]]
    for bench, (before, now) in OPTION_RULES[run].items():
        flags, _ = ev.score(bench, recs, out, "plain", Counter())
        assert sum(flags) == now >= before
