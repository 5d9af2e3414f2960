"""echosim's held-out validation workloads: models from other codebases, as their users train them.

    from benchmarks.heldout_workloads import HeldOut, VALIDATION
    step = HeldOut(model="gpt2-124m", parallel="fsdp2").make_step(mesh)

None of these is used to fit anything in echosim (benchmarks/echosim_heldout.py keeps the
calibration set apart). Each is one ordinary training step: forward with the model's own loss,
backward, AdamW (foreach), zero_grad.

- `transformers` GPT-2 (124M, 355M, 774M) and Llama-style decoders (GQA, SwiGLU, RoPE: 160M, 1.1B),
  causal LM on random token ids; `transformers` ViT-B/16 and ViT-L/16 classifying random 224x224
  images (timm needs torchvision, which does not install beside the CPU torch CI pins);
  dsv's own video DiT (presets S and B on 16 x 32 x 32 latents: not the 1.3B shape the GPU
  profile's kernel database was traced on).
- `ddp`: fp32 weights in DistributedDataParallel, the step under bf16 autocast.
- `fsdp2`: every block fully_shard-ed, then the model; bf16 parameters, fp32 gradient reduction.
- Models are built as their users build them: `Model(config).to(device)`.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

# name -> (family, config fields, batch, sequence length or image size)
MODELS: dict[str, tuple[str, dict, int, int]] = {
    "gpt2-124m": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12), 8, 1024),
    "gpt2-355m": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16), 8, 1024),
    "gpt2-774m": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20), 4, 1024),
    "llama-160m": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                 num_attention_heads=12, num_key_value_heads=4), 4, 2048),
    "llama-1.1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4), 2, 2048),
    "vit-b16": ("vit", dict(), 64, 224),
    "vit-l16": ("vit", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096), 32, 224),
    "dit-s": ("dit", dict(preset="S"), 4, 32),
    "dit-b": ("dit", dict(preset="B"), 2, 32),
}
TINY: dict[str, dict] = {  # CPU-test sizes of each family (the tests trace these)
    "gpt2": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128),
    "vit": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                image_size=32, patch_size=8),
    "dit": dict(preset="tiny"),
}
PARALLEL = ("ddp", "fsdp2")
VALIDATION = [(model, parallel) for model in MODELS for parallel in PARALLEL]
DIT_FRAMES = 16


def _build(family: str, fields: dict) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """The model (on the current default device) and its blocks, the units FSDP2 shards."""
    if family == "dit":
        from dsv.models.dit import DIT_PRESETS, VideoDiT

        model = VideoDiT(DIT_PRESETS[fields["preset"]]())
        return model, list(model.blocks)
    import transformers

    transformers.logging.set_verbosity_error()
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields))
        return model, list(model.transformer.h)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
        return model, list(model.model.layers)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000, **fields))
    return model, list(model.vit.layers)


@dataclass(kw_only=True)
class HeldOut:
    """One held-out configuration as an echosim workload (echosim.trace.workloads.Workload)."""

    name: ClassVar[str] = "heldout"
    model: str = "gpt2-124m"  # a key of MODELS
    parallel: str = "fsdp2"  # ddp or fsdp2
    tiny: bool = False  # TINY's size of the model's family (tests)

    def mesh_shape(self, world_size: int) -> dict[str, int]:
        return {"dp": world_size}

    def roles(self, world_size: int) -> list[list[int]]:
        return [list(range(world_size))]  # data parallel: every rank does the same work

    def runs_on(self, world_size: int) -> bool:
        return True

    def label(self) -> str:
        return f"{self.model} {self.parallel}" + (" tiny" if self.tiny else "")

    def make_step(self, mesh: DeviceMesh) -> Callable[[], None]:
        """Build, wrap and return one training step on the mesh's device."""
        family, fields, batch, size = MODELS[self.model]
        if self.tiny:
            fields, batch, size = TINY[family], 2, (16 if family != "vit" else TINY["vit"]["image_size"])
        device = mesh.device_type
        torch.manual_seed(0)
        model, blocks = _build(family, fields)
        model = model.to(device)
        autocast = nullcontext
        if self.parallel == "ddp":
            model = DistributedDataParallel(model, process_group=mesh.get_group())
            autocast = lambda: torch.autocast(device, dtype=torch.bfloat16)  # noqa: E731
        else:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        loss_of = _loss(family, fields, model, batch, size, device)

        def step() -> None:
            with autocast():
                loss = loss_of()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step


def _loss(family: str, fields: dict, model: torch.nn.Module, batch: int, size: int,
          device: str) -> Callable[[], torch.Tensor]:
    """The family's training loss on fixed random inputs."""
    if family in ("gpt2", "llama"):
        vocab = fields.get("vocab_size", 50257 if family == "gpt2" else 32000)
        ids = torch.randint(0, vocab, (batch, size), device=device)  # (B, T)
        return lambda: model(input_ids=ids, labels=ids).loss
    if family == "vit":
        images = torch.randn(batch, 3, size, size, device=device)  # (B, 3, H, W)
        labels = torch.randint(0, 1000, (batch,), device=device)
        return lambda: model(pixel_values=images, labels=labels).loss
    cfg = model.module.cfg if isinstance(model, DistributedDataParallel) else model.cfg
    video = torch.randn(batch, cfg.in_channels, DIT_FRAMES if size > 16 else 4, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if cfg.num_classes else None

    def flow_matching() -> torch.Tensor:
        t = torch.rand(batch, device=device).view(-1, 1, 1, 1, 1)
        noise = torch.randn_like(video)
        return F.mse_loss(model((1 - t) * video + t * noise, t.flatten(), labels).float(), noise - video)
    return flow_matching
