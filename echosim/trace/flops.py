"""FLOP formulas the recorder needs beyond torch.utils.flop_counter's registry: the CPU flash
attention kernels that fake CPU tensors dispatch to, and echosim's modelled sparse attention.

    echosim.block_sparse_attention(q, k, v, density)   # (B, H, S, D) -> out, log-sum-exp

stands in for a block-sparse kernel that computes `density` of the key blocks: it costs
`density` x the dense FLOPs (forward 4*B*H*S^2*D, backward 2.5x that). Run on CUDA it is
dsv's Triton kernel on uniformly random block lists of that density (blocks of 64 tokens,
the same lists at every call of a shape), so measured and real steps time the real kernel;
elsewhere it computes dense attention, so a traced model still works on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from dsv.ops.block_index import BlockIndex, random_block_index


SPARSE_BLOCK = 64  # tokens per block of the modelled kernel's random index on CUDA
_indices: dict[tuple, BlockIndex] = {}


def _random_index(q: Tensor, density: float) -> BlockIndex:
    """The same uniformly random block lists for every call of one shape and density."""
    b, h, s, _ = q.shape
    key = (b, h, s, density, q.device)
    if key not in _indices:
        generator = torch.Generator(q.device).manual_seed(0)
        _indices[key] = random_block_index(b, h, s, SPARSE_BLOCK, density, generator=generator)
    return _indices[key]


def _check_square(q: Tensor, k: Tensor) -> None:
    if k.shape[-2] != q.shape[-2]:
        raise NotImplementedError(
            f"echosim.block_sparse_attention runs on CUDA only with as many keys as queries (got {q.shape[-2]} "
            f"queries, {k.shape[-2]} keys, as under sequence parallelism); trace such configurations with fake "
            "tensors")


@torch.library.custom_op("echosim::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, density: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, S, D), log-sum-exp (B, H, S) fp32). On CUDA dsv's Triton kernel on random
    block lists; elsewhere dense SDPA and a zero log-sum-exp (the backward recomputes)."""
    b, h, s, _ = q.shape
    if q.is_cuda:
        from dsv.ops.sparse_attention import kernels

        _check_square(q, k)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return kernels.forward(q, k, v, _random_index(q, density), q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v), q.new_zeros(b, h, s, dtype=torch.float32)


@block_sparse_attention.register_fake
def _(q, k, v, density):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("echosim::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    density: float) -> tuple[Tensor, Tensor, Tensor]:
    if q.is_cuda:
        from dsv.ops.sparse_attention import kernels

        return kernels.backward(grad.contiguous(), q, k, v, out, lse, _random_index(q, density), q.shape[-1] ** -0.5)
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)


@block_sparse_attention_backward.register_fake
def _(grad, q, k, v, out, lse, density):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = block_sparse_attention_backward(grad, q, k, v, out, lse, ctx.density)
    return dq, dk, dv, None


def _setup(ctx, inputs, output):
    q, k, v, density = inputs
    ctx.save_for_backward(q.contiguous(), k.contiguous(), v.contiguous(), *output)
    ctx.density = density
    ctx.mark_non_differentiable(output[1])


block_sparse_attention.register_autograd(_backward, setup_context=_setup)


def modelled_sparse_attention(q: Tensor, k: Tensor, v: Tensor, density: float) -> Tensor:
    """(B, H, S, D) attention computing `density` of the key blocks."""
    return block_sparse_attention(q, k, v, density)[0]


class ModelledSparseAttention:
    """An attention backend (dsv.models.attention) whose every layer keeps `density` of its blocks."""

    def __init__(self, density: float):
        self.density = density

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, layer: int, attn_input: Tensor,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return modelled_sparse_attention(q, k, v, self.density)


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
        lambda g, q, k, v, out, lse, density, **kw: density * sdpa_backward_flop_count(_shape(g), _shape(q),
                                                                                       _shape(k), _shape(v)),
}


def op_flops(func, args: tuple, kwargs: dict, out) -> float:
    """FLOPs of one dispatcher call (0 for ops without a formula: they are memory-bound)."""
    packet = func._overloadpacket
    if packet in EXTRA_FLOPS:
        return float(EXTRA_FLOPS[packet](*args, **kwargs))
    formula = flop_registry.get(packet)
    return float(formula(*args, **kwargs, out_val=out)) if formula else 0.0
