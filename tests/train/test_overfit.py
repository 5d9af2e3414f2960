"""The trainer can fit: a fixed batch with fixed noise and timesteps is driven toward zero loss."""
import time

import torch

from dsv.parallel.runtime import Runtime
from dsv.train import OptimConfig, Trainer
from tests.train.helpers import micro_config

CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_overfits_a_fixed_batch(tmp_path):
    cfg = micro_config(tmp_path, steps=120, class_dropout=0.0,
                       optim=OptimConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1, ema_decay=0.9))
    trainer = Trainer(cfg, CPU)
    videos, labels = trainer.stream.batch_at(0)
    losses = []
    start = time.perf_counter()
    for _ in range(cfg.steps):
        trainer.generator.manual_seed(1234)  # same noise and timesteps every step
        losses.append(trainer.train_step(videos, labels)["loss"])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # At init the output is exactly zero, so the first loss is E[(noise - x0)^2] ~ 1.5-2; a model
    # that memorises 4 clips with fixed noise gets well under a tenth of it in 300 steps.
    assert last < first / 10, (first, last, time.perf_counter() - start)
