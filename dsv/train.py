"""Trainer: flow matching on videos with AdamW, EMA, checkpoints, metrics and samples.

    dsv train --preset tiny                                   # CPU demo, a few minutes
    torchrun --nproc-per-node 8 -m dsv.cli train --preset 2.7B --data.frames 64 ...   # FSDP2

Everything a run writes goes to runs/<run-name>/: config.json, metrics.jsonl, tb/ (TensorBoard),
ckpt/ (atomic checkpoints, `--resume auto` continues exactly), samples/ and loss_curve.png.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from dsv.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from torchkit.cli import Failure
from torchkit.config_cli import config_to_dict
from dsv.data import BatchStream, DataConfig, build_dataset, validation_batches
from dsv.flow import flow_matching_loss, logit_normal_timesteps
from dsv.metrics import MetricsLogger, peak_flops, plot_loss_curve
from dsv.models.dit import DIT_PRESETS, DiTConfig, VideoDiT, train_flops
from dsv.parallel.hybrid import ContextParallelAttention
from dsv.parallel.mesh import build_parallel_mesh
from dsv.parallel.parallelize import parallelize
from dsv.parallel.planner import CostModel, Workload, choose_plan, format_table
from dsv.parallel.runtime import (DEFAULT_TIMEOUT_S, Runtime, all_reduce_mean, barrier, collective_timeout_errors,
                                  init_runtime, shutdown)
from dsv.sample import write_samples
from dsv.sparse import DSVAttention, SparseConfig
from dsv.train_state import TrainState


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate of AdamW"})
    betas: tuple[float, float] = field(default=(0.9, 0.99), metadata={"help": "AdamW betas"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps from 0 to lr"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at lr * min_lr_ratio"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    ema_decay: float = field(default=0.999, metadata={
        "help": "EMA of the weights used for sampling; the decay warms up as (1 + step) / (10 + step)"})


@dataclass(kw_only=True)
class TrainConfig:
    preset: str = field(default="tiny", metadata={"help": f"model preset, one of {list(DIT_PRESETS)}; "
                                                          "--model.* flags override its fields"})
    model: DiTConfig = field(default_factory=DIT_PRESETS["tiny"], metadata={"help": "model shape"})
    data: DataConfig = field(default_factory=lambda: DataConfig(channels=3), metadata={"help": "training videos"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimiser and schedule"})
    sparse: SparseConfig = field(default_factory=SparseConfig, metadata={
        "help": "DSV sparse attention (--sparse dsv) or the dense baseline (--sparse none)"})
    run_name: str = field(default="dev", metadata={"help": "the run directory is <out-dir>/<run-name>"})
    out_dir: str = field(default="runs", metadata={"help": "parent folder of run directories"})
    steps: int = field(default=200, metadata={"help": "optimiser steps to train for"})
    batch_size: int = field(default=8, metadata={"help": "global batch (videos per step, all ranks together)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, noise and timesteps"})
    class_conditional: bool = field(default=True, metadata={
        "help": "condition on the dataset's class labels (sets model.num_classes from the dataset)"})
    class_dropout: float = field(default=0.1, metadata={
        "help": "probability of training a sample with the null label (classifier-free guidance)"})
    cp_heads: int = field(default=1, metadata={
        "help": "context-parallel ranks that split the heads (all-to-all; heads assigned by cost)"})
    cp_seq: int = field(default=1, metadata={
        "help": "context-parallel ranks that split the sequence (KV exchange); data parallel = world / (cp_heads*cp_seq)"})
    cp: Literal["manual", "auto"] = field(default="manual", metadata={
        "help": "auto: the planner chooses cp_heads x cp_seq over all ranks from the cluster's costs"})
    cp_heads_inner: bool = field(default=True, metadata={
        "help": "keep the head group on consecutive ranks (one node); --no-cp-heads-inner keeps the sequence group there"})
    cluster: str = field(default="dgx_h200", metadata={"help": "echosim cluster (name or JSON) the cp planner costs"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "where to train"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "auto = bf16 autocast on CUDA, fp32 on CPU"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in backward"})
    compile: bool = field(default=False, metadata={"help": "torch.compile every DiT block"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics records"})
    val_every: int = field(default=100, metadata={"help": "steps between validation losses (0 = only at the end)"})
    val_batches: int = field(default=2, metadata={"help": "held-out batches per validation"})
    ckpt_every: int = field(default=100, metadata={"help": "steps between checkpoints (0 = only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    sample_every: int = field(default=0, metadata={"help": "steps between sample grids (0 = only at the end)"})
    num_samples: int = field(default=8, metadata={"help": "videos in a sample grid"})
    sample_steps: int = field(default=25, metadata={"help": "Euler steps of the sampler"})
    cfg_scale: float = field(default=3.0, metadata={"help": "classifier-free guidance scale of samples"})
    resume: str | None = field(default=None, metadata={
        "help": "'auto' = the run directory's latest checkpoint, or a checkpoint path"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard events to <run>/tb"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on rank 0"})
    dist_timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata={
        "help": "seconds a collective waits for the other ranks before this rank stops with an error naming it"})


class NonFiniteLossError(Failure):
    pass


def _validate(cfg: TrainConfig, runtime: Runtime) -> None:
    """Stop before any work, naming the field and the fix."""
    cp = cfg.cp_heads * cfg.cp_seq
    if runtime.world_size % cp:
        raise ValueError(f"world size {runtime.world_size} is not a multiple of cp_heads x cp_seq = {cp}: "
                         "change --cp-heads/--cp-seq or the number of processes")
    dp = runtime.world_size // cp
    if cfg.batch_size % dp:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the world size {runtime.world_size}"
                         + (f" / context-parallel {cp} = {dp} data-parallel ranks" if cp > 1 else "")
                         + f": use a multiple of {dp}")
    if cfg.steps < 1:
        raise ValueError(f"steps={cfg.steps}: must be >= 1")
    if cfg.data.channels != cfg.model.in_channels:
        raise ValueError(f"data.channels={cfg.data.channels} but model.in_channels={cfg.model.in_channels}: "
                         "set --model.in-channels to the data's channels")
    if not 0.0 <= cfg.class_dropout < 1.0:
        raise ValueError(f"class_dropout={cfg.class_dropout}: must be in [0, 1)")
    cfg.model.validate()
    cfg.model.check_input(cfg.data.frames, cfg.data.height, cfg.data.width)


def _plan_context_parallel(cfg: TrainConfig, runtime: Runtime) -> TrainConfig:
    """--cp auto: every rank joins one context-parallel group; the planner picks its grid for dense
    attention (stage 1 of DSV is dense; head costs are re-balanced later, the grid is not)."""
    m = cfg.model
    tokens = prod(m.check_input(cfg.data.frames, cfg.data.height, cfg.data.width))
    work = Workload(heads=m.heads, head_dim=m.head_dim, seq_len=tokens, density=[[1.0] * m.heads] * m.depth,
                    batch=cfg.batch_size)
    report = choose_plan(work, CostModel.from_cluster(cfg.cluster), runtime.world_size)
    if runtime.is_main:
        print(format_table(report), flush=True)
    plan = report.best.plan
    return dataclasses.replace(cfg, cp="manual", cp_heads=plan.cp_heads, cp_seq=plan.cp_seq,
                               cp_heads_inner=plan.heads_inner)


def _lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class Trainer:
    def __init__(self, cfg: TrainConfig, runtime: Runtime):
        self.runtime = runtime
        dataset = build_dataset(cfg.data)
        classes = dataset.num_classes if cfg.class_conditional else 0
        if cfg.model.num_classes not in (0, classes):
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has {classes} classes")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=classes))
        if cfg.cp == "auto":
            cfg = _plan_context_parallel(cfg, runtime)
        _validate(cfg, runtime)
        self.cfg, self.dataset = cfg, dataset
        self.run_dir = Path(cfg.out_dir) / cfg.run_name
        self.device = runtime.device
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        torch.manual_seed(cfg.seed)
        model = VideoDiT(cfg.model).to(self.device)
        # -- DSV: predictors, profiler and schedule live in the attention backend, outside the model
        self.sparse: DSVAttention | None = None
        if cfg.sparse.mode == "dsv":
            # one all-reduce over every rank (group None): sums each cp group's shares, averages the dp replicas
            self.sparse = DSVAttention(cfg.sparse, cfg.model, self.device, seed=cfg.seed,
                                       world_size=runtime.world_size, context_parallel=cfg.cp_heads * cfg.cp_seq)
            model.set_attention(self.sparse)
        # -- context parallelism: a (dp, heads, seq) mesh; the cp ranks of a group share samples and noise
        self.mesh = build_parallel_mesh(self.device.type, runtime.world_size, cp_heads=cfg.cp_heads,
                                        cp_seq=cfg.cp_seq, heads_inner=cfg.cp_heads_inner)
        cp_attention = None
        if self.mesh.cp > 1:  # DSV: predictor features travel with the heads, selection where a head lives
            cp_attention = (self.sparse.context_parallel_attention(self.mesh) if self.sparse else
                            ContextParallelAttention(self.mesh, heads=cfg.model.heads))
        self.model = parallelize(model, runtime, activation_checkpointing=cfg.activation_checkpointing,
                                 compile=cfg.compile, param_dtype=self.autocast_dtype, mesh=self.mesh,
                                 cp_attention=cp_attention)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas,
                                           weight_decay=o.weight_decay, fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.state = TrainState(self.model, self.optimizer)
        self.local_batch = cfg.batch_size // self.mesh.dp
        self.stream = BatchStream(dataset, self.local_batch, rank=self.mesh.dp_rank, world_size=self.mesh.dp,
                                  seed=cfg.data.seed, num_workers=cfg.data.num_workers)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.step = 0
        self.grid = cfg.model.check_input(cfg.data.frames, cfg.data.height, cfg.data.width)
        self.tokens_per_sample = prod(self.grid)
        # per rank: a context-parallel group of cp ranks shares its videos' work
        self.flops_per_step = train_flops(cfg.model, self.tokens_per_sample, self.local_batch) / self.mesh.cp
        self.peak = peak_flops(self.device)
        self._validation: list | None = None

    # ------------------------------------------------------------------ state

    def meta(self) -> dict[str, Any]:
        return {"step": self.step, "config": config_to_dict(self.cfg), "scheduler": self.scheduler.state_dict(),
                "data": self.stream.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "sparse": self.sparse.state_dict() if self.sparse else None}

    def save(self) -> Path:
        return save_checkpoint(self.run_dir / "ckpt", self.step, self.state, self.meta(), self.runtime,
                               keep=self.cfg.keep_checkpoints)

    def resume(self, spec: str) -> None:
        path = find_checkpoint(spec, self.run_dir)
        meta = load_checkpoint(path, self.state, self.runtime)
        saved_model = meta["config"]["model"]
        if saved_model != config_to_dict(self.cfg.model):
            raise CheckpointError(f"{path} was written by a different model config: {saved_model}")
        self.step = meta["step"]
        self.scheduler.load_state_dict(meta["scheduler"])
        # The schedule follows this run's --steps, so a run extended on resume decays to its new end.
        factor = _lr_lambda(self.cfg)(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.stream.load_state_dict(meta["data"])
        self.generator.set_state(meta["generator"])
        torch.set_rng_state(meta["torch_rng"])
        if self.sparse:
            if not meta.get("sparse"):
                raise CheckpointError(f"{path} holds no DSV state: resume it with --sparse none")
            _check_predictors_match(path, meta["config"].get("sparse", {}), self.cfg.sparse)
            self.sparse.load_state_dict(meta["sparse"])

    # ------------------------------------------------------------------ one step

    def _noise_and_times(self, shape: tuple[int, ...], labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Drawn for the *global* batch and sliced to this rank, so N ranks see exactly the
        noise, timesteps and label dropout that one process would."""
        world_b, r, b = self.cfg.batch_size, self.mesh.dp_rank, self.local_batch
        noise = torch.randn((world_b, *shape), generator=self.generator, device=self.device)
        t = logit_normal_timesteps(world_b, generator=self.generator, device=self.device)
        drop = torch.rand(world_b, generator=self.generator, device=self.device) < self.cfg.class_dropout
        local = slice(r * b, (r + 1) * b)
        if self.cfg.model.num_classes:
            labels = torch.where(drop[local], self.cfg.model.num_classes, labels)
        else:
            labels = None
        return noise[local], t[local], labels

    def loss_on(self, videos: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return flow_matching_loss(self.model, videos, noise, t, labels)

    def train_step(self, videos: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        videos, labels = videos.to(self.device, non_blocking=True), labels.to(self.device)
        noise, t, cond = self._noise_and_times(tuple(videos.shape[1:]), labels)
        loss = self.loss_on(videos, noise, t, cond)
        loss.backward()
        clip = self.cfg.optim.grad_clip
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        global_loss = all_reduce_mean(loss.detach(), self.runtime).item()
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if not (math.isfinite(global_loss) and math.isfinite(grad_norm.item())):
            raise NonFiniteLossError(
                f"non-finite loss {global_loss} / grad norm {grad_norm.item()} at step {self.step + 1}; stopping. "
                f"The last good checkpoint in {self.run_dir / 'ckpt'} is kept: lower --optim.lr or enable "
                "--optim.grad-clip, then --resume auto")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # EMA warm-up: the average starts short and lengthens to ema_decay, so early samples are not noise
        self.state.update_ema(min(self.cfg.optim.ema_decay, (1 + self.step) / (10 + self.step)))
        self.step += 1
        record = {"loss": global_loss, "lr": lr, "grad_norm": grad_norm.item()}
        if self.sparse:
            record |= self.sparse.step_end(self.step)
        return record

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss on fixed held-out clips with fixed noise and timesteps (comparable across runs)."""
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed + 7919)
        local = slice(self.mesh.dp_rank * self.local_batch, (self.mesh.dp_rank + 1) * self.local_batch)
        losses = []
        if self._validation is None:  # the held-out clips never change: build (or decode) them once
            self._validation = validation_batches(self.cfg.data, self.cfg.batch_size, self.cfg.val_batches)
        for videos, labels in self._validation:
            noise = torch.randn(videos.shape, generator=gen, device=self.device)[local]
            t = logit_normal_timesteps(videos.shape[0], generator=gen, device=self.device)[local]
            videos, labels = videos[local].to(self.device), labels[local].to(self.device)
            cond = labels if self.cfg.model.num_classes else None
            losses.append(all_reduce_mean(self.loss_on(videos, noise, t, cond).detach(), self.runtime))
        return torch.stack(losses).mean().item()


def _check_predictors_match(path: Path, saved: dict, cfg: SparseConfig) -> None:
    """The saved predictors fit this run's only with the same rank and position rotation (checkpoints
    from before `predictor_rope` existed hold predictors without positions)."""
    for name, default in (("rank", None), ("predictor_rope", False)):
        was, now = saved.get(name, default), getattr(cfg, name)
        if was != now:
            option = name.replace("_", "-")
            hint = (f"--sparse.{option}" if was else f"--no-sparse.{option}") if isinstance(was, bool) \
                else f"--sparse.{option} {was}"
            raise CheckpointError(f"{path} holds predictors with {name}={was}, this run asks for {now}: "
                                  f"resume with {hint}")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final record (loss, val_loss, paths)."""
    runtime = init_runtime(cfg.device, timeout_s=cfg.dist_timeout_s)
    try:
        with collective_timeout_errors(runtime, flag="--dist-timeout-s"):
            return _train(cfg, runtime)
    finally:
        shutdown(runtime)


def _train(cfg: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    trainer = Trainer(cfg, runtime)
    cfg, run_dir = trainer.cfg, trainer.run_dir
    if cfg.resume:
        trainer.resume(cfg.resume)
    elif (run_dir / "ckpt" / "latest").exists():
        raise CheckpointError(f"{run_dir} already holds checkpoints: continue it with --resume auto, "
                              "or choose a new --run-name (nothing is overwritten)")
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    barrier(runtime)
    logger = MetricsLogger(run_dir, enabled=runtime.is_main, tensorboard=cfg.tensorboard, resume_step=trainer.step)
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not (cfg.progress and runtime.is_main),
               dynamic_ncols=True, desc=cfg.run_name)
    last: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    try:
        batches = iter(trainer.stream)
        while trainer.step < cfg.steps:
            record = trainer.train_step(*next(batches))
            window_steps += 1
            step = trainer.step
            if step % cfg.log_every == 0 or step == cfg.steps:
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize(runtime.device)
                step_time = (time.perf_counter() - window_start) / window_steps
                record.update(step=step, step_time_s=step_time,
                              tokens_per_s=cfg.batch_size * trainer.tokens_per_sample / step_time)
                if trainer.peak:
                    record["mfu"] = trainer.flops_per_step / step_time / trainer.peak
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
                if (cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps:
                    record["val_loss"] = trainer.validation_loss()
                logger.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.3g}")
                last = record
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
                trainer.save()
            if cfg.sample_every and step % cfg.sample_every == 0 and step != cfg.steps:
                write_samples(trainer, run_dir / "samples" / f"step_{step:06d}")
    finally:
        bar.close()
        logger.close()
    last["samples"] = [str(p) for p in write_samples(trainer, run_dir / "samples" / f"step_{trainer.step:06d}")]
    if runtime.is_main:
        curve = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        last["loss_curve"] = str(curve) if curve else None
    return last
