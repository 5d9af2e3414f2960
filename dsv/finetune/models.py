"""The diffusers transformers `dsv finetune` trains: loaded by their config's _class_name, called
the way their pipeline calls them, with optional LoRA adapters.

    model, family = load_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer")
    v = family.predict(model, x_t, timestep, text)      # (B, C, T', H', W'), like x_t
    add_lora(model, rank=16, seed=0)                     # peft adapters; every other weight frozen
    merge_lora(model)                                    # W += scale * B @ A, adapters removed: plain diffusers

Only flow-matching models are trained: Wan. CogVideoX's scheduler (CogVideoXDDIMScheduler) is
v-prediction on a DDPM schedule, another objective, so it is refused by name.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from torch import Tensor, nn

from torchkit.cli import UsageError

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections of attn1 and attn2


def _wan_predict(model: nn.Module, x_t: Tensor, timestep: Tensor, text: Tensor) -> Tensor:
    return model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]


@dataclass(frozen=True, kw_only=True)
class Family:
    """How one diffusers transformer class is trained."""

    cls: type
    blocks: str  # the ModuleList of transformer blocks (one FSDP unit each)
    text_dim: str  # the config field of the text embedding width
    predict: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


FAMILIES = {"WanTransformer3DModel": Family(cls=WanTransformer3DModel, blocks="blocks", text_dim="text_dim",
                                            predict=_wan_predict)}
REFUSED = {"CogVideoXTransformer3DModel": "its scheduler (CogVideoXDDIMScheduler) is v-prediction, not flow matching"}


def load_transformer(path: str) -> tuple[nn.Module, Family]:
    """The fp32 transformer of a local diffusers directory, its class from config.json's _class_name."""
    folder = Path(path)
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise UsageError(f"--diffusers {folder}: no readable config.json ({type(e).__name__}); point it at a "
                         "transformer directory written by save_pretrained (e.g. <model>/transformer)") from e
    if name not in FAMILIES:
        why = f": {REFUSED[name]}" if name in REFUSED else ""
        raise UsageError(f"--diffusers {folder}: {name or 'no _class_name'} cannot be fine-tuned here{why}; "
                         f"supported: {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    try:
        model = family.cls.from_pretrained(str(folder), torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise UsageError(f"--diffusers {folder}: {name}.from_pretrained failed: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    return model, family


def add_lora(model: nn.Module, rank: int, seed: int) -> None:
    """LoRA of `rank` (alpha = rank, so scale 1) on LORA_TARGETS through diffusers' add_adapter
    (peft's inject_adapter_in_model); B starts at zero, so the model starts unchanged. Only the
    adapters train. A is drawn from `seed` (the global RNG is left as it was)."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def merge_lora(model: nn.Module) -> None:
    """Fold the adapters into the weights they adapt and remove them (diffusers' fuse_lora, unload_lora)."""
    model.fuse_lora()
    model.unload_lora()
