"""A micro training configuration that runs a step in a few ms on a CPU, and a launcher of
`dsv train` runs on 1 or N gloo processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from dsv.data import DataConfig
from dsv.models.dit import DiTConfig
from dsv.train import OptimConfig, TrainConfig


def micro_config(tmp_path, **overrides) -> TrainConfig:
    base = dict(
        model=DiTConfig(in_channels=1, patch=(1, 4, 4), hidden=32, depth=2, heads=2, cube=(2, 2, 2)),
        data=DataConfig(dataset="digits", frames=4, height=16, width=16, channels=1),
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        out_dir=str(tmp_path), run_name="micro", steps=6, batch_size=4, log_every=1, val_every=3,
        val_batches=1, ckpt_every=3, num_samples=2, sample_steps=2, device="cpu", tensorboard=False,
        progress=False,
    )
    return TrainConfig(**{**base, **overrides})


MICRO = ["--model.in-channels", "1", "--model.patch", "1", "4", "4", "--model.hidden", "32", "--model.depth", "2",
         "--model.heads", "2", "--model.cube", "2", "2", "2", "--data.frames", "4", "--data.height", "16",
         "--data.width", "16", "--data.channels", "1", "--steps", "4", "--batch-size", "4", "--log-every", "1",
         "--val-every", "2", "--ckpt-every", "4", "--num-samples", "2", "--sample-steps", "2", "--device", "cpu",
         "--no-tensorboard", "--no-progress", "--optim.warmup-steps", "1", "--optim.lr", "1e-3", "--class-dropout", "0.5"]


def run_train(tmp_path, name: str, nproc: int, *flags: str) -> list[dict]:
    """`dsv train` with the MICRO flags then `flags` (later flags win), on `nproc` gloo processes
    under torchrun (nproc > 1) or one plain process; returns the metrics.jsonl records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "dsv.cli", "train", *MICRO, *flags,
                                                          "--out-dir", str(tmp_path), "--run-name", name]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
