"""A short fixed-seed run's loss curve, kept in the repo, catches silent regressions in the model,
data, noise, optimizer or schedule.

After an intended change, regenerate the reference and say why in the commit:
    .venv/bin/python -m tests.train.test_loss_curve
"""
import json
from pathlib import Path

import pytest
import torch

from dsv.train import train
from tests.train.helpers import micro_config

REFERENCE = Path(__file__).with_name("loss_curve_micro.json")


def _curve(out_dir) -> list[float]:
    torch.set_num_threads(1)
    cfg = micro_config(out_dir, steps=20, ckpt_every=0, val_every=0)
    train(cfg)
    records = (Path(out_dir) / cfg.run_name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in records]


def test_loss_curve_matches_the_reference(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    # fp32 on CPU; other CPUs may pick other BLAS/oneDNN kernels, so equal to rounding, not bitwise
    assert _curve(tmp_path) == pytest.approx(reference["loss"], rel=1e-3)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.write_text(json.dumps({"config": "tests/train/helpers.py micro_config, 20 steps",
                                         "loss": _curve(tmp)}, indent=1) + "\n")
    print(f"wrote {REFERENCE}")
