"""validate_gpt pairs each job's measurement with its prediction and keeps failed jobs as rows."""
import pytest

import echosim.validate_gpt as validate
from echosim.simulator import build
from echosim.gpt3d import GPTJob
from echosim.hw import load_cluster

TINY = dict(model="gpt-tiny", global_batch=8, micro_batch=2)


def test_rows_pair_measured_and_predicted_and_keep_failures(monkeypatch, capsys):
    jobs = [GPTJob(tp=2, pp=2, dp=1, **TINY), GPTJob(tp=1, pp=1, dp=2, data_parallel="fsdp", **TINY),
            GPTJob(tp=3, pp=1, dp=1, **TINY)]
    fake = [{"median_ms": 2.0}, {"error": "OutOfMemoryError: CUDA out of memory"}, {"error": "tp=3 does not divide"}]
    monkeypatch.setattr(validate, "measure_many", lambda jobs, steps, warmup: fake)
    cluster = load_cluster("dgx_h200")
    rows = validate.validate_gpt(jobs, cluster, steps=2)
    predicted = validate.predicted_gpt_ms(jobs[0], cluster)
    assert rows[0]["predicted_ms"] == predicted
    assert rows[0]["error_pct"] == pytest.approx(100 * (predicted - 2.0) / 2.0)
    assert rows[1]["predicted_ms"] > 0 and rows[1]["error_pct"] is None and "out of memory" in rows[1]["error"]
    assert rows[2]["predicted_ms"] is None and rows[2]["error"] == "tp=3 does not divide"  # no trace of a bad job
    assert [r["config"] for r in rows] == ["gpt-tiny tp2 pp2 dp1 sp 1f1b mb2x4", "gpt-tiny tp1 pp1 dp2 fsdp mb2x2",
                                           "gpt-tiny tp3 pp1 dp1 sp mb2x4"]
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and table[1].startswith("gpt-tiny tp2 pp2 dp1 sp 1f1b mb2x4")


def test_measured_traces_time_every_compute_op_and_default_traces_none():
    job = GPTJob(tp=2, pp=2, dp=1, **TINY)
    for measure in (False, True):
        for trace in validate.gpt_traces(job, measure=measure):  # on the CPU: each op's CPU time
            durations = [n.duration_us for n in trace.nodes if not n.is_comm]
            assert all((d is not None and d >= 0) if measure else d is None for d in durations)
            assert not measure or sum(durations) > 0
    assert validate.predicted_gpt_ms(job, load_cluster("dgx_h200"), measure=True) > 0


def test_gpt_runs_own_step_traces_per_stage_and_replays():
    from echosim.validate_gpt import step_traces

    job = GPTJob(model="gpt-tiny", tp=2, pp=2, dp=1, global_batch=4, micro_batch=2)
    traces = step_traces(job, device="cpu", in_situ_steps=1)
    assert [t.ranks for t in traces] == [[0, 1], [2, 3]]
    for t in traces:  # 1F1B, 2 microbatches on 2 stages: two activations one way, two gradients back
        assert sorted(n.name for n in t.nodes if n.kind in ("COMM_SEND", "COMM_RECV")) == ["recv"] * 2 + ["send"] * 2
        assert t.meta["in_situ_scale"] > 0
    assert build(load_cluster("dgx_h200")).predict(traces, as_classes=True).step_us > 0


def test_gpt_runs_own_step_labels_its_groups_over_the_whole_stage():
    """tp 2 x dp 2 with FSDP: one trace for the 4 ranks of the stage, its tp and dp groups named and
    partitioned as GPTJob.groups() says (not just the traced rank's own block)."""
    from echosim.validate_gpt import step_traces

    job = GPTJob(model="gpt-tiny", tp=2, pp=1, dp=2, data_parallel="fsdp", global_batch=4, micro_batch=1)
    [trace] = step_traces(job, device="cpu", in_situ_steps=1)
    assert trace.ranks == [0, 1, 2, 3]
    assert trace.groups == {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]]}
    assert {n.name for n in trace.nodes if n.group == "dp"} >= {"all_gather", "reduce_scatter"}
    assert build(load_cluster("dgx_h200")).predict([trace], as_classes=True).step_us > 0


def test_gpt_runs_own_step_refuses_what_it_cannot_run():
    from echosim.validate_gpt import step_traces

    with pytest.raises(ValueError, match="interleaving is simulated only"):
        step_traces(GPTJob(model="gpt-tiny", tp=1, pp=2, dp=1, global_batch=4, micro_batch=1, virtual_stages=2),
                    device="cpu")
