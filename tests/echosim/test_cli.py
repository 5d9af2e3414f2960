"""The command line on hand-written traces, its one-line errors, and the NCCL fit on synthetic sweeps."""
import json

import pytest

import echosim.cli
import echosim.report
from echosim.cli import build_parser, main
from echosim.comm import RING_FACTORS
from echosim.gpt3d import GPTJob
from echosim.graph import Node, Trace
from echosim.hw import HW_DIR, load_cluster
from echosim.hw.calibrate_nccl import fit_cluster, fit_ring


def write_traces(folder, world=8):
    nodes = [Node(id=0, kind="COMP", name="aten.mm", stream="compute", duration_us=100.0),
             Node(id=1, kind="COMM_COLL", name="all_reduce", stream="rs", deps=[0], group="dp", bytes=2**30)]
    Trace(world_size=world, ranks=list(range(world)), groups={"dp": [list(range(world))]}, nodes=nodes,
          meta={"traced_rank": 0}).save(folder / "trace_rank0.json")


def test_simulate_from_trace_files_writes_summary_and_perfetto_trace(tmp_path, capsys):
    write_traces(tmp_path)
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


def test_calibrate_writes_into_the_user_folder_never_the_package(tmp_path, user_folder, capsys):
    shipped = (HW_DIR / "dgx_h200.json").read_bytes()
    main(["calibrate", "--host", "--cluster", "dgx_h200", "--gpus", "2"])  # gloo processes here
    assert (HW_DIR / "dgx_h200.json").read_bytes() == shipped
    written = json.loads((user_folder / "dgx_h200.json").read_text())
    assert written["collective_host_us"] > 0  # gloo's blocking call vs the fake group's: far apart
    seed = json.loads(shipped)
    assert written["tables"] == seed["tables"] and written["nvlink_GBps"] == seed["nvlink_GBps"]
    assert f"wrote {user_folder / 'dgx_h200.json'}" in capsys.readouterr().out
    assert load_cluster("dgx_h200").collective_host_us == written["collective_host_us"]  # the user's file wins
    write_traces(tmp_path)
    main(["simulate", "--traces", str(tmp_path), "--out", str(tmp_path / "o")])
    assert f"cluster dgx_h200 (calibrated, user folder: {user_folder / 'dgx_h200.json'})" in capsys.readouterr().out
    main(["calibrate", "--host", "--gpus", "2", "--out", str(tmp_path / "mine.json")])
    assert json.loads((tmp_path / "mine.json").read_text())["collective_host_us"] > 0


def run_error(argv, capsys) -> str:
    """The one line of an echosim command that must fail with bad input (exit 2)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert line.startswith(f"echosim {argv[0]}: error: ") and "Traceback" not in captured.out
    return line


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--traces", "/nonexistent"], "--traces /nonexistent: no such directory"),
    (["simulate", "--fsdp", "0"], "--fsdp must be >= 1"),
    (["simulate", "--gpt", "--tp", "0"], "--tp must be >= 1 (tensor-parallel degree), got 0"),
    (["simulate", "--gpt", "--pp", "0"], "--pp must be >= 1 (pipeline stages), got 0"),
    (["simulate", "--gpt", "--dp", "0"], "--dp must be >= 1 (data-parallel degree), got 0"),
    (["simulate", "--gpt", "--bucket-mb", "-1"], "--bucket-mb must be > 0"),
    (["simulate", "--gpt", "--model", "gpt-9t"], "--model 'gpt-9t' is not one of gpt-tiny, gpt-1.3b, gpt-13b, "
                                                 "gpt-175b"),
    (["simulate", "--dtype", "float8"], "--dtype 'float8' is not one of bfloat16, float16, float32"),
    (["simulate", "--preset", "huge"], "--preset 'huge' is not one of tiny,"),
    (["simulate", "--density", "1.5"], "--density must be in (0, 1]"),
    (["simulate", "--cp-heads", "0"], "--cp-heads must be >= 1"),
    (["simulate", "--step", "json:dumps", "--mesh", "dp=2,tp"], "--mesh 'dp=2,tp': expected distinct NAME=SIZE"),
    (["simulate", "--step", "json:dumps", "--mesh", "dp=0"], "--mesh 'dp=0'"),
    (["simulate", "--step", "json:dumps", "--mesh", "dp=2,dp=2"], "--mesh 'dp=2,dp=2'"),
    (["simulate", "--step", "make_step"], "--step 'make_step': expected module:function"),
    (["simulate", "--step", "no_such_pkg.train:make_step"], "no module named 'no_such_pkg'"),
    (["simulate", "--step", "json:no_such_function"], "module json has no function 'no_such_function'"),
    (["simulate", "--trace-ranks", "first"], "--trace-ranks 'first': expected auto, all, or ranks"),
    (["simulate", "--overlap", "0.8"], "overlap factor 0.8: a compute slowdown beside collectives must be a number"),
    (["simulate", "--overlap", "-2"], "overlap factor -2"),
    (["simulate", "--cluster", "dgx_z9"], "no cluster 'dgx_z9': not a file"),
    (["sweep", "--gpus", "0"], "--gpus must be >= 1, got 0"),
    (["sweep", "--gpus", "8", "--model", "gpt-9t"], "--model 'gpt-9t' is not one of"),
    (["sweep", "--gpus", "8", "--sequence-parallel", "0"], "unrecognized arguments: 0"),
    (["calibrate"], "choose what to measure: --kernels, --host-ops, --nccl, --overlap, --host"),
    (["calibrate", "--host", "--nccl", "--from-samples", "s.json", "--out", "x.json"], "--out x.json is one file"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    if argv[0] in ("simulate", "trace"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert message in run_error(argv, capsys)


def test_a_folder_without_traces_is_named(tmp_path, capsys):
    line = run_error(["simulate", "--traces", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert f"--traces {tmp_path} holds no trace_rank*.json files" in line


def test_a_negative_bandwidth_is_refused_before_it_can_speed_a_job_up(tmp_path, capsys):
    cluster = json.loads((HW_DIR / "dgx_h100.json").read_text())
    cluster["nvlink_GBps"] = -450
    (tmp_path / "neg.json").write_text(json.dumps(cluster))
    write_traces(tmp_path)
    line = run_error(["simulate", "--traces", str(tmp_path), "--cluster", str(tmp_path / "neg.json"),
                      "--out", str(tmp_path / "o")], capsys)
    assert line.endswith(f"{tmp_path / 'neg.json'}: nvlink_GBps must be a number > 0, got -450")


@pytest.mark.parametrize("argv, message", [
    (["calibrate", "--kernels"], "--kernels times ops on a CUDA GPU, and none is visible here"),
    (["calibrate", "--nccl", "--gpus", "2", "4"], "--nccl measures on 4 CUDA GPUs, and 0 are visible here"),
    (["calibrate", "--overlap"], "--overlap measures on 4 CUDA GPUs, and 0 are visible here"),
    (["validate", "--gpus", "1"], "validate compares real steps on local CUDA GPUs"),
])
def test_gpu_commands_on_a_machine_without_cuda_say_so(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(echosim.cli.torch.cuda, "device_count", lambda: 0)
    assert message in run_error(argv, capsys)


def test_validate_refuses_more_gpus_than_the_machine_has(monkeypatch, capsys):
    monkeypatch.setattr(echosim.cli.torch.cuda, "device_count", lambda: 2)
    assert "--gpus 1 2 4: this machine has 2 CUDA GPUs" in run_error(["validate", "--gpus", "1", "2", "4"], capsys)


def test_gpt_flags_keep_their_spelling_through_the_shared_bridge():
    args = build_parser().parse_args(["simulate", "--gpt", "--out", "x", "--model", "gpt-13b", "--tp", "4",
                                      "--pp", "2", "--dp", "3", "--micro-batch", "2", "--global-batch", "48",
                                      "--bucket-mb", "12.5", "--data-parallel", "fsdp", "--schedule", "gpipe",
                                      "--virtual-stages", "1", "--no-sequence-parallel", "--cp-heads", "2"])
    assert echosim.cli._gpt_job(args) == GPTJob(model="gpt-13b", tp=4, pp=2, dp=3, micro_batch=2, global_batch=48,
                                                bucket_mb=12.5, data_parallel="fsdp", schedule="gpipe",
                                                sequence_parallel=False)
    assert echosim.cli._workload(args).cp_heads == 2
    assert echosim.cli._gpt_job(build_parser().parse_args(["sweep", "--gpus", "8"])) == GPTJob()


def test_simulate_names_its_hardware_and_announces_datasheet_seeds(tmp_path, capsys):
    write_traces(tmp_path)
    main(["simulate", "--traces", str(tmp_path), "--cluster", "dgx_h100", "--out", str(tmp_path / "a")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"cluster dgx_h100 (shipped: {HW_DIR / 'dgx_h100.json'}), "
                        f"GPU h100 (shipped: {HW_DIR / 'h100.json'})")
    assert lines[1].startswith('note: cluster dgx_h100 and GPU h100 are unmeasured datasheet seeds ("measured": false)')
    main(["simulate", "--traces", str(tmp_path), "--out", str(tmp_path / "b")])  # the default cluster, measured
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cluster dgx_h200 (shipped: ") and not lines[1].startswith("note:")
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["meta"]["cluster"] == "dgx_h200"


def test_timeline_holds_the_ranks_asked_for_and_its_size_is_printed(tmp_path, capsys, monkeypatch):
    write_traces(tmp_path)
    base = ["simulate", "--traces", str(tmp_path), "--cluster", "dgx_h100", "--every-rank"]

    def shown(out: str, *extra) -> set[int]:
        main([*base, *extra, "--out", str(tmp_path / out)])
        path = tmp_path / out / "timeline.json"
        assert f"{path} ({echosim.report.human_bytes(path.stat().st_size)}; rank" in capsys.readouterr().out
        return {e["pid"] for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"}

    assert shown("auto") == set(range(8))  # 16 spans, well within the budget
    assert shown("two", "--trace-ranks", "3,5") == {3, 5}
    monkeypatch.setattr(echosim.report, "TIMELINE_SPAN_BUDGET", 15)
    assert shown("big") == {0}  # over the budget: the critical rank alone
    assert shown("all", "--trace-ranks", "all") == set(range(8))
    line = run_error(["simulate", "--traces", str(tmp_path), "--trace-ranks", "0,3", "--out", str(tmp_path / "c")],
                     capsys)
    assert "--trace-ranks: ranks [3] were not replayed (replayed: 0; --every-rank replays every rank)" in line


def test_trace_says_what_it_wrote(tmp_path, capsys):
    main(["trace", "--preset", "tiny", "--fsdp", "2", "--out", str(tmp_path)])
    size = (tmp_path / "trace_rank0.json").stat().st_size
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"wrote 1 file to {tmp_path} ({echosim.report.human_bytes(size)}): trace_rank0.json " \
        f"{echosim.report.human_bytes(size)}"


def test_sweep_names_its_cluster_and_shows_progress(capsys):
    main(["sweep", "--model", "gpt-tiny", "--gpus", "2", "--global-batch", "8", "--micro-batch", "2"])
    captured = capsys.readouterr()
    assert captured.out.startswith(f"cluster dgx_h200 (shipped: {HW_DIR / 'dgx_h200.json'}), GPU h200")
    assert "sweep: 100%" in captured.err and "6/6" in captured.err  # (tp, pp) in {1, 2}^2 with tp*pp | 2, x ddp/fsdp
    main(["sweep", "--model", "gpt-tiny", "--gpus", "2", "--global-batch", "8", "--micro-batch", "2", "--no-progress"])
    assert capsys.readouterr().err == ""
