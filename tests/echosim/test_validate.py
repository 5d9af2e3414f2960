"""echosim validate's real-step path on CPU: one torchrun job (gloo) runs several workloads."""
import pytest

from dsv.sim.dit import DiTWorkload
from echosim.hw import load_cluster
from echosim.validate import measure_many, validate, workload_traces

TINY = dict(preset="tiny", frames=4, height=16, width=16, dtype="float32")


@pytest.fixture(scope="module")
def measured():
    workloads = [DiTWorkload(**TINY), DiTWorkload(**TINY, cp_heads=3), DiTWorkload(**TINY, batch=2)]
    return measure_many(workloads, 2, steps=2)


def test_each_workload_gets_its_step_times(measured):
    for result in (measured[0], measured[2]):
        assert len(result["all_ms"]) == 2 and result["median_ms"] > 0


def test_a_failing_workload_reports_its_error_and_the_rest_still_run(measured):
    assert "error" in measured[1] and "context-parallel groups" in measured[1]["error"]


def test_validate_prints_a_row_per_runnable_workload(capsys):
    rows = validate([DiTWorkload(**TINY), DiTWorkload(**TINY, cp_heads=2)], [1], load_cluster("dgx_h200"), steps=1)
    assert [r["config"] for r in rows] == ["tiny 4x16x16 b1"]  # cp 2 cannot run on one rank
    assert rows[0]["predicted_ms"] > 0 and "error_pct" in rows[0]
    assert "tiny 4x16x16 b1" in capsys.readouterr().out


def test_traces_carry_the_workload():
    [trace] = workload_traces(DiTWorkload(**TINY), 4, measure=False)
    assert trace.meta["fsdp"] == 4 and trace.meta["preset"] == "tiny"


def test_measured_fsdp_trace_times_every_op_and_scales_to_the_full_speed_step():
    [trace] = workload_traces(DiTWorkload(**TINY), 2, measure=True)  # FSDP's in-place gathers get real data
    comp = [n for n in trace.nodes if n.kind == "COMP"]
    assert all(n.duration_us is not None for n in comp)
    assert trace.meta["in_situ_step_us"] > 0 and trace.meta["in_situ_scale"] > 0
