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
from math import prod
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dsv.checkpoint import CheckpointError, complete_checkpoints, find_checkpoint, load_checkpoint, save_checkpoint
from dsv.data import BatchStream, build_dataset, validation_batches
from dsv.flow import flow_matching_loss, logit_normal_timesteps
from dsv.metrics import MetricsLogger, peak_flops, plot_loss_curve
from dsv.models.dit import VideoDiT, train_flops
from dsv.ops.block_select.mass import num_blocks
from dsv.parallel.hybrid import ContextParallelAttention
from dsv.parallel.mesh import build_parallel_mesh
from dsv.parallel.parallelize import parallelize
from dsv.parallel.planner import CostModel, Workload, choose_plan, format_table
from dsv.parallel.runtime import Runtime, all_reduce_mean, barrier, distributed_run
from dsv.sample import write_samples
from dsv.sparse import DSVAttention, SparseConfig
from dsv.sparse.dispatch import DispatchTable
from dsv.sparse.schedule import kept_density
from dsv.train_config import OptimConfig, TrainConfig, check_same_dataset, resume_changes
from dsv.train_state import TrainState
from torchkit.cli import Failure, UsageError
from torchkit.config_cli import config_to_dict

__all__ = ["OptimConfig", "TrainConfig", "Trainer", "train", "format_summary", "sparse_start_notes"]


class NonFiniteLossError(Failure):
    pass


def optimizer_step(loss: torch.Tensor, params, optimizer, scheduler, runtime: Runtime, *, grad_clip: float,
                   step: int, run_dir: Path) -> dict[str, float]:
    """Backward of this rank's `loss`, the gradient norm clipped to `grad_clip` (0 = off), then one step
    of `optimizer` and `scheduler`. Returns {"loss": mean over ranks, "lr": this step's, "grad_norm"};
    a non-finite loss or norm raises NonFiniteLossError before any weight changes."""
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    global_loss = all_reduce_mean(loss.detach(), runtime).item()
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    if not (math.isfinite(global_loss) and math.isfinite(grad_norm)):
        raise NonFiniteLossError(
            f"non-finite loss {global_loss} / grad norm {grad_norm} at step {step + 1}; stopping. "
            f"The last good checkpoint in {run_dir / 'ckpt'} is kept: continue with --resume auto "
            "and a lower --optim.lr (or --optim.grad-clip)")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"loss": global_loss, "lr": lr, "grad_norm": grad_norm}


def _validate(cfg: TrainConfig, runtime: Runtime) -> None:
    """The checks that need the world size (cfg.validate() did the others), naming the field and the fix."""
    cp = cfg.cp_heads * cfg.cp_seq
    if runtime.world_size % cp:
        raise ValueError(f"world size {runtime.world_size} is not a multiple of cp_heads x cp_seq = {cp}: "
                         "change --cp-heads/--cp-seq or the number of processes")
    dp = runtime.world_size // cp
    if cfg.batch_size % dp:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the world size {runtime.world_size}"
                         + (f" / context-parallel {cp} = {dp} data-parallel ranks" if cp > 1 else "")
                         + f": use a multiple of {dp}")


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
        cfg.validate()  # the cheap checks first: the dataset may take a while to index
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
                "data": self.stream.state_dict(), "dataset": self.dataset_fingerprint(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "sparse": self.sparse.state_dict() if self.sparse else None}

    def dataset_fingerprint(self) -> dict[str, int]:
        return {"videos": len(self.dataset), "classes": self.dataset.num_classes}

    def save(self) -> Path:
        return save_checkpoint(self.run_dir / "ckpt", self.step, self.state, self.meta(), self.runtime,
                               keep=self.cfg.keep_checkpoints)

    def resume(self, spec: str) -> tuple[Path, dict[str, list]]:
        """Continue from a checkpoint; returns it and the fields this run changes ({name: [was, now]})."""
        path = find_checkpoint(spec, self.run_dir)
        changes: dict[str, list] = {}

        def check(meta: dict[str, Any]) -> None:
            changes.update(resume_changes(meta["config"], config_to_dict(self.cfg), path))
            check_same_dataset(meta.get("dataset"), self.dataset_fingerprint(), path)

        meta = load_checkpoint(path, self.state, self.runtime, check_meta=check)
        self.step = meta["step"]
        self.scheduler.load_state_dict(meta["scheduler"])
        self._apply_optim_config()
        self.stream.load_state_dict(meta["data"])
        self.generator.set_state(meta["generator"])
        torch.set_rng_state(meta["torch_rng"])
        if self.sparse:
            if not meta.get("sparse"):
                raise CheckpointError(f"{path} holds no DSV state: resume it with --sparse none")
            _check_predictors_match(path, meta["config"].get("sparse", {}), self.cfg.sparse)
            self.sparse.load_state_dict(meta["sparse"])
        return path, changes

    def _apply_optim_config(self) -> None:
        """The restored optimizer and schedule carry the checkpoint's lr, betas and weight decay: this
        run's --optim.* replace them. The schedule follows this run's --steps and warm-up, so a run
        extended on resume decays to its new end."""
        o = self.cfg.optim
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        factor = _lr_lambda(self.cfg)(self.step)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=o.lr, lr=o.lr * factor, betas=o.betas, weight_decay=o.weight_decay)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

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
        record = optimizer_step(loss, self.model.parameters(), self.optimizer, self.scheduler, self.runtime,
                                grad_clip=self.cfg.optim.grad_clip, step=self.step, run_dir=self.run_dir)
        # EMA warm-up: the average starts short and lengthens to ema_decay, so early samples are not noise
        self.state.update_ema(min(self.cfg.optim.ema_decay, (1 + self.step) / (10 + self.step)))
        self.step += 1
        if self.sparse:
            record |= self.sparse.step_end(self.step)
        return record

    @torch.no_grad()
    def validation_loss(self, t: float | None = None) -> float:
        """Mean loss on fixed held-out clips with fixed noise and timesteps (comparable across runs); with
        `t`, every clip at that noise level instead (the noise stays the same for every t)."""
        if t is not None and not 0.0 <= t <= 1.0:
            raise UsageError(f"validation noise level t={t}: must be in [0, 1]")
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed + 7919)
        local = slice(self.mesh.dp_rank * self.local_batch, (self.mesh.dp_rank + 1) * self.local_batch)
        losses = []
        if self._validation is None:  # the held-out clips never change: build (or decode) them once
            self._validation = validation_batches(self.cfg.data, self.cfg.batch_size, self.cfg.val_batches)
        for videos, labels in self._validation:
            noise = torch.randn(videos.shape, generator=gen, device=self.device)[local]
            times = logit_normal_timesteps(videos.shape[0], generator=gen, device=self.device)[local]
            times = times if t is None else torch.full_like(times, t)
            videos, labels = videos[local].to(self.device), labels[local].to(self.device)
            cond = labels if self.cfg.model.num_classes else None
            losses.append(all_reduce_mean(self.loss_on(videos, noise, times, cond).detach(), self.runtime))
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
    """Run (or resume) a training run; returns the final record (loss, val_loss, ...) and where the
    run's files are (run_dir, checkpoint, metrics, loss_curve, samples) on rank 0, {} on the others."""
    cfg.validate()
    with distributed_run(cfg.device, cfg.dist_timeout_s) as runtime:
        return _train(cfg, runtime)


def _check_run_folder(cfg: TrainConfig, run_dir: Path) -> None:
    """Nothing overwrites a run: a fresh start, or a continuation of another run's checkpoint, needs a
    run folder without checkpoints or metrics."""
    if cfg.resume == "auto":
        return
    if cfg.resume and Path(cfg.resume).resolve().parent == (run_dir / "ckpt").resolve():
        return
    held = complete_checkpoints(run_dir / "ckpt") or (run_dir / "ckpt" / "latest").exists()
    metrics = run_dir / "metrics.jsonl"
    if held or (metrics.exists() and metrics.stat().st_size):
        what = "checkpoints" if held else "metrics"
        start = f"continuing {cfg.resume} here" if cfg.resume else "a fresh start"
        raise UsageError(f"{run_dir} already holds a run ({what}), which {start} would overwrite: continue it "
                         "with --resume auto, or choose another --run-name")


def sparse_start_notes(cfg: TrainConfig, tokens: int, table: DispatchTable | None, stage: int = 1) -> list[str]:
    """Why a --sparse dsv run of `tokens` tokens per video may not attend sparsely, said before the first step
    rather than found as density 1 in the metrics afterwards: too few steps for stage 2, a dispatch table that
    finds sparse attention slower than dense at every density, or a budget cap that rounds up to every block."""
    s, notes = cfg.sparse, []
    if stage == 1 and cfg.steps <= s.min_dense_steps:
        notes.append(f"stage 2 cannot start within --steps {cfg.steps}: stage 1 lasts at least --sparse.min-dense-steps "
                     f"{s.min_dense_steps}; lower it, or train longer")
    elif stage == 1 and cfg.steps <= s.max_dense_steps:
        notes.append(f"stage 2 starts when the predictor loss falls below --sparse.loss-threshold {s.loss_threshold} "
                     f"(not before step {s.min_dense_steps}), else at --sparse.max-dense-steps {s.max_dense_steps}, "
                     f"after this run's {cfg.steps} steps: it may stay dense; add --sparse.max-dense-steps N "
                     f"(N < {cfg.steps}) to switch at step N at the latest")
    blocks = num_blocks(tokens, s.block_size)
    if blocks == 1:
        return notes + [f"{tokens} tokens are one --sparse.block-size {s.block_size} block: there is no block to skip, "
                        "density stays 1; use a smaller block size or longer videos"]
    if table is not None:
        fewest = kept_density(torch.tensor([s.min_density]), blocks)
        # the speed-up is interpolated linearly between the table's densities: its grid points bound it
        if not any(table.use_sparse(tokens, d) for d in [fewest] + [d for d in table.densities if d > fewest]):
            made = f"measured on {table.device}" if table.device else s.dispatch_table
            notes.append(f"the dispatch table ({made}) finds sparse attention slower than dense at {tokens} tokens "
                         "at every density, so stage 2 runs every layer dense (density 1): add --sparse.dispatch "
                         "sparse to attend sparsely anyway (quality runs, CPU)")
    if kept_density(torch.tensor([s.max_density]), blocks) == 1.0:
        notes.append(f"--sparse.max-density {s.max_density} rounds up to all {blocks} KV blocks, so a head whose "
                     f"attention is broad (early in training, small models) keeps every block and density stays 1: "
                     f"--sparse.max-density {(blocks - 1) / blocks:.3g} keeps at most {blocks - 1}, at some loss of "
                     "attention mass")
    return notes


def _write_config(run_dir: Path, cfg: TrainConfig, resumed: tuple[Path, dict[str, list]] | None,
                  step: int) -> None:
    """config.json is this run's config; each resume appends to its `resume_history` the step, the
    checkpoint and the fields it changed ({name: [was, now]}), so the original values stay readable."""
    path = run_dir / "config.json"
    history: list[dict[str, Any]] = []
    if resumed is not None and path.exists():
        try:
            history = json.loads(path.read_text()).get("resume_history", [])
        except json.JSONDecodeError:
            history = []  # a config.json cut short by a crash: the checkpoint holds the config
    if resumed is not None:
        checkpoint, changes = resumed
        history.append({"step": step, "checkpoint": str(checkpoint), "changed": changes})
    record = config_to_dict(cfg) | ({"resume_history": history} if history else {})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def _train(cfg: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    _check_run_folder(cfg, Path(cfg.out_dir) / cfg.run_name)
    trainer = Trainer(cfg, runtime)
    cfg, run_dir = trainer.cfg, trainer.run_dir
    resumed = trainer.resume(cfg.resume) if cfg.resume else None
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, cfg, resumed, trainer.step)
        if resumed:
            checkpoint, changes = resumed
            changed = "".join(f"; {name} {was!r} -> {now!r}" for name, (was, now) in changes.items())
            print(f"resumed from step {trainer.step} ({checkpoint}){changed}", flush=True)
        if trainer.sparse:
            for note in sparse_start_notes(cfg, trainer.tokens_per_sample, trainer.sparse.table,
                                           trainer.sparse.schedule.stage):
                print(f"note: --sparse dsv: {note}", flush=True)
    barrier(runtime)
    logger = MetricsLogger(run_dir, enabled=runtime.is_main, tensorboard=cfg.tensorboard, resume_step=trainer.step)
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not (cfg.progress and runtime.is_main),
               dynamic_ncols=True, desc=cfg.run_name)
    last: dict[str, Any] = {}
    first_step, checkpoint = trainer.step, resumed[0] if resumed else None
    start = window_start = time.perf_counter()
    window_steps = 0
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
                checkpoint = trainer.save()
            if cfg.sample_every and step % cfg.sample_every == 0 and step != cfg.steps:
                write_samples(trainer, run_dir / "samples" / f"step_{step:06d}")
    finally:
        bar.close()
        logger.close()
    elapsed = time.perf_counter() - start
    samples = write_samples(trainer, run_dir / "samples" / f"step_{trainer.step:06d}")
    if not runtime.is_main:
        return {}
    curve = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    done = trainer.step - first_step
    return {"step": trainer.step} | last | {"run_dir": str(run_dir), "steps_trained": done, "steps_per_s": done / elapsed if done else None,
                   "checkpoint": str(checkpoint) if checkpoint else None, "metrics": str(logger.path),
                   "loss_curve": str(curve) if curve else None, "samples": [str(p) for p in samples]}


def format_summary(result: dict[str, Any]) -> str:
    """A few lines for a person at the end of `dsv train`: what was trained, how fast, and where it is."""
    trained = result["steps_trained"]
    speed = f" in {trained / result['steps_per_s']:.1f} s ({result['steps_per_s']:.3g} steps/s)" if trained else ""
    head = f"trained {trained} step{'' if trained == 1 else 's'}{speed}, to step {result['step']}"
    if "loss" in result:
        head += f"; final loss {result['loss']:.4f}"
    if "val_loss" in result:
        head += f", validation loss {result['val_loss']:.4f}"
    rows = [("checkpoint", result["checkpoint"]), ("metrics", result["metrics"]), ("loss curve", result["loss_curve"]),
            ("samples", ", ".join(result["samples"]))]
    return "\n".join([head] + [f"  {name:<11} {value}" for name, value in rows if value])
