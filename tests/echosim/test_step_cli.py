"""`echosim trace|simulate --step` on user step factories: transformers GPT-2 under DDP and FSDP2,
--device and --measure, and the one-line errors where they cannot run."""
import json

import pytest
import torch

from echosim.cli import main
from echosim.graph import load_trace

STEPS = "tests.echosim.steps_transformers"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA GPU is visible")


def transformers_or_skip():
    pytest.importorskip("transformers")
    from tests.echosim import steps_transformers
    return steps_transformers


def test_trace_of_a_gpt2_ddp_step_all_reduces_every_gradient_byte(tmp_path, capsys):
    steps = transformers_or_skip()
    main(["trace", "--step", f"{STEPS}:ddp_step", "--mesh", "dp=4", "--out", str(tmp_path)])
    trace = load_trace(tmp_path / "trace_rank0.json")
    params = sum(p.numel() for p in steps.tiny_gpt2("cpu").parameters())
    assert [(n.name, n.bytes) for n in trace.nodes if n.is_comm] == [("all_reduce", 4 * params)]  # one bucket
    assert trace.ranks == [0, 1, 2, 3] and trace.meta["step"] == f"{STEPS}:ddp_step"
    assert "trace_rank0.json" in capsys.readouterr().out


def test_simulate_of_a_gpt2_fsdp2_step_replays_its_gathers_and_scatters(tmp_path):
    transformers_or_skip()
    main(["simulate", "--step", f"{STEPS}:fsdp_step", "--mesh", "dp=2", "--out", str(tmp_path)])
    events = json.loads((tmp_path / "timeline.json").read_text())["traceEvents"]
    names = [e["name"] for e in events if e.get("ph") == "X" and e.get("pid", 0) == 0]
    assert names.count("all_gather") == 5 and names.count("reduce_scatter") == 3  # root + 2 blocks, blocks again
    assert json.loads((tmp_path / "summary.json").read_text())["step_us"] > 0


@no_cuda
@pytest.mark.parametrize("flags, message", [
    (["--measure"], "--measure times each kernel on a local CUDA GPU, and none is visible here; drop --measure"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible here"),
])
def test_device_flags_without_a_gpu_say_so_in_one_line(tmp_path, capsys, flags, message):
    for command in ("trace", "simulate"):
        code = main([command, "--step", "tests.echosim.test_step_user_code:converted_step", "--mesh", "dp=2",
                     *flags, "--out", str(tmp_path)])
        [line] = capsys.readouterr().err.splitlines()
        assert code == 2 and line.startswith(f"echosim {command}: error: {message}")


def test_device_flags_need_a_step_or_workload_to_trace(tmp_path, capsys):
    assert main(["simulate", "--gpt", "--measure", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("echosim simulate: error: --device and --measure trace a --step or "
                                               "--workload, not --gpt")


def test_a_compiling_step_is_refused_in_one_line(tmp_path, capsys):
    code = main(["trace", "--step", "tests.echosim.test_step_user_code:compiled_step", "--mesh", "dp=2",
                 "--out", str(tmp_path)])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2 and line.endswith("trace the uncompiled model (drop torch.compile)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_traces_on_the_gpu_with_each_kernel_timed(tmp_path):
    steps = transformers_or_skip()
    main(["trace", "--step", f"{STEPS}:ddp_step", "--mesh", "dp=2", "--device", "cuda", "--measure",
          "--out", str(tmp_path)])
    trace = load_trace(tmp_path / "trace_rank0.json")
    compute = [n for n in trace.nodes if n.kind == "COMP"]
    assert compute and all(n.duration_us is not None and n.duration_us >= 0 for n in compute)
    assert trace.meta["in_situ_step_us"] > 0  # fitted to full-speed steps on this GPU
    params = sum(p.numel() for p in steps.tiny_gpt2("cpu").parameters())
    assert [(n.name, n.bytes) for n in trace.nodes if n.is_comm] == [("all_reduce", 4 * params)]
