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

    from torchkit.launch import torchrun

    out = tmp_path / "host.json"
    torchrun("echosim.hw.calibrate_host", str(out), nproc=2, capture_output=True)
    result = json.loads(out.read_text())
    assert result["gpus"] == 2 and set(result["extra_us"]) == {"functional", "c10d"}
    for style in ("functional", "c10d"):
        assert result["real_us"][style] > 0 and result["fake_us"][style] > 0
        assert result["extra_us"][style] == pytest.approx(result["real_us"][style] - result["fake_us"][style])


def test_jump_sizes_split_intervals_where_nccl_jumps_and_nothing_else():
    from echosim.hw.calibrate_nccl import jump_sizes

    mib = 2**20

    def curve(name, points):
        return [{"collective": name, "n": 2, "bytes": b, "us": t} for b, t in points]

    smooth = curve("all_gather", [(mib, 14.0), (2 * mib, 20.0), (4 * mib, 30.0)])  # sublinear: one protocol
    rise = curve("all_reduce", [(mib, 14.0), (2 * mib, 40.0), (4 * mib, 50.0)])  # 2x the size, 2.9x the time
    fall = curve("broadcast", [(mib, 20.0), (2 * mib, 15.0)])
    assert jump_sizes(smooth) == []
    assert jump_sizes(rise) == jump_sizes(fall) == [1321088, 1664512]  # 2^(20+1/3), 2^(20+2/3), to 128 B
    assert jump_sizes(rise, avoid=[1321088]) == [1321216, 1664512]
    small = curve("all_reduce", [(2**12, 5.0), (2**13, 11.0)])  # a jump of microseconds: not refined
    assert jump_sizes(small) == []
