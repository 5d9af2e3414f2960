"""FLOP formulas the recorder needs beyond torch.utils.flop_counter's registry: the CPU flash
attention kernels that fake CPU tensors dispatch to, and echosim's modelled sparse attention.

    echosim.block_sparse_attention(q, k, v, density)   # (B, H, S, D) -> (B, H, S, D)

stands in for a block-sparse kernel that computes `density` of the key blocks: it costs
`density` x the dense FLOPs (forward 4*B*H*S^2*D, backward 2.5x that), and computes dense
attention when it runs eagerly, so a traced model still works on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count


@torch.library.custom_op("echosim::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, density: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


@block_sparse_attention.register_fake
def _(q, k, v, density):
    return torch.empty_like(q)


@torch.library.custom_op("echosim::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                    density: float) -> tuple[Tensor, Tensor, Tensor]:
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad)


@block_sparse_attention_backward.register_fake
def _(grad, q, k, v, density):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _backward(ctx, grad):
    dq, dk, dv = block_sparse_attention_backward(grad, *ctx.saved_tensors, ctx.density)
    return dq, dk, dv, None


def _setup(ctx, inputs, output):
    q, k, v, density = inputs
    ctx.save_for_backward(q, k, v)
    ctx.density = density


block_sparse_attention.register_autograd(_backward, setup_context=_setup)


class ModelledSparseAttention:
    """An attention backend (dsv.models.attention) whose every layer keeps `density` of its blocks."""

    def __init__(self, density: float):
        self.density = density

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor) -> Tensor:
        return block_sparse_attention(q, k, v, self.density)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


EXTRA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, **kw: sdpa_flop_count(_shape(q), _shape(k), _shape(v)),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(_shape(g), _shape(q), _shape(k), _shape(v)),
    torch.ops.echosim.block_sparse_attention:
        lambda q, k, v, density, **kw: density * sdpa_flop_count(_shape(q), _shape(k), _shape(v)),
    torch.ops.echosim.block_sparse_attention_backward:
        lambda g, q, k, v, density, **kw: density * sdpa_backward_flop_count(_shape(g), _shape(q), _shape(k),
                                                                             _shape(v)),
}


def op_flops(func, args: tuple, kwargs: dict, out) -> float:
    """FLOPs of one dispatcher call (0 for ops without a formula: they are memory-bound)."""
    packet = func._overloadpacket
    if packet in EXTRA_FLOPS:
        return float(EXTRA_FLOPS[packet](*args, **kwargs))
    formula = flop_registry.get(packet)
    return float(formula(*args, **kwargs, out_val=out)) if formula else 0.0
