"""Rectified-flow (flow matching) objective and the Euler sampler with classifier-free guidance.

Convention: x_t = (1 - t) * x0 + t * noise, t in [0, 1]; the model predicts the velocity
v = noise - x0, so integrating dx/dt = v from t = 1 (noise) down to t = 0 gives data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def logit_normal_timesteps(n: int, *, generator: torch.Generator, device: torch.device,
                           mean: float = 0.0, std: float = 1.0) -> Tensor:
    """t = sigmoid(N(mean, std)): more weight on the middle of the path (SD3)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))  # (n,)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Returns (x_t, velocity target) for data x0 (B, ...), noise like x0 and t (B,)."""
    t_ = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t_) * x0 + t_ * noise, noise - x0


def flow_matching_loss(model: nn.Module, x0: Tensor, noise: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
    """Mean squared error between predicted and true velocity (computed in fp32)."""
    x_t, target = interpolate(x0, noise, t)
    prediction = model(x_t, t, labels)
    return F.mse_loss(prediction.float(), target.float())


@torch.no_grad()
def euler_sample(model: nn.Module, noise: Tensor, labels: Tensor | None, *, steps: int,
                 cfg_scale: float = 1.0, null_label: int | None = None) -> Tensor:
    """Integrate from t = 1 to t = 0 in `steps` Euler steps.

    With cfg_scale != 1 and labels given, the velocity is
    v_uncond + cfg_scale * (v_cond - v_uncond), the unconditional branch using `null_label`.
    """
    if steps < 1:
        raise ValueError(f"sample steps must be >= 1, got {steps}")
    guided = labels is not None and cfg_scale != 1.0
    if guided and null_label is None:
        raise ValueError("classifier-free guidance needs the model's null label (num_classes)")
    x = noise
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = t_now.expand(x.shape[0])
        if guided:
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
            v_cond, v_uncond = both.float().chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            v = model(x, t, labels).float()
        x = x + (t_next - t_now) * v
    return x
