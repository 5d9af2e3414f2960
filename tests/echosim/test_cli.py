"""The command line on hand-written traces, and the NCCL fit on synthetic sweeps."""
import json

import pytest

from echosim.cli import main
from echosim.comm import RING_FACTORS
from echosim.graph import Node, Trace
from echosim.hw import load_cluster
from echosim.hw.calibrate_nccl import fit_cluster, fit_ring


def test_simulate_from_trace_files_writes_summary_and_perfetto_trace(tmp_path, capsys):
    nodes = [Node(id=0, kind="COMP", name="aten.mm", stream="compute", duration_us=100.0),
             Node(id=1, kind="COMM_COLL", name="all_reduce", stream="rs", deps=[0], group="dp", bytes=2**30)]
    Trace(world_size=8, ranks=list(range(8)), groups={"dp": [list(range(8))]}, nodes=nodes,
          meta={"traced_rank": 0}).save(tmp_path / "trace_rank0.json")
    main(["simulate", "--traces", str(tmp_path), "--cluster", "dgx_h100", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    all_reduce = 8.4 + 14 * 3.4 + 1.75 * 2**30 / 450e3  # ring/Simple on NVLink, see test_comm
    assert summary["step_us"] == pytest.approx(100 + all_reduce)
    assert summary["critical_rank"]["exposed_comm_us"] == pytest.approx(all_reduce)
    events = json.loads((tmp_path / "out" / "timeline.json").read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == 2  # the 8 identical ranks are one class: rank 0 replayed
    main(["simulate", "--traces", str(tmp_path), "--cluster", "dgx_h100", "--every-rank", "--out", str(tmp_path / "all")])
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["step_us"] == summary["step_us"]
    events = json.loads((tmp_path / "all" / "timeline.json").read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == 16  # 8 ranks x (mm + all-reduce)
    assert "step time" in capsys.readouterr().out


def test_simulate_reports_a_malformed_trace_clearly(tmp_path, capsys):
    (tmp_path / "trace_rank0.json").write_text("{not json")
    assert main(["simulate", "--traces", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("echosim simulate: error: ") and "trace_rank0.json: malformed JSON" in line
    with pytest.raises(ValueError, match="trace_rank0.json: malformed JSON"):
        main(["simulate", "--traces", str(tmp_path), "--out", str(tmp_path / "out"), "--traceback"])


def synthetic(base, step, gbps, counts=(2, 4)):
    return [{"collective": c, "n": n, "bytes": s,
             "us": base + RING_FACTORS[c][0](n) * step + RING_FACTORS[c][1](n) * s / (gbps * 1e3)}
            for c in ("all_gather", "reduce_scatter", "all_reduce") for n in counts for s in (2**10, 2**20, 2**30)]


def test_ring_fit_recovers_the_parameters_of_synthetic_sweeps():
    assert fit_ring(synthetic(9.0, 2.5, 380.0)) == pytest.approx((9.0, 2.5, 380.0), rel=1e-6)


def test_fitted_cluster_keeps_network_parameters():
    seed = load_cluster("dgx_h200")
    fitted = fit_cluster(seed, {"Simple": synthetic(9.0, 2.5, 380.0), "LL": synthetic(5.0, 0.8, 95.0)})
    assert fitted.measured and fitted.nvlink_GBps == pytest.approx(380.0)
    assert fitted.protocols["LL"].bw_fraction == pytest.approx(0.25)
    assert fitted.protocols["LL"].net_step_us == seed.protocols["LL"].net_step_us
    assert fitted.protocols["LL128"] == seed.protocols["LL128"]


def test_calibrate_host_writes_the_clusters_collective_host_cost(tmp_path, monkeypatch):
    import echosim.cli

    monkeypatch.setattr(echosim.cli, "HW_DIR", tmp_path)  # leave the shipped files alone
    main(["calibrate", "--host", "--cluster", "dgx_h200", "--gpus", "2"])  # gloo processes here
    written = json.loads((tmp_path / "dgx_h200.json").read_text())
    assert written["collective_host_us"] > 0  # gloo's blocking call vs the fake group's: far apart
    shipped = load_cluster("dgx_h200")
    assert written["tables"] == shipped.tables and written["nvlink_GBps"] == shipped.nvlink_GBps
