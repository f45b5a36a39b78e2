"""bench.py end to end on the tiny model: the figures it prints are measured, consistent and complete
(no timing is asserted: speed targets are read from bench.py's output, never tested)."""
import json
import sys

import pytest

import bench


def test_bench_times_the_training_step_and_the_decode_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--steps", "1", "--decode_table", "1,4:8,16",
                                      "--out_dir", str(tmp_path)])
    bench.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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
