"""bench.py end to end on the tiny model: the figures it prints are measured, consistent and complete
(no timing is asserted: speed targets are read from bench.py's output, never tested)."""
import json
import sys

import pytest

import bench


def fake_peer(tmp_path, step_s=0.5):
    """A stand-in for TRL's environment: an executable that records its arguments and prints a peer's JSON line."""
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(tmp_path / 'peer-args.json')!r}, 'w'))\n"
                    f"print('some log line')\nprint(json.dumps({{'peer': 'trl', 'trl_version': '0.test', 'step_s_median': {step_s}}}))\n")
    path.chmod(0o755)
    return str(path)


def test_bench_times_the_training_step_and_the_decode_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--steps", "1", "--decode_table", "1,4:8,16",
                                      "--out_dir", str(tmp_path), "--vs_trl", fake_peer(tmp_path)])
    bench.main()
    printed = capsys.readouterr().out.strip().splitlines()
    out = json.loads(printed[-1])
    assert (out["rows"], out["completion_tokens"], out["steps"]) == (8, 64, 1)   # 2 prompts x M = 4, EOS ignored
    phases = [out[f"{k}_s_median"] for k in ("generate", "reward", "reference", "update")]
    assert all(t > 0 for t in phases) and sum(phases) <= out["step_s_median"] * 1.01
    assert out["rollout_tokens_per_s"] == pytest.approx(8 * 64 / out["generate_s_median"], rel=1e-3)  # rounded
    for path in ("shared_prefill", "prefill_per_sample"):
        assert out[f"generate_s_{path}"] > 0
    assert [(r["rows"], r["tokens"]) for r in out["decode_table"]] == [(1, 8), (1, 16), (4, 8), (4, 16)]
    assert all(r["ms_per_step"] > 0 for r in out["decode_table"])
    assert [r["vs_shortest"] for r in out["decode_table"] if r["tokens"] == 8] == [1.0, 1.0]
    assert [(p["rows"], p["tokens"], p["window"]) for p in out["decode_positions"]] == [(1, 16, 3), (4, 16, 3)]
    # --vs_trl: the peer ran on the run's own model, saved, and on the same workload; the ratio is ours / its
    args = json.loads((tmp_path / "peer-args.json").read_text())
    flag = dict(zip(args[1::2], args[2::2]))          # args[0] is scripts/trl_step.py
    assert args[0].endswith("scripts/trl_step.py") and flag["--model"] == str(tmp_path / "peer-model")
    assert (tmp_path / "peer-model" / "config.json").exists() and (tmp_path / "peer-model" / "tokenizer_config.json").exists()
    assert (flag["--prompts_per_step"], flag["--num_generations"], flag["--max_new_tokens"], flag["--image"],
            flag["--beta"], flag["--steps"]) == ("2", "4", "64", "112x112", "0.04", "1")
    assert out["trl_step_s_median"] == 0.5 and out["vs_trl_ratio"] == pytest.approx(out["step_s_median"] / 0.5, abs=1e-3)
    assert any(line.startswith("ratio (ours / trl)") for line in printed)


def test_vs_trl_failing_peer_is_one_line(tmp_path):
    """A peer that fails, or prints no result, stops bench.py with one line naming why and where its output is."""
    for code, why in (("import sys; print('loading'); sys.exit('ModuleNotFoundError: no trl')", "exited with 1 (Module"),
                      ("print('no json here')", "printed no result (no json here)")):
        with pytest.raises(SystemExit) as e:
            bench.peer_step([sys.executable, "-c", code], str(tmp_path))
        message = str(e.value)
        assert message.startswith("error: --vs_trl") and why in message and "\n" not in message
        assert str(tmp_path / "trl_step.log") in message
    with pytest.raises(SystemExit):
        bench.parse_args(["--vs_trl", str(tmp_path / "missing-python")])
    with pytest.raises(SystemExit):
        bench.parse_args(["--vs_trl", sys.executable, "--lora_rank", "8"])


def test_memory_counts_every_byte_of_the_2b_setups_on_the_meta_device():
    """bench.py --memory's accounting (training/memory.py) for the Qwen2-VL-2B: fp32 master weights, gradients and
    two AdamW moments, a reference in the sampling copy's bf16 layout (fp32 shards under FSDP); FSDP splits them and
    gathers its blocks' matmul weights in bf16, so autocast casts only the root's; LoRA trains 64·(in + out) per
    text Linear layer; checkpointing cuts a micro-batch's activations, which set the peak."""
    from training import memory
    full, fsdp, frozen, lora = (memory.account("Qwen2-VL-2B", **kw) for kw in (
        {}, dict(fsdp=True, world=4), dict(freeze_vision=True), dict(lora_rank=64)))
    n = full["params"]
    assert n == 2_208_985_600                                            # the published 2B
    assert (full["weights"], full["gradients"], full["optimizer"]) == (4 * n, 4 * n, 8 * n)
    assert full["reference"] == full["sampling_copy"] and 2 * n < full["reference"] < 4 * n / 1.5
    assert fsdp["reference"] == fsdp["weights"]
    assert 4 * n / 4 <= fsdp["weights"] < 4 * n / 4 + 2 ** 20 and fsdp["fsdp_gathered"] > 0
    assert 2 * n * 0.7 < full["autocast_casts"] < 2 * n and fsdp["autocast_casts"] < full["autocast_casts"] / 20
    vision = memory.meta_model("Qwen2-VL-2B").model.visual
    tower = sum(q.numel() for name, q in vision.named_parameters() if "merger" not in name)
    assert frozen["gradients"] == 4 * (n - tower) and frozen["activations"] < full["activations"]
    per_layer = 64 * sum(i + o for i, o in [(1536, 1536), (1536, 256), (1536, 256), (1536, 1536),
                                            (1536, 8960), (1536, 8960), (8960, 1536)])
    assert lora["gradients"] == 4 * 28 * per_layer and lora["reference"] == 0
    assert lora["sampling_copy"] == 0 and lora["peak_checkpointed"] < 24 * 2 ** 30   # samples from the policy; fits 24 GB
    for c in (full, fsdp, frozen, lora):
        assert c["activations_checkpointed"] < c["activations"] / 4
        assert c["peak"] - c["peak_checkpointed"] == c["activations"] - c["activations_checkpointed"]
