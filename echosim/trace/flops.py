"""FLOP formulas the recorder needs beyond torch.utils.flop_counter's registry, and echosim's
modelled sparse attention op.

    register_flops(torch.ops.mylib.my_op, lambda *args, **kwargs: ...)   # FLOPs of a custom op
    echosim.block_sparse_attention(q, k, v, density)   # (B, H, S, D) -> out, log-sum-exp

The modelled op stands in for a block-sparse kernel that computes `density` of the key blocks:
it costs `density` x the dense FLOPs (forward 4*B*H*S^2*D, backward 2.5x that). What it runs
depends on the device: the kernel registered for the device type (`register_sparse_kernel`;
dsv.sim.kernels registers dsv's Triton kernel for CUDA, so that measured and real steps time a
real kernel); on a device without one but CUDA, dense attention, so a traced model still works
anywhere. Under FakeTensorMode nothing runs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

FlopFormula = Callable[..., float]
"""formula(*args, **kwargs) of the op's dispatcher call -> its FLOPs."""
_FLOPS: dict = {}


def register_flops(op, formula: FlopFormula) -> None:
    """Count `formula`'s FLOPs for every call of `op` (an op overload packet, e.g. torch.ops.aten.mm)."""
    _FLOPS[op] = formula


@dataclass(frozen=True, kw_only=True)
class SparseKernel:
    """A block-sparse attention keeping `density` of the key blocks: forward(q, k, v, density) ->
    (out (B, H, S, D), log-sum-exp (B, H, S) fp32); backward(grad, q, k, v, out, lse, density) ->
    (dq, dk, dv)."""

    forward: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    backward: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]]


_KERNELS: dict[str, SparseKernel] = {}


def register_sparse_kernel(device_type: str, kernel: SparseKernel) -> None:
    """Run `kernel` for echosim.block_sparse_attention on tensors of `device_type` ("cuda")."""
    _KERNELS[device_type] = kernel


def _kernel(q: Tensor) -> SparseKernel | None:
    """The registered kernel for q's device; None: dense attention stands in (a GPU must have one,
    or measured steps would time dense attention as if it were sparse)."""
    kernel = _KERNELS.get(q.device.type)
    if kernel is None and q.is_cuda:
        raise NotImplementedError("echosim.block_sparse_attention has no CUDA kernel: register one with "
                                  "echosim.trace.flops.register_sparse_kernel (importing dsv.sim.kernels "
                                  "registers dsv's), or trace with fake tensors")
    return kernel


@torch.library.custom_op("echosim::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, density: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, S, D), log-sum-exp (B, H, S) fp32): the registered kernel, else dense SDPA and
    a zero log-sum-exp (the backward recomputes)."""
    kernel = _kernel(q)
    if kernel is not None:
        return kernel.forward(q, k, v, density)
    b, h, s, _ = q.shape
    return F.scaled_dot_product_attention(q, k, v), q.new_zeros(b, h, s, dtype=torch.float32)


@block_sparse_attention.register_fake
def _(q, k, v, density):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("echosim::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    density: float) -> tuple[Tensor, Tensor, Tensor]:
    kernel = _kernel(q)
    if kernel is not None:
        return kernel.backward(grad, q, k, v, out, lse, density)
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


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


register_flops(torch.ops.echosim.block_sparse_attention,
               lambda q, k, v, density, **kw: density * sdpa_flop_count(_shape(q), _shape(k), _shape(v)))
register_flops(torch.ops.echosim.block_sparse_attention_backward,
               lambda g, q, k, v, out, lse, density, **kw: density * sdpa_backward_flop_count(
                   _shape(g), _shape(q), _shape(k), _shape(v)))


def attention_flops(func, args: tuple, kwargs: dict) -> float | None:
    """FLOPs of an SDPA kernel (any backend, forward or backward) from its named arguments: 4 B H
    Sq Sk D forward, 2.5x that backward (torch's counts), with grouped-query keys (fewer key
    heads) and causal masking (the kernels skip the upper triangle). None: not such a kernel."""
    names = [a.name for a in func._schema.arguments]
    named = dict(zip(names, args)) | kwargs
    q, k = named.get("query"), named.get("key")
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.dim() != 4:
        return None
    b, h, sq, d = q.shape
    sk = k.shape[-2]
    flops = 4.0 * b * h * sq * sk * d
    if named.get("is_causal"):
        flops *= sq / (2 * sk) if sq <= sk else 1 - sk / (2 * sq)  # query i sees keys 0..i (top-left)
    return flops * (2.5 if "grad_out" in named else 1.0)


def op_flops(func, args: tuple, kwargs: dict, out) -> float:
    """FLOPs of one dispatcher call (0 for ops without a formula: they are memory-bound)."""
    packet = func._overloadpacket
    if packet in _FLOPS:
        return float(_FLOPS[packet](*args, **kwargs))
    if "scaled_dot_product" in str(packet) or "flash_attention" in str(packet) or "efficient_attention" in str(packet):
        flops = attention_flops(func, args, kwargs)
        if flops is not None:
            return flops
    formula = flop_registry.get(packet)
    return float(formula(*args, **kwargs, out_val=out)) if formula else 0.0
