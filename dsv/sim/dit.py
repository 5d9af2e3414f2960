"""dsv's video DiT as an echosim workload: one training step sharded with FSDP2 and, optionally,
dsv's hybrid context parallelism (dsv.parallel: heads over `cp_heads` ranks x sequence over
`cp_seq` ranks, dp = world / (cp_heads * cp_seq)).

    echosim simulate --preset tiny --fsdp 8 --cp-heads 2 --cp-seq 2 --out runs/echosim/tiny8_cp4

echosim finds it as the entry point `dit` of the group echosim.workloads (pyproject.toml), or by
its path `dsv.sim.dit:DiTWorkload` where the project is not installed (echosim.trace.workloads).
Every rank of a pure-FSDP job does the same work on a different batch, so one role covers the
whole world; under context parallelism ranks whose head rank owns the same number of heads do
the same work. Attention is dense (SDPA) or modelled block-sparse at a given density
(echosim.trace.flops.modelled_sparse_attention; on CUDA dsv's kernel, dsv.sim.kernels). On a
partial token grid (a video size not a multiple of the cube) the modelled attention costs the
padded sequence: the padding tokens are computed like real ones, as dsv's kernels compute their tiles.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import dsv.sim.kernels  # noqa: F401 - registers dsv's kernel for the modelled sparse attention on CUDA
from dsv.models.dit import DIT_PRESETS, VideoDiT
from dsv.ops.layout import CubePadding
from dsv.parallel.head_parallel import assign_heads, check_heads_fit
from dsv.parallel.hybrid import ContextParallelAttention
from dsv.parallel.mesh import build_parallel_mesh
from dsv.parallel.parallelize import parallelize
from dsv.parallel.runtime import Runtime
from echosim.trace.flops import modelled_sparse_attention
from torchkit.cli import UsageError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelledSparseAttention:
    """An attention backend (dsv.models.attention) whose every layer keeps `density` of its blocks."""

    def __init__(self, density: float):
        self.density = density

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None, padding: CubePadding | None = None) -> Tensor:
        return modelled_sparse_attention(q, k, v, self.density)  # padding: costed as real tokens


def modelled_local_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *,
                             density: float) -> Tensor:
    """ContextParallelAttention's local attention at `density`; a partial grid's key mask is costed
    as computed (the padded sequence)."""
    return modelled_sparse_attention(q, k, v, density)


@dataclass(kw_only=True)
class DiTWorkload:
    """One training step of dsv's DiT on a world of `--fsdp` ranks; the fields are the command's flags."""

    name: ClassVar[str] = "dit"  # the trace's meta["workload"]
    preset: str = field(default="tiny", metadata={"help": f"DiT preset: {', '.join(DIT_PRESETS)}"})
    frames: int = field(default=8, metadata={"help": "video frames per sample"})
    height: int = field(default=32, metadata={"help": "video height in pixels (or latent rows)"})
    width: int = field(default=32, metadata={"help": "video width in pixels (or latent columns)"})
    batch: int = field(default=1, metadata={"help": "samples per rank"})
    dtype: str = field(default="bfloat16", metadata={"help": f"parameter/compute dtype: {', '.join(DTYPES)}"})
    density: float = field(default=1.0, metadata={
        "help": "fraction of key blocks attention computes: 1 = dense SDPA, < 1 = modelled block-sparse"})
    cp_heads: int = field(default=1, metadata={"help": "context parallelism: ranks that split the heads (all-to-all)"})
    cp_seq: int = field(default=1, metadata={"help": "context parallelism: ranks that split the sequence (KV gather)"})

    @property
    def cp(self) -> int:
        return self.cp_heads * self.cp_seq

    def check(self) -> None:
        """A UsageError naming the flag whose value this workload cannot run (echosim's CLI calls it)."""
        for flag, value, choices in (("preset", self.preset, DIT_PRESETS), ("dtype", self.dtype, DTYPES)):
            if value not in choices:
                raise UsageError(f"--{flag} {value!r} is not one of {', '.join(choices)}")
        if not 0 < self.density <= 1:
            raise UsageError(f"--density must be in (0, 1] (fraction of key blocks computed), got {self.density}")

    def mesh_shape(self, world_size: int) -> dict[str, int]:
        """{"dp": world} without context parallelism, else dsv's (dp, seq, heads) grid, heads innermost."""
        if self.cp_heads < 1 or self.cp_seq < 1:
            raise ValueError(f"--cp-heads {self.cp_heads} and --cp-seq {self.cp_seq} must be >= 1")
        if world_size % self.cp:
            raise ValueError(f"--fsdp {world_size} ranks do not split into context-parallel groups of "
                             f"--cp-heads x --cp-seq = {self.cp_heads} x {self.cp_seq} = {self.cp}; "
                             f"use a world size that is a multiple of {self.cp}")
        if self.cp == 1:
            return {"dp": world_size}
        check_heads_fit(DIT_PRESETS[self.preset]().heads, self.cp_heads)
        return {"dp": world_size // self.cp, "seq": self.cp_seq, "heads": self.cp_heads}

    def runs_on(self, world_size: int) -> bool:
        """Whether `world_size` ranks split into context-parallel groups."""
        return world_size % self.cp == 0

    def label(self) -> str:
        """Short name of the configuration, e.g. "1.3B 16x64x64 b1 d0.2 cp2x1"."""
        text = f"{self.preset} {self.frames}x{self.height}x{self.width} b{self.batch}"
        text += f" d{self.density:g}" if self.density < 1 else ""
        return text + (f" cp{self.cp_heads}x{self.cp_seq}" if self.cp > 1 else "")

    def head_counts(self) -> list[int]:
        """Heads per head rank, as ContextParallelAttention assigns them without costs: even when
        they divide, else greedy LPT on equal costs."""
        heads = DIT_PRESETS[self.preset]().heads
        return assign_heads([1.0] * heads, self.cp_heads).counts

    def roles(self, world_size: int) -> list[list[int]]:
        """Ranks with identical work: all of them, unless the head group splits the heads
        unevenly; then one role per number of heads owned (head rank = rank % cp_heads)."""
        self.mesh_shape(world_size)
        counts = self.head_counts()
        by_count: dict[int, list[int]] = {}
        for rank in range(world_size):
            by_count.setdefault(counts[rank % self.cp_heads], []).append(rank)
        return list(by_count.values())

    def make_step(self, mesh: DeviceMesh) -> Callable[[], None]:
        """Build the sharded model and optimizer on the mesh; return one training step. Under
        context parallelism the step carries `meshes`, dsv's meshes, so its groups get names."""
        cfg = DIT_PRESETS[self.preset]()
        with torch.device(mesh.device_type):  # initialise where the step runs: seconds, not a minute, for 2.7B
            model = VideoDiT(cfg)
        if self.density < 1.0:
            model.set_attention(ModelledSparseAttention(self.density))
        dtype = DTYPES[self.dtype]
        meshes = ()
        if self.cp > 1:
            with unset_fake_temporarily():  # a DeviceMesh holds a real tensor of ranks
                pmesh = build_parallel_mesh(mesh.device_type, mesh.size(), cp_heads=self.cp_heads,
                                            cp_seq=self.cp_seq)
            runtime = Runtime(rank=dist.get_rank(), world_size=mesh.size(), local_rank=0,
                              device=torch.device(mesh.device_type))
            # a modelled selection has no block lists, so the sequence group all-gathers K and V in
            # full (dsv's dense exchange): the communication is an upper bound of the sparse fetch
            local = (F.scaled_dot_product_attention if self.density >= 1.0 else
                     partial(modelled_local_attention, density=self.density))
            attention = ContextParallelAttention(pmesh, heads=cfg.heads, dense_attention=local)
            parallelize(model, runtime, activation_checkpointing=False, compile=False, param_dtype=dtype,
                        mesh=pmesh, cp_attention=attention)
            meshes = (pmesh.device_mesh, pmesh.fsdp_mesh)
        else:
            policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            for block in model.blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        device = mesh.device_type
        video = torch.randn(self.batch, cfg.in_channels, self.frames, self.height, self.width, device=device)
        labels = torch.zeros(self.batch, dtype=torch.long, device=device) if cfg.num_classes else None

        def step() -> None:
            t = torch.rand(self.batch, device=device)
            noise = torch.randn_like(video)
            noisy = (1 - t.view(-1, 1, 1, 1, 1)) * video + t.view(-1, 1, 1, 1, 1) * noise
            loss = F.mse_loss(model(noisy, t, labels).float(), noise - video)  # flow-matching velocity
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step.meshes = meshes
        return step
