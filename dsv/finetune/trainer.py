"""Finetuner: a diffusers video transformer trained with flow matching on precomputed latents.

    dsv finetune --diffusers Wan2.1-T2V-1.3B-Diffusers/transformer --latents latents/ \
        --flow.scheduler Wan2.1-T2V-1.3B-Diffusers/scheduler --sparse dsv --lora-rank 16 --export wan-dsv/
    torchrun --nproc-per-node 8 -m dsv.cli finetune ...      # FSDP2: one unit per transformer block

One step: a batch of latents x0 (B, C, T', H', W') and text embeddings (B, L, D) from the
LatentStream; noise and u drawn for the global batch (so N ranks see what one process would);
x_t = (1 - sigma) x0 + sigma noise; the transformer, called with timestep sigma * 1000,
predicts v = noise - x0 (flow.py); MSE; AdamW over the trainable weights (every weight, or the
LoRA adapters); with --sparse dsv the DSV handle steps its predictors. Checkpoints
(dsv/checkpoint.py, atomic) hold the trainable weights and their optimizer, and in meta the
step, LR schedule, data position, noise generator, RNG and DSV state: a resumed run continues
bit for bit. Everything goes to runs/<run-name>/: config.json, metrics.jsonl, tb/, ckpt/,
loss_curve.png; --export writes the transformer with save_pretrained (LoRA merged).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from dsv.checkpoint import CheckpointError, complete_checkpoints, find_checkpoint, load_checkpoint, save_checkpoint
from dsv.data.latents import LatentShards, LatentStream
from dsv.finetune.config import FinetuneConfig, check_resume
from dsv.finetune.flow import FlowSchedule, noised
from dsv.finetune.models import add_lora, load_transformer, merge_lora
from dsv.integrations.diffusers import apply_dsv
from dsv.metrics import MetricsLogger, plot_loss_curve
from dsv.parallel.runtime import Runtime, barrier, distributed_run
from dsv.train import optimizer_step
from torchkit.cli import UsageError
from torchkit.config_cli import config_to_dict


class FinetuneState(Stateful):
    """The trainable weights and their AdamW state (DTensors under FSDP). With LoRA the frozen base
    weights are left out: they are what --diffusers holds."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, trainable_only: bool):
        self.model, self.optimizer, self.trainable_only = model, optimizer, trainable_only
        self.trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, Any]:
        options = StateDictOptions(ignore_frozen_params=self.trainable_only)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = self.trainable - set(state["model"])
        if missing:
            raise KeyError(f"trainable weights missing: {sorted(missing)[:3]}")
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(strict=not self.trainable_only))


class Finetuner:
    def __init__(self, cfg: FinetuneConfig, runtime: Runtime):
        self.cfg, self.runtime, self.device = cfg.validate(), runtime, runtime.device
        torch.manual_seed(cfg.seed)
        if cfg.batch_size % runtime.world_size:
            raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the world size {runtime.world_size}")
        self.dataset = LatentShards(cfg.latents)
        model, self.family = load_transformer(cfg.diffusers)
        self._check_data(model)
        self.run_dir = Path(cfg.out_dir) / cfg.run_name
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.compute_dtype = torch.bfloat16 if use_bf16 else None
        model.to(self.device)
        if cfg.lora_rank:
            add_lora(model, cfg.lora_rank, seed=cfg.seed)
        self.dsv = (apply_dsv(model, cfg.sparse, cube=cfg.cube, seed=cfg.seed, world_size=runtime.world_size)
                    if cfg.sparse.mode == "dsv" else None)
        if cfg.activation_checkpointing:
            model.enable_gradient_checkpointing()
        if runtime.distributed:  # FSDP2 as dsv/parallel/parallelize.py: each block, then the root
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
            for block in getattr(model, self.family.blocks):
                fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                           fused=self.device.type == "cuda")
        warmup = o.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.state = FinetuneState(model, self.optimizer, trainable_only=cfg.lora_rank > 0)
        self.local_batch = cfg.batch_size // runtime.world_size
        self.stream = LatentStream(self.dataset, self.local_batch, rank=runtime.rank, world_size=runtime.world_size,
                                   seed=cfg.seed)
        self.schedule = FlowSchedule.from_config(cfg.flow)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.step = 0
        self._torch_rng: torch.Tensor | None = None  # a resumed run's global RNG, set by `batches`

    def _check_data(self, model: nn.Module) -> None:
        channels, text_dim = self.dataset.latent_shape[0], self.dataset.text_shape[1]
        wants = model.config.in_channels, getattr(model.config, self.family.text_dim)
        if (channels, text_dim) != wants:
            raise UsageError(f"--latents {self.cfg.latents} holds {channels}-channel latents and {text_dim}-wide text "
                             f"embeddings; the transformer takes {wants[0]} and {wants[1]}: precompute with this "
                             "model's VAE and text encoder")

    # ------------------------------------------------------------------ state

    def dataset_fingerprint(self) -> dict[str, Any]:
        return {"samples": len(self.dataset), "latent_shape": list(self.dataset.latent_shape)}

    def meta(self) -> dict[str, Any]:
        return {"step": self.step, "config": config_to_dict(self.cfg), "scheduler": self.scheduler.state_dict(),
                "data": self.stream.state_dict(), "dataset": self.dataset_fingerprint(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "sparse": self.dsv.state_dict() if self.dsv else None}

    def save(self) -> Path:
        return save_checkpoint(self.run_dir / "ckpt", self.step, self.state, self.meta(), self.runtime,
                               keep=self.cfg.keep_checkpoints)

    def resume(self, spec: str) -> Path:
        path = find_checkpoint(spec, self.run_dir)

        def check(meta: dict[str, Any]) -> None:
            check_resume(meta["config"], config_to_dict(self.cfg), path)
            if meta["dataset"] != self.dataset_fingerprint():
                raise CheckpointError(f"{path} was trained on {meta['dataset']}; --latents now holds "
                                      f"{self.dataset_fingerprint()}: resume on the same latents")

        meta = load_checkpoint(path, self.state, self.runtime, check_meta=check)
        self.step = meta["step"]
        self.scheduler.load_state_dict(meta["scheduler"])
        self.stream.load_state_dict(meta["data"])
        self.generator.set_state(meta["generator"])
        self._torch_rng = meta["torch_rng"]
        if self.dsv:
            self.dsv.load_state_dict(meta["sparse"])
        return path

    def export(self, folder: Path) -> Path:
        """The trained transformer as a diffusers directory (save_pretrained, safetensors), LoRA
        merged into the weights; DSV is not part of it (its predictors live in the checkpoints)."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.runtime.is_main:
            model, _ = load_transformer(self.cfg.diffusers)
            if self.cfg.lora_rank:
                add_lora(model, self.cfg.lora_rank, seed=self.cfg.seed)
            model.load_state_dict(full, strict=True)
            if self.cfg.lora_rank:
                merge_lora(model)
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            os.replace(tmp, folder)
        barrier(self.runtime)
        return folder

    # ------------------------------------------------------------------ one step

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The stream from the current step. A resumed run sets torch's global RNG once the first
        batch is loaded, after the DataLoader has drawn its base seed from it, as the uninterrupted
        run did before its first step: the global RNG then continues exactly too."""
        for batch in self.stream:
            if self._torch_rng is not None:
                torch.set_rng_state(self._torch_rng)
                self._torch_rng = None
            yield batch

    def loss_on(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Noise and u drawn for the global batch, this rank's slice used."""
        b, r = self.local_batch, self.runtime.rank
        noise = torch.randn((self.cfg.batch_size, *latents.shape[1:]), generator=self.generator, device=self.device)
        u = self.schedule.draw_u(self.cfg.batch_size, generator=self.generator, device=self.device)
        local = slice(r * b, (r + 1) * b)
        sigma = self.schedule.sample_sigmas(u[local])  # (B,)
        x_t, target = noised(latents, noise[local], sigma)  # each (B, C, T', H', W')
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype is not None):
            prediction = self.family.predict(self.model, x_t, self.schedule.timesteps(sigma), text)
        return F.mse_loss(prediction.float(), target.float())

    def train_step(self, latents: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
        loss = self.loss_on(latents.to(self.device), text.to(self.device))
        record = optimizer_step(loss, self.trainable, self.optimizer, self.scheduler, self.runtime,
                                grad_clip=self.cfg.optim.grad_clip, step=self.step, run_dir=self.run_dir)
        self.step += 1
        return record | (self.dsv.step_end() if self.dsv else {})


# ---------------------------------------------------------------------- the run

def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the last record and where the run's files are on
    rank 0, {} on the others."""
    cfg.validate()
    with distributed_run(cfg.device, cfg.dist_timeout_s) as runtime:
        return _finetune(cfg, runtime)


def _check_run_folder(cfg: FinetuneConfig, run_dir: Path) -> None:
    """A fresh start never overwrites a run, nor an export an existing folder."""
    if cfg.export and Path(cfg.export).exists():
        raise UsageError(f"--export {cfg.export} already exists: choose a new folder")
    metrics = run_dir / "metrics.jsonl"
    if not cfg.resume and (complete_checkpoints(run_dir / "ckpt") or (metrics.exists() and metrics.stat().st_size)):
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume auto, or choose another --run-name")


def _finetune(cfg: FinetuneConfig, runtime: Runtime) -> dict[str, Any]:
    run_dir = Path(cfg.out_dir) / cfg.run_name
    _check_run_folder(cfg, run_dir)
    trainer = Finetuner(cfg, runtime)
    resumed = trainer.resume(cfg.resume) if cfg.resume else None
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        if resumed:
            print(f"resumed from step {trainer.step} ({resumed})", flush=True)
    barrier(runtime)
    logger = MetricsLogger(run_dir, enabled=runtime.is_main, tensorboard=cfg.tensorboard, resume_step=trainer.step)
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not (cfg.progress and runtime.is_main),
               dynamic_ncols=True, desc=cfg.run_name)
    last: dict[str, Any] = {}
    first_step, checkpoint = trainer.step, resumed
    start = window_start = time.perf_counter()
    window_steps = 0
    try:
        batches = trainer.batches()
        while trainer.step < cfg.steps:
            record = trainer.train_step(*next(batches))
            window_steps, step = window_steps + 1, trainer.step
            if step % cfg.log_every == 0 or step == cfg.steps:
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize(runtime.device)
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
                step_time = (time.perf_counter() - window_start) / window_steps
                record.update(step=step, step_time_s=step_time, samples_per_s=cfg.batch_size / step_time)
                logger.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                last, window_start, window_steps = record, time.perf_counter(), 0
            bar.update(1)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                checkpoint = trainer.save()
    finally:
        bar.close()
        logger.close()
    elapsed = time.perf_counter() - start
    exported = trainer.export(Path(cfg.export)) if cfg.export else None
    if not runtime.is_main:
        return {}
    curve = plot_loss_curve(logger.path, run_dir / "loss_curve.png") if logger.path.exists() else None
    done = trainer.step - first_step
    return {"step": trainer.step} | last | {
        "run_dir": str(run_dir), "steps_trained": done, "steps_per_s": done / elapsed if done else None,
        "checkpoint": str(checkpoint) if checkpoint else None, "metrics": str(logger.path),
        "loss_curve": str(curve) if curve else None, "export": str(exported) if exported else None}


def format_summary(result: dict[str, Any]) -> str:
    trained = result["steps_trained"]
    head = f"fine-tuned {trained} step{'' if trained == 1 else 's'}, to step {result['step']}"
    if "loss" in result:
        head += f"; final loss {result['loss']:.4f}"
    rows = [("checkpoint", result["checkpoint"]), ("metrics", result["metrics"]),
            ("loss curve", result["loss_curve"]), ("export", result["export"])]
    return "\n".join([head] + [f"  {name:<11} {value}" for name, value in rows if value])
