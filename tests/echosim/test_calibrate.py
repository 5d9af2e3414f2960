"""echosim calibrate --nccl's sweep and comparison, run on CPU processes with gloo."""
import pytest

from echosim.hw import load_cluster
from echosim.hw.calibrate_nccl import DEFAULT, SWEPT, compare, format_comparison, run_sweeps


@pytest.fixture(scope="module")
def samples():
    return run_sweeps([2], [DEFAULT], sizes=[2**10, 2**14], iters=2)[DEFAULT]


def test_sweep_times_every_collective_at_every_size(samples):
    assert [(s["collective"], s["bytes"]) for s in samples] == [(c, b) for b in (2**10, 2**14) for c in SWEPT]
    assert all(s["n"] == 2 and s["us"] > 0 for s in samples)


def test_comparison_predicts_each_sample_and_summarises_errors(samples):
    rows = compare(load_cluster("dgx_h200"), samples)
    assert all(r["predicted_us"] > 0 for r in rows)
    ring = next(r for r in rows if r["collective"] == "all_reduce")
    assert ring["error_pct"] == pytest.approx(100 * (ring["predicted_us"] - ring["us"]) / ring["us"])
    table = format_comparison(rows, min_bytes=2**12)
    assert "send_recv" in table and "|error| above" in table


def test_host_calibration_times_real_and_fake_calls_of_both_styles(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "host.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "-m", "echosim.hw.calibrate_host", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["gpus"] == 2 and set(result["extra_us"]) == {"functional", "c10d"}
    for style in ("functional", "c10d"):
        assert result["real_us"][style] > 0 and result["fake_us"][style] > 0
        assert result["extra_us"][style] == pytest.approx(result["real_us"][style] - result["fake_us"][style])
