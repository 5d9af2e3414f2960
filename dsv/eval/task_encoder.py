"""A small 3D conv net trained on a run's own training clips: the feature space of `dsv eval` without I3D.

    encoder = cached_task_encoder(data_cfg, TaskEncoderConfig(), cache_dir=run / "eval", device=device)
    features = encoder.encode(videos)             # videos (N, C, T, H, W) in [-1, 1] -> (N, 8 * width)
    task_encoder_label(data_cfg)                  # "task-encoder (trained on digits 16x256x256x1, not comparable ...)"

Objective, on the pooled features: the clip's class (when the dataset has more than one) plus whether its
frames are in order (half of every batch has its frames shuffled by a random non-identity permutation,
so that the features see motion, not only appearance; clips of fewer than 3 frames skip this). Clips are
area-resized to `size` x `size`. AdamW trains it for `steps` batches of the run's *training* clips: the
held-out clips an FD compares with come from the validation seed, which no run trains on.

Deterministic by seed: the initialisation, the batches and the shuffles follow `seed` (not the run's
seed, so that the runs of one task share an encoder), and cuDNN uses deterministic algorithms while
it trains. Cached as <cache_dir>/task_encoder_<key>.pt, key = a hash of the data and encoder configs.
Its features are only comparable between runs on the same task, hence the label.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.data import DataConfig, build_dataset
from dsv.data.stream import StepBatches
from torchkit.config_cli import config_to_dict

MIN_ORDER_FRAMES = 3  # with 2 frames the only shuffle is the reversal, which moving digits make plausible


@dataclass(kw_only=True)
class TaskEncoderConfig:
    steps: int = field(default=300, metadata={"help": "training batches of the task encoder"})
    batch_size: int = field(default=16, metadata={"help": "clips per training batch"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate"})
    size: int = field(default=64, metadata={"help": "frames are area-resized to size x size"})
    width: int = field(default=32, metadata={"help": "channels of the first conv; features are 8 x width"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, batches and shuffles"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"task encoder {name}={getattr(self, name)}: must be >= 1")
        if self.width < 8 or self.width % 8:
            raise ValueError(f"task encoder width={self.width}: must be a multiple of 8 (GroupNorm of 8 groups)")


def task_encoder_label(data: DataConfig) -> str:
    """What every table and JSON calls this feature space."""
    where = f" at {data.path}" if data.dataset == "folder" else ""
    shape = f"{data.frames}x{data.height}x{data.width}x{data.channels}"
    return f"task-encoder (trained on {data.dataset}{where} {shape}, not comparable across tasks)"


def _conv_block(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class TaskEncoder(nn.Module):
    def __init__(self, channels: int, classes: int, cfg: TaskEncoderConfig):
        super().__init__()
        w, self.size = cfg.width, cfg.size
        self.trunk = nn.Sequential(_conv_block(channels, w, (1, 2, 2)), _conv_block(w, 2 * w, (2, 2, 2)),
                                   _conv_block(2 * w, 4 * w, (2, 2, 2)), _conv_block(4 * w, 8 * w, (2, 2, 2)))
        self.class_head = nn.Linear(8 * w, classes) if classes > 1 else None
        self.order_head = nn.Linear(8 * w, 2)

    def forward(self, videos: Tensor) -> Tensor:
        """videos (N, C, T, H, W) -> features (N, 8w)."""
        x = F.interpolate(videos.float(), size=(videos.shape[2], self.size, self.size), mode="area")  # (N, C, T, s, s)
        return self.trunk(x).mean((2, 3, 4))  # (N, 8w, T/8, s/16, s/16) -> (N, 8w)

    @torch.no_grad()
    def encode(self, videos: Tensor) -> Tensor:
        return self(videos.to(next(self.parameters()).device))


def shuffle_half(videos: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Shuffle the frames of the second half of videos (B, C, T, H, W), each by a random non-identity
    permutation; returns them and the targets (B,): 1 = in order, 0 = shuffled."""
    b, t = videos.shape[0], videos.shape[2]
    in_order = torch.ones(b, dtype=torch.long)
    out = videos.clone()
    for i in range(b // 2, b):
        perm = torch.randperm(t, generator=gen)
        while torch.equal(perm, torch.arange(t)):
            perm = torch.randperm(t, generator=gen)
        out[i] = videos[i][:, perm]
        in_order[i] = 0
    return out, in_order


@contextmanager
def _deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def train_task_encoder(data: DataConfig, cfg: TaskEncoderConfig, device: torch.device) -> TaskEncoder:
    """A TaskEncoder trained on `data`'s training clips (see the module docstring), in eval mode."""
    dataset = build_dataset(data)
    batches = StepBatches(dataset, cfg.batch_size, rank=0, world_size=1, seed=data.seed + cfg.seed)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays as it was
        torch.manual_seed(cfg.seed)
        net = TaskEncoder(data.channels, dataset.num_classes, cfg)
    net.to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    with _deterministic_cudnn():
        for step in range(cfg.steps):
            videos, labels = batches[step]
            losses = []
            if data.frames >= MIN_ORDER_FRAMES:
                videos, in_order = shuffle_half(videos, gen)
            features = net(videos.to(device))
            if data.frames >= MIN_ORDER_FRAMES:
                losses.append(F.cross_entropy(net.order_head(features), in_order.to(device)))
            if net.class_head is not None:
                losses.append(F.cross_entropy(net.class_head(features), labels.to(device)))
            if not losses:
                raise ValueError(f"the task encoder has nothing to learn from {data.dataset} clips of {data.frames} "
                                 f"frames in one class: use the I3D (--i3d-weights) instead")
            optimizer.zero_grad(set_to_none=True)
            sum(losses).backward()
            optimizer.step()
    return net.eval()


def cache_key(data: DataConfig, cfg: TaskEncoderConfig) -> str:
    """Hash of what the encoder depends on (the data config but its loader workers, and cfg)."""
    described = {"data": {k: v for k, v in config_to_dict(data).items() if k != "num_workers"},
                 "encoder": config_to_dict(cfg)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]


def cached_task_encoder(data: DataConfig, cfg: TaskEncoderConfig, cache_dir: Path,
                        device: torch.device) -> tuple[TaskEncoder, Path]:
    """The encoder for (data, cfg) from cache_dir, trained and saved there first if it is not; and its file."""
    path = cache_dir / f"task_encoder_{cache_key(data, cfg)}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = TaskEncoder(data.channels, blob["classes"], cfg)
        net.load_state_dict(blob["state"])
        return net.to(device).eval(), path
    net = train_task_encoder(data, cfg, device)
    classes = 0 if net.class_head is None else net.class_head.out_features
    blob = {"state": {k: v.cpu() for k, v in net.state_dict().items()}, "classes": classes,
            "data": config_to_dict(data), "encoder": dataclasses.asdict(cfg)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)
    return net, path
