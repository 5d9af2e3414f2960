"""What one DSV training step carries from the layers' forwards to `step_end`.

    state = StepState(steps_taken=n)          # made by step_end (or a checkpoint load) for step n + 1
    state.check_first(layer)                  # a layer's training forward; it may run once per step
    state.record(layer, LayerRecord(...))     # what it selected, its loss and profile
    index = state.replay(layer)               # its activation-checkpoint recompute: the same blocks
    state.check_end(step)                     # step_end(step) closes step n + 1 only: step == n + 1

A second training forward of a layer before step_end, a recompute without a forward, and a
step_end twice or out of order raise StepOrderError instead of mixing two steps' numbers.
The recompute is recognised by where it runs (`in_recompute`), not by being a layer's second call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dsv.ops.block_index import BlockIndex


class StepOrderError(RuntimeError):
    """The DSV backend was driven out of step: see the message for the call that is missing or extra."""


@torch.compiler.disable
def in_recompute() -> bool:
    """True while autograd's backward runs this forward: that is the activation-checkpoint recompute
    (torch.utils.checkpoint replays a block's forward inside the backward that needs its tensors)."""
    return torch._C._current_graph_task_id() != -1


@dataclass(frozen=True, kw_only=True)
class LayerRecord:
    """What one layer's training forward leaves for step_end."""

    selection: BlockIndex | None  # what its attention used (None = dense); the recompute attends to the same
    density: float  # fraction of tiles its attention computes (1 = dense)
    loss: Tensor  # (H,) predictor loss on this rank's rows (zero for heads owned elsewhere)
    profile: dict[str, Tensor] | None  # name -> (H,) sums of the profiler's measures; None off profiling steps


@dataclass(kw_only=True)
class StepState:
    """The records of the step being taken, by layer; step_end replaces it with the next step's."""

    steps_taken: int  # optimizer steps before this one: the sampled rows and the profiling cadence follow it
    layers: dict[int, LayerRecord] = field(default_factory=dict)

    @property
    def step(self) -> int:
        """The step being accumulated, as step_end will be told."""
        return self.steps_taken + 1

    def check_first(self, layer: int) -> None:
        if layer in self.layers:
            raise StepOrderError(f"layer {layer} ran a second training forward in step {self.step}: call "
                                 f"step_end({self.step}) after each optimizer step (the activation-checkpoint "
                                 "recompute runs inside backward and is not a second forward)")

    def record(self, layer: int, record: LayerRecord) -> None:
        self.check_first(layer)
        self.layers[layer] = record

    def replay(self, layer: int) -> BlockIndex | None:
        if layer not in self.layers:
            raise StepOrderError(f"activation-checkpoint recompute of layer {layer} found no training forward in "
                                 f"step {self.step}: checkpoint without reentrant autograd (use_reentrant=False, "
                                 "checkpoint_wrapper's default), whose forward runs with grad enabled")
        return self.layers[layer].selection

    def check_end(self, step: int) -> None:
        if step != self.step:
            raise StepOrderError(f"step_end({step}) after {self.steps_taken} steps: call step_end once after each "
                                 f"optimizer step with the steps taken so far ({self.step} now)")


def reduce_step(state: StepState, predictors: nn.Module, *, heads: int, world_size: int, context_parallel: int,
                group: dist.ProcessGroup | None) -> tuple[list[int], Tensor, dict[int, dict[str, Tensor]]]:
    """Sum over each context-parallel group and mean over the data-parallel replicas of the
    predictors' gradients (written back to .grad), the per-layer losses and the profiles, in one
    all-reduce over `group` (its result is the same on every rank, and so are the profiles and
    budgets made from it). Returns the trained layers, their losses (len(trained), H) and the
    profiles, on CPU."""
    trained = sorted(state.layers)
    if not trained:
        return [], torch.zeros(0, heads), {}
    params = list(predictors.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    profiled = [i for i in trained if state.layers[i].profile is not None]
    fields = sorted(state.layers[profiled[0]].profile) if profiled else []
    parts = [g.flatten() for g in grads] + [state.layers[i].loss for i in trained]
    parts += [state.layers[i].profile[name] for i in profiled for name in fields]
    flat = torch.cat(parts)
    if world_size > 1:
        dist.all_reduce(flat, group=group)
        flat /= world_size // context_parallel
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()
    tail = flat[sum(g.numel() for g in grads):].cpu().view(-1, heads)  # (rows, H)
    losses = tail[:len(trained)]
    measured = tail[len(trained):].view(len(profiled), max(len(fields), 1), heads)
    return trained, losses, {layer: dict(zip(fields, measured[n])) for n, layer in enumerate(profiled)}
