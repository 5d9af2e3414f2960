"""2-process gloo runs (FSDP2 data parallel; context parallel over heads or over the sequence)
match the 1-process run, loss by loss (and, for FSDP, parameter by parameter); a compiled,
recomputing run matches eager."""
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dsv.sample import load_for_sampling
from tests.train.helpers import run_train


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tmp_path):
    single, sharded = run_train(tmp_path, "single", 1), run_train(tmp_path, "fsdp", 2)
    assert [r["step"] for r in single] == [r["step"] for r in sharded] == [1, 2, 3, 4]
    for a, b in zip(single, sharded):
        # fp32; the only difference is the order of the gradient reduction (sum of 2 halves)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert sharded[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)

    full = tmp_path / "fsdp_full.pt"
    dcp_to_torch_save(str(tmp_path / "fsdp/ckpt/step_000000004"), str(full))
    got = torch.load(full, weights_only=True)["train"]
    want = torch.load(tmp_path / "single/ckpt/step_000000004.pt", weights_only=True)["state"]
    assert set(got["model"]) == set(want["model"])
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in want["ema"].items():
        torch.testing.assert_close(got["ema"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # `dsv sample` reads the sharded directory directly: the gathered EMA weights of the conversion above
    model, _ = load_for_sampling(tmp_path / "fsdp/ckpt/step_000000004", torch.device("cpu"))
    for name, value in model.named_parameters():
        assert torch.equal(value.detach(), got["ema"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--cp-heads", "2"), ("--cp-seq", "2", "--data.height", "32")])
def test_two_process_context_parallel_matches_one_process(tmp_path, flags):
    """Both ranks of the cp group train the same 4 videos; the loss must equal one process's."""
    extra = flags[2:]
    single, cp = run_train(tmp_path, "single", 1, *extra), run_train(tmp_path, "cp", 2, *flags)
    for a, b in zip(single, cp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_compiled_blocks_with_activation_checkpointing_match_eager(tmp_path):
    """torch.compile (inductor, CPU) and recomputation change kernels, not the function."""
    eager = run_train(tmp_path, "eager", 1)
    compiled = run_train(tmp_path, "compiled", 1, "--compile", "--activation-checkpointing")
    for a, b in zip(eager, compiled, strict=True):
        # fp32; inductor fuses and reorders reductions, so agreement is to rounding, not bitwise
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
