"""scripts/ablation.py's parts that need no training: the arms' train.py flags, the regimes, --warmup's
REGIME=DIR items, the key-step match of an evaluation's predictions, a run's training figures, the pool's
order, the pin and the tables. (The script end to end: tests/test_train.py.)"""
import json
import os
import threading

import pytest

import train as T
from scripts import ablation as A
from scripts import ablation_report
from toy import task as toy


def refusal(argv, capsys):
    with pytest.raises(SystemExit) as err:
        A.parse_args(argv)
    assert err.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def saved_model(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(text_config=dict(hidden_size=192, num_hidden_layers=4,
                                                                          intermediate_size=384))))
    return str(folder)


@pytest.mark.parametrize("regime", sorted(A.REGIMES))
def test_every_arm_is_a_train_py_run_with_its_option_at_the_toy_preset(regime, tmp_path):
    args = A.parse_args(["--regime", regime, "--warmup", saved_model(tmp_path / "w"), "--steps", "7", "--step_credit",
                         "0.25", "--reward_impl", "official", "--eval_every", "0"])
    reg = A.regimes(args)[0]
    for arm in A.ARMS:
        got = T.parse_args(["--data", "toy", "--out_dir", "x", *A.run_flags(reg, arm, 3, args)])
        # From a warm-up folder as from the tiny model: the toy preset, the regime's temperature, no curves
        preset = dict(lr=5e-5, prompts_per_step=8, grad_accum=1, max_new_tokens=160, micro_batch=16, sft_batch=32,
                      temperature=1.0 if regime == "dense" else 1.2, eval_n=0, eval_every=0, seed=3)
        assert {k: getattr(got, k) for k in preset} == preset, arm
        if arm == "sft":
            assert (got.stage, got.sft_steps, got.sft_lr) == ("sft", 7, 5e-5)
            continue
        want = dict(stage="rl", max_steps=7, reward_impl="official", dynamic_sampling=arm == "outcome_dynamic",
                    adv_scale={"step_none": "none", "step_per_reward": "per_reward"}.get(arm, "group_std"),
                    step_credit=0.25 if arm == "step_credit" else 0.0,
                    reward={"outcome_dynamic": "outcome"}.get(arm, "step" if arm.startswith("step_") else arm))
        assert {k: getattr(got, k) for k in want} == want, arm


def test_the_late_regime_is_level_2_with_a_late_slipping_teacher():
    got = T.parse_args(["--data", "toy", "--out_dir", "x", *A.REGIMES["late"]])
    assert (got.difficulty, got.teacher_noise, got.teacher_slip, got.temperature) == (2, 0.75, "late", 1.2)
    assert A.regimes(A.parse_args(["--regime", "late"]))[0].level == "2"


def test_the_study_runs_the_options_and_the_default_the_reward_ablation(capsys):
    assert A.parse_args([]).arms == ["outcome", "steprar", "steprvr", "step", "sft"]
    assert A.parse_args(["--study"]).arms == ["outcome", "outcome_dynamic", "step", "step_none", "step_per_reward",
                                              "step_credit"]
    assert A.parse_args(["--arms", "step_credit", "sft"]).arms == ["step_credit", "sft"]
    assert "--study runs the options study's arms" in refusal(["--study", "--arms", "step"], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--step_credit", "0"], "--step_credit must be above 0"),
    (["--regime", "dense", "dense"], "--regime names one twice"),
    (["--regime", "dense", "late", "--plot", "a.png"], "--plot names one chart"),
])
def test_settings_that_run_nothing_or_twice_are_refused_in_one_line(argv, message, capsys):
    assert message in refusal(argv, capsys)


def test_warmups_are_given_per_regime(tmp_path):
    dense, late = saved_model(tmp_path / "d"), saved_model(tmp_path / "l=1")
    args = A.parse_args(["--regime", "dense", "sparse", "late", "--warmup", f"dense={dense}", f"late={late}"])
    assert args.warmups == {"dense": dense, "late": late}                  # sparse: trained by the script
    assert A.parse_args(["--regime", "late", "--warmup", late]).warmups == {"late": late}   # a plain DIR, "=" in it
    regs = A.regimes(A.parse_args(["--regime", "dense", "late", "--out_dir", str(tmp_path / "o")]))
    assert [r.out_dir for r in regs] == [str(tmp_path / "o" / "dense"), str(tmp_path / "o" / "late")]
    assert A.regimes(A.parse_args(["--regime", "late"]))[0].out_dir == os.path.abspath("out/ablation-late")


@pytest.mark.parametrize("argv, message", [
    (["--warmup", "hard=D"], "'hard' is not a regime"),
    (["--regime", "dense", "--warmup", "late=D"], "late is not among --regime dense"),
    (["--regime", "dense", "late", "--warmup", "D"], "with several regimes name each one's warm-up"),
    (["--warmup", "dense=D", "dense=D"], "two warm-ups for dense"),
    (["--warmup", "dense=nowhere"], "no config.json in nowhere"),
])
def test_a_warmup_for_no_regime_run_is_refused_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    saved_model(tmp_path / "D")
    monkeypatch.chdir(tmp_path)
    assert message in refusal(argv, capsys)


def test_key_step_match_of_an_evaluation_rebuilds_each_question_s_key_steps(tmp_path):
    steps = {"a": {"Steps": [["red = 2", "2 red cells"], ["2 + 1 = 3"]]}, "b": {"Steps": [["blue = 4"], ["4 - 1 = 3"]]},
             "c": {"Steps": [["green = 1"]]}}
    preds = tmp_path / "eval.jsonl"
    preds.write_text("\n".join(json.dumps(x) for x in [
        {"produced_by": {"model": "m"}},
        {"id": "a", "prediction": "### Step 1:\nThere are 2 red cells.\n\n### Step 2:\n2 + 1 = 3\n\n"
                                  "### The final answer is: 3"},
        {"id": "b", "prediction": "### Step 1:\nblue = 4\n\n### Step 2:\n4 - 1 = 2\n\n### The final answer is: 2"},
    ]) + "\n")                                                              # c: no prediction, k = 0
    assert A.key_step_match(str(preds), steps) == pytest.approx((1 + 0.5 + 0) / 3)
    # The held-out questions' ids and key steps, as evaluate.py --bench toy reads them: their own paths match fully.
    questions = toy.dataset("test", n=3, difficulty=4)
    keyed = A.key_steps(3, "4")
    assert list(keyed) == [q["id"] for q in questions]
    preds.write_text("".join(json.dumps({"id": q["id"], "prediction": q["solution"]}) + "\n" for q in questions))
    assert A.key_step_match(str(preds), keyed) == 1.0


def test_training_figures_read_the_zero_std_share_dynamic_counts_and_times(tmp_path):
    rows = [dict(stage="rl", step=s + 1, frac_reward_zero_std=z, ds_groups_dropped=d, ds_prompts_drawn=p,
                 ds_groups_unfilled=0) for s, (z, d, p) in enumerate([(0.0, 5, 6), (0.25, 3, 3)])]
    (tmp_path / "train.log").write_text('step 2\n{"reward_first": 0.1, "seconds": 12.5}\n100%|####| 2/2\n')
    (tmp_path / "wall_seconds.json").write_text('{"wall_s": 14.0}')
    got = A.training_figures(str(tmp_path), rows)
    assert got == dict(zero_std=0.125, dynamic=dict(steps=2, groups_dropped=8, prompts_drawn=9, groups_unfilled=0),
                       wall_s=14.0, train_s=12.5)
    sft = A.training_figures(str(tmp_path), [dict(stage="sft", step=1, loss=1.0)])
    assert (sft["zero_std"], sft["dynamic"]) == (None, None)
    plain = A.training_figures(str(tmp_path), [{k: v for k, v in r.items() if not k.startswith("ds_")} for r in rows])
    assert plain["dynamic"] is None


def test_one_pool_trains_the_missing_warmups_first_and_then_each_regime_s_runs(tmp_path, monkeypatch):
    done, lock = [], threading.Lock()

    def note(*what):
        with lock:
            done.append(what)
    monkeypatch.setattr(A, "train", lambda out, *flags: note("warm-up", os.path.basename(os.path.dirname(out + "/"))) or "w")
    monkeypatch.setattr(A, "baseline", lambda reg, args: note(reg.name, "baseline") or ({}, dict(arm="warmup")))
    monkeypatch.setattr(A, "arm_run", lambda reg, arm, seed, args: note(reg.name, arm, seed) or dict(arm=arm, warm=reg.warmup))
    args = A.parse_args(["--regime", "dense", "sparse", "--warmup", f"dense={saved_model(tmp_path / 'd')}", "--jobs", "1",
                         "--arms", "outcome", "step", "--seeds", "0", "1", "--out_dir", str(tmp_path / "o")])
    got = A.run_all(A.regimes(args), args)
    dense = [("dense", "baseline")] + [("dense", a, s) for s in (0, 1) for a in ("outcome", "step")]
    assert done == [("warm-up", "warmup")] + dense + [("sparse", *d[1:]) for d in dense]
    assert got["sparse", "step", 1]["warm"] == "w" and got["dense", "step", 1]["warm"] == str(tmp_path / "d")
    assert len(got) == 2 * 5


def test_a_folder_keeps_the_settings_its_runs_were_made_with(tmp_path, capsys):
    args = A.parse_args(["--out_dir", str(tmp_path)])
    reg = A.regimes(args)[0]
    setup = A.pin(reg, args)
    older = {k: v for k, v in setup.items() if k != "step_credit"}        # a pin from before --step_credit
    (tmp_path / "setup.json").write_text(json.dumps(older))
    assert A.pin(reg, args) == setup
    with pytest.raises(SystemExit, match="use another --out_dir"):
        A.pin(reg, A.parse_args(["--out_dir", str(tmp_path), "--step_credit", "0.3"]))


def test_the_tables_show_each_arm_per_regime_and_across_regimes(tmp_path, capsys):
    args = A.parse_args(["--regime", "dense", "late", "--arms", "outcome_dynamic", "step_credit", "--seeds", "0", "1",
                         "--eval_every", "0"])
    regs = A.regimes(args)
    run = lambda arm, acc, **x: dict(arm=arm, accuracy=acc, format=100.0, key_step_match=0.5, **x)   # noqa: E731
    dynamic = dict(steps=10, groups_dropped=20, prompts_drawn=30, groups_unfilled=0)
    runs = {"dense": [run("warmup", 40.0), run("outcome_dynamic", 42.0, zero_std=0.0, dynamic=dynamic, wall_s=100.0),
                      run("step_credit", 50.0, zero_std=0.5, wall_s=80.0), run("outcome_dynamic", 44.0, zero_std=0.1,
                      dynamic=dynamic, wall_s=120.0), run("step_credit", 52.0, zero_std=0.3, wall_s=None)],
            "late": [run("warmup", 10.0), run("outcome_dynamic", 11.0), run("step_credit", 20.0),
                     run("outcome_dynamic", 13.0), run("step_credit", 22.0)]}
    ablation_report.report(regs[0], args, runs["dense"], A.LABELS)
    ablation_report.combined(regs, args, runs, A.LABELS)
    out = capsys.readouterr().out
    assert "| + outcome reward, dynamic sampling (DAPO) | 43.0 ± 1.4 | +3.0 | 100.0 | 0.50 | 0.05 (2.0 groups dropped, " \
           "3.0 prompts drawn per step) | – | 110 s | 42.0, 44.0 |" in out
    assert "| + StepGRPO, per-step credit | 51.0 ± 1.4 | +11.0 | 100.0 | 0.50 | 0.40 | – | 80 s | 50.0, 52.0 |" in out
    assert "| arm | dense | late |" in out and "| warm-up only | 40.0 | 10.0 |" in out
    assert "| + StepGRPO, per-step credit | 51.0 ± 1.4 | 21.0 ± 1.4 |" in out
    ablation_report.plot(runs["dense"], str(tmp_path / "a.png"), A.LABELS)
    assert (tmp_path / "a.png").stat().st_size > 10_000
