"""Model, optimizer and EMA weights as one checkpointable object (works with and without FSDP)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """Parameter name without the prefixes activation checkpointing and compile add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class TrainState(Stateful):
    """EMA weights are fp32 copies of the parameters with the same sharding (DTensors under FSDP)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.ema = {clean_name(n): p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        params = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(list(self.ema.values()), params, 1.0 - decay)

    @torch.no_grad()
    def swap_ema(self) -> None:
        """Exchange live and EMA weights (call twice to restore); used for sampling."""
        for module in self.model.modules():  # FSDP keeps the root unsharded after a no-grad forward
            if isinstance(module, FSDPModule):
                module.reshard()
        for name, p in self.model.named_parameters():
            ema = self.ema[clean_name(name)]
            live = p.detach().clone()
            p.copy_(ema)
            ema.copy_(live)

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd, "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        missing = set(self.ema) - set(state["ema"])
        if missing:
            raise KeyError(f"EMA weights missing for {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in self.ema.items():
                value.copy_(state["ema"][name])
