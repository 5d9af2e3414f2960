"""echosim sweep (divisibility, memory, ranking), the overlap models and their fit, the GPT CLI."""
import json
import math
from dataclasses import replace

import pytest

from echosim.cli import main
from echosim.costs import CollectiveCall
from echosim.gpt3d import GPTJob
from echosim.graph import Node
from echosim.hw import HW_DIR, load_cluster
from echosim.hw.calibrate_overlap import fit_overlap
from echosim.memory import stage_memory
from echosim.overlap import ConstantSlowdown, FittedSlowdown, load_overlap
from echosim.sweep import sweep

TINY = GPTJob(model="gpt-tiny", global_batch=16, micro_batch=2)


@pytest.fixture(scope="module")
def rows():
    return sweep(TINY, 8, load_cluster("dgx_h100"))


def test_sweep_rejects_configurations_that_do_not_divide_the_model(rows):
    rejected = {(r.job.tp, r.job.pp, r.job.dp): r.reason for r in rows if r.verdict == "rejected"}
    assert set(rejected) == {(8, 1, 1), (1, 8, 1)}  # 4 heads, 4 layers
    assert rejected[8, 1, 1] == "tp=8 does not divide the heads (4)"
    assert rejected[1, 8, 1] == "pp=8 does not divide the 4 layers"


def test_sweep_ranks_feasible_configurations_by_step_time(rows):
    ok = [r for r in rows if r.verdict == "ok"]
    assert len(ok) == len(rows) - 4 and all(r.job.world_size == 8 for r in rows)
    assert [r.step_ms for r in ok] == sorted(r.step_ms for r in ok) and ok[0].step_ms > 0
    assert rows[-1].verdict == "rejected"


def test_sweep_flags_configurations_that_run_out_of_memory():
    need = {(j.tp, j.pp, j.dp): max(m.total_GB for m in stage_memory(j))
            for j in (GPTJob(**{**TINY.__dict__, "tp": tp, "pp": pp, "dp": 8 // (tp * pp)})
                      for tp, pp in ((1, 1), (2, 2), (4, 2)))}
    cap = (need[1, 1, 8] + need[4, 2, 1]) / 2  # tp=1 (everything replicated) does not fit, tp=4 x pp=2 does
    result = {(r.job.tp, r.job.pp, r.job.dp, r.job.data_parallel): r
              for r in sweep(TINY, 8, load_cluster("dgx_h100"), memory_GB=cap)}
    assert result[1, 1, 8, "ddp"].verdict == "out of memory" and result[1, 1, 8, "ddp"].step_ms == 0
    assert result[4, 2, 1, "ddp"].verdict == "ok"


def test_sweep_runs_a_candidate_with_the_least_recomputation_that_fits():
    base = GPTJob(model="gpt-tiny", seq_len=2048, global_batch=64, micro_batch=16)  # activations outweigh weights
    need = {mode: max(m.total_GB for m in stage_memory(replace(base, tp=2, pp=2, dp=2, recompute=mode)))
            for mode in ("none", "selective", "full")}
    assert need["none"] > need["selective"] > need["full"]
    rows = {(r.job.tp, r.job.pp, r.job.data_parallel): r
            for r in sweep(base, 8, load_cluster("dgx_h100"), memory_GB=(need["selective"] + need["full"]) / 2)}
    row = rows[2, 2, "ddp"]  # would have been flagged out of memory without recomputation
    assert (row.verdict, row.job.recompute, row.memory_GB) == ("ok", "full", need["full"]) and row.step_ms > 0
    tight = {(r.job.tp, r.job.pp, r.job.data_parallel): r
             for r in sweep(base, 8, load_cluster("dgx_h100"), memory_GB=need["full"] / 2)}[2, 2, "ddp"]
    assert tight.verdict == "out of memory" and tight.reason.endswith("with recompute full")
    forced = sweep(replace(base, recompute="full"), 8, load_cluster("dgx_h100"))
    assert {r.job.recompute for r in forced if r.verdict == "ok"} == {"full"}  # --recompute is where the search starts


def test_memory_counts_18_bytes_per_parameter_under_ddp_and_shards_under_fsdp():
    jobs = [GPTJob(**{**TINY.__dict__, "tp": 2, "pp": 2, "dp": 2, "data_parallel": k}) for k in ("ddp", "fsdp")]
    ddp, fsdp = (stage_memory(j) for j in jobs)
    for a, b in zip(ddp, fsdp):
        params = a.weights_GB / 2
        assert (a.grads_GB, a.optimizer_GB) == pytest.approx((4 * params, 12 * params))
        assert (b.grads_GB, b.optimizer_GB) == pytest.approx((2 * params, 6 * params))
        assert a.activations_GB == b.activations_GB > 0
    for stage, live in ((0, 2), (1, 1)):  # 1F1B on 2 stages: stage 0 holds 2 microbatches, stage 1 one
        saved = sum(part.saved_bytes for _, part in jobs[0].stage_parts(stage))
        assert ddp[stage].activations_GB == pytest.approx(live * saved / 1e9)


def test_fitted_overlap_model_recovers_duration_and_size_terms():
    # slowdown = a + b ln(t): gemm beside large collectives 2.0 - 0.1 ln t, memory beside small ones 1.2 + 0 ln t
    truth = {("gemm", 256 * 2**20): (2.0, -0.1), ("memory", 16 * 2**20): (1.2, 0.0)}
    samples = [{"op_class": cls, "collective": coll, "collective_bytes": nbytes, "kernel": f"k{i}",
                "isolated_us": t, "overlapped_us": t * (a + b * math.log(t)) * (1.02 if i % 2 else 1.0),
                "held_out": i % 2 == 1}
               for (cls, nbytes), (a, b) in truth.items() for coll in ("all_reduce", "all_gather")
               for i, t in enumerate((10.0, 100.0, 1000.0, 3000.0, 10000.0))]
    model = fit_overlap(samples)
    assert model.terms["gemm"]["large"] == pytest.approx([2.0, -0.1])
    assert model.terms["memory"]["small"] == pytest.approx([1.2, 0.0], abs=1e-9)
    assert model.validation["median_abs_error_pct"] == pytest.approx(100 * (1 - 1 / 1.02))
    assert model.validation["mean_abs_constant_error_pct"] > 2 * model.validation["mean_abs_error_pct"]
    mm = Node(id=0, kind="COMP", name="aten.mm", stream="compute", flops=1.0)
    add = Node(id=0, kind="COMP", name="aten.add", stream="compute", bytes=1.0)
    big, small = (CollectiveCall(name="all_reduce", members=[0, 1], bytes=b) for b in (2**30, 2**20))
    assert model(mm, 100.0, [big]) == pytest.approx(2.0 - 0.1 * math.log(100.0))
    assert model(mm, 100.0, [small]) == 1.0  # not measured: the default
    assert model(add, 50.0, [small, big]) == pytest.approx(1.2)  # the largest of its factors
    assert model(mm, 1e9, [big]) == 1.0  # never faster than alone


def test_overlap_spec_is_a_constant_or_a_file(tmp_path):
    assert load_overlap("1.0") is None and load_overlap("1.3") == ConstantSlowdown(factor=1.3)
    FittedSlowdown(terms={"gemm": {"large": [1.2, 0.0]}}).save(tmp_path / "o.json")
    assert load_overlap(str(tmp_path / "o.json")).terms == {"gemm": {"large": [1.2, 0.0]}}


SHIPPED_CLUSTERS = sorted(p.stem for p in HW_DIR.glob("*.json") if "gpus_per_node" in json.loads(p.read_text()))


@pytest.mark.parametrize("cluster", SHIPPED_CLUSTERS)
def test_sweep_rows_equal_simulate_on_every_shipped_cluster(cluster, tmp_path, capsys):
    # one simulator for both (echosim.simulator.build): sweep once left out the host costs, and
    # gpt-13b tp8 pp2 dp2 on dgx_h200 was 435 ms in its table against 1061 ms from simulate
    rows = [r for r in sweep(TINY, 4, load_cluster(cluster)) if r.verdict == "ok"]
    assert len(rows) == 12  # every (tp, pp) of 4 GPUs, under ddp and fsdp
    for row in rows:
        job, out = row.job, tmp_path / f"{row.job.tp}_{row.job.pp}_{row.job.data_parallel}"
        main(["simulate", "--gpt", "--model", job.model, "--tp", str(job.tp), "--pp", str(job.pp), "--dp",
              str(job.dp), "--data-parallel", job.data_parallel, "--recompute", job.recompute,
              "--global-batch", str(job.global_batch),
              "--micro-batch", str(job.micro_batch), "--cluster", cluster, "--out", str(out)])
        assert row.step_ms == json.loads((out / "summary.json").read_text())["step_us"] / 1e3


def test_cli_simulates_a_gpt_job_and_sweeps(tmp_path, capsys):
    args = ["--model", "gpt-tiny", "--tp", "2", "--pp", "2", "--dp", "2", "--global-batch", "16",
            "--micro-batch", "2", "--cluster", "dgx_h100"]
    main(["simulate", "--gpt", *args, "--out", str(tmp_path / "a")])
    main(["simulate", "--gpt", *args, "--every-rank", "--out", str(tmp_path / "b")])
    main(["simulate", "--gpt", *args, "--overlap", "1.5", "--out", str(tmp_path / "c")])
    a, b, c = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "abc")
    assert a["step_us"] == pytest.approx(b["step_us"]) and c["step_us"] > a["step_us"]
    main(["sweep", "--model", "gpt-tiny", "--gpus", "4", "--global-batch", "16", "--micro-batch", "2"])
    out = capsys.readouterr().out
    assert "rejected: pp=4 does not divide" not in out and "tp  pp   dp" in out
