"""Impossible configurations stop before any work with a message naming the field; bad
checkpoints are clear errors that never damage a good checkpoint; a non-finite loss stops."""
import dataclasses

import pytest
import torch

from dsv.checkpoint import CheckpointError
from dsv.cli import main
from dsv.data import DataConfig
from dsv.parallel.runtime import Runtime
from dsv.train import NonFiniteLossError, Trainer, train
from tests.train.helpers import micro_config

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


def test_token_grid_not_divisible_by_cube(tmp_path):
    cfg = micro_config(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, frames=3))
    with pytest.raises(ValueError, match="not divisible by cube"):
        train(cfg)


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
        train(micro_config(tmp_path, steps=6, resume=str(corrupt)))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(micro_config(tmp_path, steps=6))  # a fresh start would overwrite the run
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
