"""Impossible configurations stop before any work with a message naming the field; bad
checkpoints are clear errors that never damage a good checkpoint; a non-finite loss stops."""
import dataclasses
import math
import json
import re

import pytest
import torch

import dsv.train
from dsv.checkpoint import CheckpointError
from dsv.cli import main
from dsv.data import DataConfig
from dsv.models.dit import dit_b, tiny
from dsv.parallel.runtime import Runtime
from dsv.train import NonFiniteLossError, OptimConfig, TrainConfig, Trainer, _lr_lambda, train
from tests.train.helpers import micro_config
from torchkit.cli import UsageError

CPU2 = Runtime(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))


def test_batch_not_divisible_by_world_size(tmp_path):
    with pytest.raises(ValueError, match="batch_size=5 is not divisible by the world size 2"):
        Trainer(micro_config(tmp_path, batch_size=5), CPU2)


def test_resolution_not_divisible_by_patch(tmp_path):
    cfg = micro_config(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, height=18))
    with pytest.raises(ValueError, match=r"height=18 % 4"):
        train(cfg)
    assert not (tmp_path / "micro").exists()  # stopped before any work


def test_token_grid_not_divisible_by_cube_trains(tmp_path):
    """3 frames with cube (2, 2, 2): the last cube along time is padded and masked, not refused."""
    cfg = micro_config(tmp_path, steps=2, val_every=0)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, frames=3))
    result = train(cfg)
    assert math.isfinite(result["loss"])


def test_heads_not_dividing_hidden(tmp_path):
    cfg = micro_config(tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, heads=3))
    with pytest.raises(ValueError, match="hidden=32 is not divisible by heads=3"):
        train(cfg)


def test_channels_mismatch(tmp_path):
    cfg = micro_config(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, channels=3))
    with pytest.raises(ValueError, match="--model.in-channels"):
        train(cfg)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(micro_config(tmp_path, resume="auto"))
    with pytest.raises(CheckpointError, match="does not exist"):
        train(micro_config(tmp_path, resume=str(tmp_path / "nope.pt")))


def test_corrupt_checkpoint_is_an_error_and_good_one_survives(tmp_path):
    train(micro_config(tmp_path, steps=3))
    ckpt = tmp_path / "micro/ckpt/step_000000003.pt"
    good = ckpt.read_bytes()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        train(micro_config(tmp_path, run_name="fork", steps=6, resume=str(corrupt)))
    with pytest.raises(UsageError, match="micro already holds a run \\(checkpoints\\)"):
        train(micro_config(tmp_path, steps=6, resume=str(corrupt)))  # another run's checkpoint into this run
    assert ckpt.read_bytes() == good


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    train(micro_config(tmp_path, steps=3))
    ckpt = tmp_path / "micro/ckpt/step_000000003.pt"
    good = ckpt.read_bytes()
    original = Trainer.loss_on

    def poisoned(self, *args):
        loss = original(self, *args)
        return loss * float("nan") if self.step >= 4 else loss

    monkeypatch.setattr(Trainer, "loss_on", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan .* at step 5"):
        train(micro_config(tmp_path, steps=6, resume="auto", ckpt_every=1))
    assert (tmp_path / "micro/ckpt/latest").read_text().strip() == "step_000000004.pt"
    assert ckpt.read_bytes() == good

    # the advice works: --resume auto with a lower --optim.lr continues from step 4 at that learning rate
    monkeypatch.undo()
    lower = micro_config(tmp_path, steps=6, resume="auto", optim=OptimConfig(lr=1e-4, warmup_steps=2))
    train(lower)
    records = [json.loads(line) for line in (tmp_path / "micro/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    factor = _lr_lambda(lower)
    assert [r["lr"] for r in records[4:]] == [1e-4 * factor(4), 1e-4 * factor(5)]


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    code = main(["train", "--model.heads", "3", "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 2  # bad input
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("dsv train: error: ") and "hidden=128 is not divisible by heads=3" in line


def test_every_train_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model.hidden", "--data.frames", "--optim.lr", "--resume", "--activation-checkpointing"):
        assert flag in out


def test_unknown_dataset_named():
    with pytest.raises(ValueError, match="dataset must be one of"):
        DataConfig(dataset="imagenet")


TINY_RUN = ["--preset", "tiny", "--batch-size", "2", "--log-every", "1", "--no-progress", "--no-tensorboard",
            "--val-every", "0", "--num-samples", "1", "--sample-steps", "1", "--steps", "4"]


@pytest.mark.parametrize("flags, message", [
    (["--val-batches", "0"], "--val-batches 0: must be >= 1"),
    (["--log-every", "0"], "--log-every 0: must be >= 1"),
    (["--num-samples", "0"], "--num-samples 0: must be >= 1"),
    (["--sample-steps", "0"], "--sample-steps 0: must be >= 1"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--ckpt-every", "-1"], "--ckpt-every -1: must be >= 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be >= 0"),
    (["--optim.lr", "-0.1"], "--optim.lr -0.1: must be >= 0"),
    (["--optim.ema-decay", "1"], r"--optim.ema-decay 1.0: must be in \[0, 1\)"),
    (["--class-dropout", "1"], r"--class-dropout 1.0: must be in \[0, 1\)"),
    (["--data.num-workers", "-1"], "--data.num-workers -1: must be >= 0"),
    (["--sparse.rank", "8"], "--sparse.rank 8: --sparse.* options do nothing without --sparse dsv"),
    (["--no-sparse.predictor-rope"], "--no-sparse.predictor-rope: --sparse.* options do nothing"),
    (["--data.path", "/nonexistent"], "--data.path is read only with --data.dataset folder"),
    (["--data.dataset", "folder", "--data.path", "/nonexistent"], "video folder /nonexistent does not exist"),
])
def test_bad_values_are_one_line_errors_before_any_work(tmp_path, capsys, flags, message):
    code = main(["train", *TINY_RUN, "--out-dir", str(tmp_path), *flags])
    assert code == 2  # bad input
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("dsv train: error: ")
    assert re.search(message, line), line
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_bad_input(tmp_path, capsys):
    assert main(["train", *TINY_RUN, "--out-dir", str(tmp_path), "--device", "cuda"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == ("dsv train: error: --device cuda was requested but CUDA is not available; "
                    "use --device cpu or auto")


def test_presets_apply_from_python_and_the_cli(tmp_path, monkeypatch):
    assert TrainConfig(preset="B").model == dit_b()
    assert TrainConfig().model == tiny()
    seen = []
    monkeypatch.setattr(dsv.train, "train", lambda cfg: seen.append(cfg) or {})
    assert main(["train", "--preset", "B", "--model.depth", "2"]) == 0
    assert seen[0].preset == "B" and seen[0].model == dit_b(depth=2)


def test_unknown_preset_is_a_choice_error(capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["train", "--preset", "Q"])
    [line] = capsys.readouterr().err.splitlines()
    assert "argument --preset: invalid choice: 'Q' (choose from 'tiny', 'S', 'B'" in line
    with pytest.raises(UsageError, match="--preset 'Q': choose one of"):
        TrainConfig(preset="Q")


@pytest.mark.parametrize("argv, line", [
    (["plan", "--gpus", "0"], "dsv plan: error: --gpus 0: must be >= 1"),
    (["plan", "--sparsity", "1.5"], "dsv plan: error: --sparsity 1.5: must be in [0, 1]"),
    (["plan", "--heads", "4", "--dense-heads", "5"], "dsv plan: error: --dense-heads 5: must be in [0, --heads 4]"),
    (["plan", "--bogus"], "dsv plan: error: unrecognized arguments: --bogus"),
    (["report", "/nonexistent"], "dsv report: error: /nonexistent is not a run directory (it has no metrics.jsonl)"),
    (["sample", "--ckpt", "x.pt", "--num", "0"], "dsv sample: error: --num 0: must be >= 1"),
    (["sample", "--ckpt", "x.pt", "--steps", "0"], "dsv sample: error: --steps 0: must be >= 1"),
])
def test_other_commands_bad_input_is_one_line(capsys, argv, line):
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors exit from inside the parser
        code = stop.code
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [line]
