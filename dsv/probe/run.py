"""Load a checkpoint, noise a batch of its run's data at each t, and measure every layer's attention.

    loaded = load_checkpoint_for_probe(resolve_checkpoint(Path("runs/demo"), None), device, ema=False)
    videos, labels = probe_batch(loaded.config, batch=2)
    result = probe(loaded, videos, labels, ts=(0.1, 0.5, 0.9), axes=axes, seed=0, device=device)

The batch is the run's held-out clips (`validation_batches`: fixed by the data seed, never trained
on), noised at each t by the trainer's flow-matching rule x_t = (1 - t) x0 + t noise with one seeded
noise for every t. The model runs under the run's precision (bf16 autocast on CUDA by default)
with `ProbeAttention`, which measures each layer's q, k -- post-RoPE, exactly what attention sees --
head by head (dsv/probe/coverage.py) and then attends densely; on a partial token grid over the
real tokens only (padding keys carry no mass, padding query rows are not counted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import torch
from torch import Tensor, nn

from dsv.checkpoint import CheckpointError, checkpoint_name, find_checkpoint
from dsv.data import DataConfig, validation_batches
from dsv.flow import interpolate
from dsv.models.attention import DenseAttention, dense_attention
from dsv.models.dit import DiTConfig, VideoDiT
from dsv.ops.layout import CubePadding
from dsv.probe.coverage import HeadCoverage, ProbeAxes, head_coverage
from dsv.sparse.predictor import LowRankPredictor
from dsv.train_state import clean_name
from torchkit.cli import UsageError
from torchkit.config_cli import config_from_dict


@dataclass(kw_only=True)
class LoadedCheckpoint:
    path: Path
    step: int
    config: dict  # the run's TrainConfig as a dict
    model: VideoDiT
    predictors: nn.ModuleList | None  # one LowRankPredictor per layer, None for a dense run
    weights: str  # "raw" or "ema"


@dataclass(kw_only=True)
class ProbeResult:
    """Means over the batch: key (t, L, H, tau), units and recall (t, L, H, tau, g); recall None without
    predictors. meta: what was probed (checkpoint, step, tokens, axes, ...)."""

    key: Tensor
    units: Tensor
    recall: Tensor | None
    meta: dict = field(default_factory=dict)


def resolve_checkpoint(target: Path, step: int | None) -> Path:
    """A run directory (its latest checkpoint, or --ckpt STEP) or a single-file checkpoint."""
    if target.is_file():
        if step is not None:
            raise UsageError(f"--ckpt {step} picks a step of a run directory, but {target} is a checkpoint file: "
                             "drop --ckpt or pass the run directory")
        return target
    if (target / "meta.pt").exists():
        path = target
    elif not (target / "ckpt").is_dir():
        raise FileNotFoundError(f"{target}: not a checkpoint file nor a run directory with a ckpt/ folder")
    elif step is None:
        path = find_checkpoint("auto", target)
    else:
        path = target / "ckpt" / checkpoint_name(step, distributed=False)
        sharded = target / "ckpt" / checkpoint_name(step, distributed=True)
        if not (path.exists() or sharded.exists()):
            held = sorted(p.name for p in (target / "ckpt").iterdir() if p.name.startswith("step_"))
            raise FileNotFoundError(f"--ckpt {step}: {path} does not exist; {target / 'ckpt'} holds "
                                    f"{held or 'nothing'}")
        path = path if path.exists() else sharded
    if path.is_dir():
        raise CheckpointError(f"{path} is a sharded FSDP checkpoint: convert it with "
                              "`python -m torch.distributed.checkpoint.format_utils dcp_to_torch` first")
    return path


def load_predictors(sparse_state: dict | None, sparse_cfg: dict, model_cfg: DiTConfig) -> nn.ModuleList | None:
    """The checkpoint's DSV predictors (meta["sparse"]["predictors"]), or None for a dense run."""
    if not sparse_state:
        return None
    head_dim = model_cfg.head_dim if sparse_cfg.get("predictor_rope", False) else None  # older runs: no rotation
    predictors = nn.ModuleList(LowRankPredictor(model_cfg.hidden, model_cfg.heads, sparse_cfg["rank"], head_dim)
                               for _ in range(model_cfg.depth))
    predictors.load_state_dict(sparse_state["predictors"])
    return predictors


def load_checkpoint_for_probe(path: Path, device: torch.device, *, ema: bool) -> LoadedCheckpoint:
    """The model (raw weights, or the EMA) and predictors of a single-file checkpoint, on `device`."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: optimizer state stays on disk
        meta, state = blob["meta"], blob["state"]
        config = meta["config"]
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a dsv checkpoint: {type(e).__name__}: {e}") from e
    model = VideoDiT(config_from_dict(DiTConfig, config["model"]))
    model.load_state_dict({clean_name(name): value for name, value in state["ema" if ema else "model"].items()})
    predictors = load_predictors(meta.get("sparse"), config.get("sparse", {}), model.cfg)
    return LoadedCheckpoint(path=path, step=meta["step"], config=config, model=model.to(device).eval(),
                            predictors=None if predictors is None else predictors.to(device).eval(),
                            weights="ema" if ema else "raw")


def probe_batch(config: dict, batch: int) -> tuple[Tensor, Tensor]:
    """`batch` held-out clips of the run's dataset: videos (B, C, T, H, W), labels (B,)."""
    if batch < 1:
        raise UsageError(f"--batch {batch}: must be >= 1")
    return validation_batches(config_from_dict(DataConfig, config["data"]), batch, 1)[0]


class ProbeAttention:
    """Attention backend: measures every head of a layer with `head_coverage`, then dense SDPA."""

    def __init__(self, axes: ProbeAxes, predictors: nn.ModuleList | None = None):
        self.axes, self.predictors = axes, predictors
        self.measured: dict[int, list[HeadCoverage]] = {}  # layer -> B * H heads, sample-major

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None, padding: CubePadding | None = None) -> Tensor:
        """q, k, v (B, H, S, D) in cube order; padding those of a partial grid; returns (B, H, S, D)."""
        heads = [(i, j) for i in range(q.shape[0]) for j in range(q.shape[1])]
        real = None if padding is None else padding.tokens(q.device)  # (S,) bool
        if self.predictors is None:
            self.measured[layer] = [head_coverage(q[i, j], k[i, j], self.axes, real=real) for i, j in heads]
        else:
            q_lr, k_lr = self.predictors[layer](attn_input, rope)  # each (B, H, S, r)
            self.measured[layer] = [head_coverage(q[i, j], k[i, j], self.axes, q_lr[i, j], k_lr[i, j], real)
                                    for i, j in heads]
        return dense_attention(q, k, v, padding)

    def result(self, samples: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Means over the batch: key (L, H, tau), units (L, H, tau, g), recall like units or None."""
        def mean(name: str) -> Tensor:
            return torch.stack([torch.stack([getattr(head, name) for head in self.measured[layer]])
                                .unflatten(0, (samples, -1)).mean(0) for layer in sorted(self.measured)])

        return mean("key"), mean("units"), None if self.predictors is None else mean("recall")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The trainer's rule: bf16 autocast for precision bf16, or auto on CUDA; else fp32."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None


@torch.no_grad()
def probe(loaded: LoadedCheckpoint, videos: Tensor, labels: Tensor, *, ts: tuple[float, ...], axes: ProbeAxes,
          seed: int, device: torch.device) -> ProbeResult:
    """Measure the attention of `loaded` on videos (B, C, T, H, W) noised at each t in `ts`."""
    if not ts or not all(0.0 <= t <= 1.0 for t in ts):
        raise UsageError(f"--t {list(ts)}: every noise level must be in [0, 1]")
    model, cfg = loaded.model, loaded.model.cfg
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(seed))  # on CPU: alike on every device
    cond = labels.to(device) if cfg.num_classes else None
    dtype = autocast_dtype(loaded.config.get("precision", "auto"), device)
    parts = []
    for t in ts:
        times = torch.full((videos.shape[0],), t)
        x_t, _ = interpolate(videos, noise, times)
        backend = ProbeAttention(axes, loaded.predictors)
        model.set_attention(backend)
        try:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(x_t.to(device), times.to(device), cond)
        finally:
            model.set_attention(DenseAttention())
        parts.append(backend.result(videos.shape[0]))
    key, units, recall = (None if parts[0][i] is None else torch.stack([p[i] for p in parts]) for i in range(3))
    grid = cfg.check_input(*videos.shape[2:])
    meta = dict(checkpoint=str(loaded.path), step=loaded.step, weights=loaded.weights, batch=videos.shape[0],
                seed=seed, tokens=prod(grid), grid=list(grid), cube=list(cfg.cube), layers=cfg.depth, heads=cfg.heads,
                precision="bf16" if dtype is not None else "fp32", predictor=loaded.predictors is not None,
                predictor_mass=axes.predictor_mass, query_block=axes.query_block, t=list(ts), tau=list(axes.taus),
                granularity=list(axes.grains))
    return ProbeResult(key=key, units=units, recall=recall, meta=meta)
