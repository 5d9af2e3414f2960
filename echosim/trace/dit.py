"""The first workload: one training step of dsv's video DiT, sharded with FSDP2.

Every rank of a pure-FSDP job does the same work on a different batch, so one role covers the
whole world. Attention is dense (SDPA) or modelled block-sparse at a given density
(echosim.trace.flops.ModelledSparseAttention).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dsv.models.dit import DIT_PRESETS, VideoDiT
from echosim.trace.flops import ModelledSparseAttention

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(kw_only=True)
class DiTWorkload:
    preset: str = field(default="tiny", metadata={"help": f"DiT preset: {', '.join(DIT_PRESETS)}"})
    frames: int = field(default=8, metadata={"help": "video frames per sample"})
    height: int = field(default=32, metadata={"help": "video height in pixels (or latent rows)"})
    width: int = field(default=32, metadata={"help": "video width in pixels (or latent columns)"})
    batch: int = field(default=1, metadata={"help": "samples per rank"})
    dtype: str = field(default="bfloat16", metadata={"help": f"parameter/compute dtype: {', '.join(DTYPES)}"})
    density: float = field(default=1.0, metadata={
        "help": "fraction of key blocks attention computes: 1 = dense SDPA, < 1 = modelled block-sparse"})

    def mesh_shape(self, world_size: int) -> dict[str, int]:
        return {"dp": world_size}

    def roles(self, world_size: int) -> list[list[int]]:
        """Ranks with identical work: every FSDP rank does the same."""
        return [list(range(world_size))]

    def make_step(self, mesh: DeviceMesh) -> Callable[[], None]:
        """Build the sharded model and optimizer on the mesh; return one training step."""
        cfg = DIT_PRESETS[self.preset]()
        model = VideoDiT(cfg)
        if self.density < 1.0:
            model.set_attention(ModelledSparseAttention(self.density))
        dtype = DTYPES[self.dtype]
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

        return step
