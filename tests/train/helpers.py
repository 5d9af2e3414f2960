"""A micro training configuration that runs a step in a few ms on a CPU."""
from __future__ import annotations

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
