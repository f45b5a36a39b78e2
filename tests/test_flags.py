"""The settings train.py, bench.py and the ablation script refuse: one line (argparse's error, exit 2), before
anything loads; and a run whose skips leave nothing to train on stops at its first step, naming the setting."""
import sys

import pytest

import bench
import evaluate
import train as T
from qwen import tiny
from scripts import ablation
from toy import task as toy


def refusal(parse, argv, capsys):
    with pytest.raises(SystemExit) as err:
        parse(argv)
    assert err.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--save_every", "0"], "--save_every must be at least 1"),
    (["--micro_batch", "0"], "--micro_batch must be at least 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--ppo_epochs", "0"], "--ppo_epochs must be at least 1"),
    (["--max_steps", "-3"], "--max_steps must be at least 1"),
    (["--prompts_per_step", "0"], "--prompts_per_step must be at least 1"),
    (["--grad_accum", "0"], "--grad_accum must be at least 1"),
    (["--max_prompt_len", "0"], "--max_prompt_len must be at least 1"),
    (["--num_generations", "0"], "--num_generations must be at least 2"),
    (["--num_generations", "1"], "every advantage (Eq. 4) is 0"),
    (["--lr", "-1"], "--lr must be above 0"),
    (["--sft_lr", "0"], "--sft_lr must be above 0"),
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--beta", "-0.1"], "--beta must be 0 or more"),
    (["--tis_cap", "0.5"], "--tis_cap must be 0 (off) or at least 1"),
    (["--top_p", "0.9"], "use --top_p 1 in RL"),
    (["--teacher_noise", "2"], "--teacher_noise is a share"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--clip_eps_high", "0.28"], "with --ppo_epochs 1 it is always 1"),
    (["--ppo_epochs", "2", "--clip_eps_high", "0"], "--clip_eps_high must be above 0"),
    (["--adv_scale", "per_reward", "--reward", "outcome"], "it needs --reward step (got outcome)"),
    (["--step_credit", "-1"], "--step_credit must be 0 or more"),
    (["--dynamic_sampling", "--max_extra_batches", "0"], "--max_extra_batches at least 1"),
    (["--max_extra_batches", "2"], "add --dynamic_sampling or drop it"),
    (["--stage", "sft", "--dynamic_sampling", "--step_credit", "1"], "--dynamic_sampling, --step_credit change the RL"),
    (["--stage", "sft", "--reward", "outcome"], "--stage sft has none"),
    (["--data", "r1vl.jsonl", "--eval_every", "10"], "only --data toy has one"),
    (["--eval_every", "10", "--eval_n", "0"], "give --eval_n > 0"),
    (["--fsdp"], "started by torchrun"),
])
def test_train_refuses_settings_that_crash_or_train_nothing_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert message in refusal(T.parse_args, argv, capsys)


@pytest.mark.parametrize("stage", [["--stage", "rl", "--max_steps", "1"], ["--stage", "sft", "--sft_steps", "1"]])
def test_a_run_whose_first_step_keeps_no_prompt_stops_naming_max_prompt_len(stage, tmp_path):
    with pytest.raises(SystemExit) as err:
        T.main(["--out_dir", str(tmp_path), "--max_prompt_len", "10", "--eval_n", "0", "--prompts_per_step", "2", *stage])
    assert "raise --max_prompt_len" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "final").exists()


def test_the_interrupt_hint_resumes_without_overwrite(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(T, "rl", lambda run: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(T, "load_reference", lambda run: None)
    with pytest.raises(SystemExit) as err:
        T.main(["--out_dir", str(tmp_path), "--overwrite", "--stage", "rl", "--eval_n", "0"])
    assert str(err.value).endswith(f"python train.py --out_dir {tmp_path} --stage rl --eval_n 0 --resume")
    assert "--overwrite" not in str(err.value)


@pytest.mark.parametrize("spec", ["1,4", "1,x:64", "1,4:", ":64", "0:64", "1:0"])
def test_bench_refuses_a_malformed_decode_table_in_one_line(spec, capsys):
    assert "--decode_table" in refusal(bench.parse_args, ["--decode_table", spec], capsys)


def test_bench_reads_a_decode_table_spec():
    assert bench.parse_args(["--decode_table", "1, 4:64,256"]).decode_table == "1,4:64,256"
    assert bench.parse_args(["--decode_table"]).decode_table == "1,4,8,16:64,256,1024"


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps must be at least 1"),
                                           (["--jobs", "0"], "--jobs must be at least 1"),
                                           (["--eval_every", "-1"], "--eval_every must be 0"),
                                           (["--seeds", "1", "1"], "repeats a seed")])
def test_ablation_refuses_settings_that_run_nothing_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ablation", *argv])
    assert message in refusal(lambda _: ablation.main(), None, capsys)


@pytest.mark.parametrize("parse", [T.parse_args, bench.parse_args, evaluate.parse_args, "ablation"])
def test_help_shows_each_default_once(parse, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ablation", "--help"])
    with pytest.raises(SystemExit):
        ablation.main() if parse == "ablation" else parse(["--help"])
    flags = " ".join(capsys.readouterr().out.split()).split(" --")[1:]
    assert flags and all(f.count("default") <= 1 for f in flags), [f for f in flags if f.count("default") > 1]


def test_eval_n_0_turns_off_a_presets_held_out_evaluation(tmp_path):
    args = T.parse_args(["--model", str(tmp_path), "--eval_n", "0"])      # a pretrained model: its preset evaluates
    assert args.eval_every == 200 and args.eval_n == 0


def test_a_folder_a_tiny_model_was_saved_to_gets_the_tiny_models_preset(tmp_path):
    """A run from a tiny model's warm-up folder trains at the toy preset, as from the tiny model's name."""
    for family in tiny.TINY_MODELS.values():
        tiny.load_tiny(family=family)[0].config.save_pretrained(tmp_path / family)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text('{"text_config": {"hidden_size": 1536, "num_hidden_layers": 28}}')
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('[1]')      # not a config: not a tiny model (its load says why)
    by_name = T.parse_args(["--model", "tiny"])
    tiny_folders = [(family, toy.PRESET) for family in tiny.TINY_MODELS.values()]
    for folder, preset in (*tiny_folders, ("big", toy.PRETRAINED), ("odd", toy.PRETRAINED), ("absent", toy.PRETRAINED)):
        args = T.parse_args(["--model", str(tmp_path / folder)])
        assert {k: getattr(args, k) for k in preset} == preset, folder
        assert (args.lr == by_name.lr) == (preset is toy.PRESET), folder
