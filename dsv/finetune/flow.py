"""The flow-matching objective of a diffusers flow model, as its scheduler defines it.

    schedule = FlowSchedule.from_config(FlowConfig(scheduler="Wan2.1-T2V-1.3B-Diffusers/scheduler"))
    sigma = schedule.sample_sigmas(u)                 # u (B,) in (0, 1) -> shifted noise levels (B,)
    x_t, target = noised(x0, noise, sigma)            # x_t = (1 - sigma) x0 + sigma noise, target = noise - x0
    prediction = transformer(x_t, timestep=schedule.timesteps(sigma), ...)

What is implemented: FlowMatchEulerDiscreteScheduler (and UniPCMultistepScheduler with
use_flow_sigmas and prediction_type "flow_prediction", what Wan2.1's diffusers checkpoints
ship) noise by `scale_noise`, x_t = sigma * noise + (1 - sigma) * x0, with the static shift of
`set_timesteps`, sigma = shift * u / (1 + (shift - 1) * u), and step with x_{sigma'} = x_t +
(sigma' - sigma) * v: so the model's output v is d x_t / d sigma = noise - x0, the target here,
and the timestep it is called with is sigma * num_train_timesteps (in [0, 1000) for Wan). u is
drawn continuously (logit-normal, SD3's default weighting, or uniform), not rounded to the
scheduler's 1000 training sigmas; the loss is the unweighted mean squared error in fp32.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from torchkit.cli import UsageError

SCHEDULER_CONFIG = "scheduler_config.json"
UNSUPPORTED = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
               "use_exponential_sigmas", "use_beta_sigmas")  # FlowMatchEulerDiscreteScheduler options not modelled


@dataclass(kw_only=True)
class FlowConfig:
    scheduler: str = field(default="", metadata={
        "help": "the model's scheduler directory (or its scheduler_config.json): shift and num_train_timesteps "
                "are read from it; '' = --flow.shift (default 1) and 1000 timesteps"})
    shift: float | None = field(default=None, metadata={
        "help": "timestep shift (Wan2.1: 3.0 at 480p, 5.0 at 720p); none = the scheduler's"})
    timesteps: Literal["logit_normal", "uniform"] = field(default="logit_normal", metadata={
        "help": "density of u before the shift: sigmoid(N(logit_mean, logit_std)) or uniform on (0, 1)"})
    logit_mean: float = field(default=0.0, metadata={"help": "mean of the logit-normal density"})
    logit_std: float = field(default=1.0, metadata={"help": "standard deviation of the logit-normal density"})

    def validate(self) -> "FlowConfig":
        if self.shift is not None and not self.shift > 0:
            raise UsageError(f"--flow.shift {self.shift}: must be > 0")
        if not self.logit_std > 0:
            raise UsageError(f"--flow.logit-std {self.logit_std}: must be > 0")
        return self


@dataclass(frozen=True, kw_only=True)
class FlowSchedule:
    shift: float
    num_train_timesteps: int
    timesteps_density: str
    logit_mean: float
    logit_std: float

    @classmethod
    def from_config(cls, cfg: FlowConfig) -> "FlowSchedule":
        shift, steps = 1.0, 1000
        if cfg.scheduler:
            shift, steps = read_scheduler(Path(cfg.scheduler))
        return cls(shift=cfg.shift if cfg.shift is not None else shift, num_train_timesteps=steps,
                   timesteps_density=cfg.timesteps, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)

    def draw_u(self, n: int, *, generator: torch.Generator, device: torch.device) -> Tensor:
        """u (n,) in (0, 1) from the configured density."""
        if self.timesteps_density == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))

    def sample_sigmas(self, u: Tensor) -> Tensor:
        """FlowMatchEulerDiscreteScheduler's static shift of u (B,)."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def timesteps(self, sigma: Tensor) -> Tensor:
        """The timestep the transformer takes at noise level sigma (B,)."""
        return sigma * self.num_train_timesteps


def read_scheduler(path: Path) -> tuple[float, int]:
    """(shift, num_train_timesteps) of a flow-matching scheduler's config; UsageError for others."""
    file = path / SCHEDULER_CONFIG if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--flow.scheduler {path}: no readable {SCHEDULER_CONFIG} ({type(e).__name__})") from e
    name = config.get("_class_name", "")
    if name == "FlowMatchEulerDiscreteScheduler":
        used = [key for key in UNSUPPORTED if config.get(key)]
        if used:
            raise UsageError(f"--flow.scheduler {path}: {name} with {used[0]} is not implemented; "
                             "give the static shift with --flow.shift")
        return float(config.get("shift", 1.0)), int(config.get("num_train_timesteps", 1000))
    if config.get("use_flow_sigmas") and config.get("prediction_type") == "flow_prediction":
        return float(config.get("flow_shift", 1.0)), int(config.get("num_train_timesteps", 1000))
    raise UsageError(f"--flow.scheduler {path}: {name or 'this scheduler'} is not a flow-matching scheduler "
                     "(FlowMatchEulerDiscreteScheduler, or one with use_flow_sigmas and flow_prediction)")


def noised(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, target) for latents x0 (B, ...), noise like x0 and sigma (B,): scale_noise and v = noise - x0."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return s * noise + (1 - s) * x0, noise - x0
