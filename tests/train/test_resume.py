"""Checkpoints resume exactly: N straight steps == N/2 + resume + N/2 (CPU, fp32)."""
import dataclasses
import json

import torch

from dsv.train import train
from tests.train.helpers import micro_config


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact(tmp_path):
    straight = micro_config(tmp_path, run_name="straight", steps=6)
    train(straight)
    half = micro_config(tmp_path, run_name="split", steps=3)
    train(half)
    train(dataclasses.replace(half, steps=6, resume="auto"))
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(a) == len(b) == 6
    assert a == b  # bit-identical: same data, noise, RNG, optimizer and scheduler state

    ckpt_a = torch.load(tmp_path / "straight/ckpt/step_000000006.pt", weights_only=True)["state"]
    ckpt_b = torch.load(tmp_path / "split/ckpt/step_000000006.pt", weights_only=True)["state"]
    for name, value in ckpt_a["model"].items():
        assert torch.equal(value, ckpt_b["model"][name]), name
    for name, value in ckpt_a["ema"].items():
        assert torch.equal(value, ckpt_b["ema"][name]), name


def test_run_writes_its_artifacts(tmp_path):
    result = train(micro_config(tmp_path, steps=3))
    run = tmp_path / "micro"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s"):
        assert all(r[key] > 0 for r in records), key
    assert "val_loss" in records[-1]
    assert json.loads((run / "config.json").read_text())["model"]["num_classes"] == 10
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert result["samples"] and all(p.endswith((".gif", ".mp4")) for p in result["samples"])
    assert (run / "ckpt" / "latest").read_text().strip() == "step_000000003.pt"
