"""benchmarks/dsv_real_run.py: which step times count, and the whole benchmark on CPU in pieces."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.dsv_real_run import counted_windows, mean_step_ms


def _records(times: dict[int, float]) -> list[dict]:
    return [{"step": step, "step_time_s": t, "loss": 1.0} for step, t in sorted(times.items())]


def test_counted_windows_skip_stage_one_the_first_stage_two_window_and_checkpoints():
    dsv = _records({s: 0.1 for s in range(10, 130, 10)})  # logged every 10 steps up to 120
    # switch after step 47: windows must start at >= 57, i.e. at 60, 70, ...; 100 is a checkpoint step
    assert counted_windows(dsv, switch_step=47, log_every=10, ckpt_every=50) == [
        (60, 70), (70, 80), (80, 90), (90, 100), (110, 120)]
    assert counted_windows(dsv, switch_step=200, log_every=10, ckpt_every=50) == []  # never in stage 2


def test_mean_step_time_weights_windows_by_their_steps():
    records = _records({10: 9.0, 20: 0.2, 30: 0.4, 34: 1.0})
    windows = [(10, 20), (20, 30), (30, 34)]
    assert mean_step_ms(records, windows) == pytest.approx(1e3 * (0.2 * 10 + 0.4 * 10 + 1.0 * 4) / 24, rel=1e-12)
    assert mean_step_ms(records, []) is None
    with pytest.raises(ValueError, match="no record at steps \\[40\\]"):
        mean_step_ms(records, [(30, 40)])


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_in_pieces(tmp_path):
    out, results = tmp_path / "real", tmp_path / "results"
    command = [sys.executable, "benchmarks/dsv_real_run.py", "--out", str(out), "--task", "smoke", "--device", "cpu",
               "--seeds", "0", "1", "--results", str(results)]
    first = subprocess.run([*command, "--time-limit", "15"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "run the same command again" in first.stdout and not results.exists()  # stopped part-way
    second = subprocess.run(command + ["--time-limit", "900"], capture_output=True, text=True, timeout=1000)
    assert second.returncode == 0, second.stderr[-2000:]
    (path,) = results.glob("dsv_real_run_cpu_*.json")
    result = json.loads(path.read_text())
    assert path.with_suffix(".md").read_text().startswith("# DSV on a real run: smoke task, 256 tokens, cpu")
    for key in ("tokens", "steps", "switch_step", "dense_step_ms", "dsv_step_ms", "speedup", "mean_density_stage2",
                "mean_recall_stage2", "val_loss_dense", "val_loss_dsv", "fd_dense", "fd_dsv", "forced_density",
                "command", "commit"):
        assert key in result, key
    assert result["tokens"] == 256 and result["steps"] == 12 and result["forced_density"] is False
    assert result["switch_step"] == [6, 6]  # --sparse.max-dense-steps 6 of the smoke task
    for seed, s in zip((0, 1), result["per_seed"]):
        dense, dsv = out / f"dense_s{seed}", out / f"dsv_s{seed}"
        records = [json.loads(line) for line in (dsv / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records]
        assert steps == list(range(2, 13, 2))  # resumed runs keep one record per window, in order
        stage2 = [r for r in records if r["step"] > 6]
        assert s["mean_density_stage2"] == pytest.approx(np.mean([r["sparse/density"] for r in stage2]), rel=1e-12)
        assert s["mean_recall_stage2"] == pytest.approx(np.mean([r["sparse/recall"] for r in stage2]), rel=1e-12)
        by_step = {r["step"]: r["step_time_s"] for r in records}
        assert s["stage2_steps_timed"] == 2 and s["dsv_step_ms"] == pytest.approx(1e3 * by_step[12], rel=1e-12)
        assert s["speedup"] == pytest.approx(s["dense_step_ms"] / s["dsv_step_ms"], rel=1e-12)
        dense_eval = json.loads((dense / "eval" / "final" / "eval.json").read_text())
        dsv_eval = json.loads((dsv / "eval" / "final" / "eval.json").read_text())
        assert s["val_loss_dense"] == dense_eval["val_loss_mean"] and s["fd_dsv"] == dsv_eval["fd"]
        assert set(dense_eval["val_loss"]) == {"0.25", "0.5", "0.75"}
        assert s["fd_feature_space"].startswith("task-encoder (trained on digits 4x32x32x1")
        if s["mean_density_stage2"] == 1.0:  # the dispatcher ran every layer dense: DSV trained exactly as dense
            assert s["val_loss_dsv"] == s["val_loss_dense"] and s["fd_dsv"] == s["fd_dense"]
        for name in ("sparsity_heatmap.png", "density.png", "loss_vs_dense.png"):
            assert (dsv / name).stat().st_size > 5000, name
        assert (out / f"samples_s{seed}.png").stat().st_size > 0
    assert result["val_loss_dense"] == pytest.approx(np.mean([s["val_loss_dense"] for s in result["per_seed"]]))
    assert len(list((out / "task_encoder").glob("task_encoder_*.pt"))) == 1  # one encoder for every run
    ckpt = torch.load(sorted((out / "dsv_s0" / "ckpt").glob("step_*.pt"))[-1], weights_only=True)
    assert ckpt["meta"]["sparse"]["schedule"]["switch_step"] == 6
