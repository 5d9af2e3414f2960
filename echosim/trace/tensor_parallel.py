"""Megatron-style tensor parallelism as plain modules with explicit collectives.

Activations are sequence-first, (S, B, H). The four conjugate operators (Shoeybi et al. 2019,
Korthikanti et al. 2022) and what they run over the tensor-parallel group:

    operator                    forward              backward
    copy_to_tp       (f)        identity             all-reduce
    reduce_from_tp   (g)        all-reduce           identity
    gather_from_sp   (g under SP) all-gather of S    reduce-scatter
    scatter_to_sp    (g-bar)    reduce-scatter of S  all-gather

A column-parallel linear holds out/t rows of the weight and runs f (or gather_from_sp) on its
input; under sequence parallelism its backward also re-gathers the input for the weight
gradient, as Megatron does instead of keeping the gathered input. A row-parallel linear holds
in/t columns and runs g (or scatter_to_sp) on its output. With one rank nothing is issued.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

C10D = torch.ops._c10d_functional  # functional collectives: what the recorder sees, and DTensor issues


def _all_reduce(x: Tensor, group: dist.ProcessGroup, op: str = "sum") -> Tensor:
    return C10D.wait_tensor(C10D.all_reduce(x.contiguous(), op, group.group_name))


def _all_gather(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    return C10D.wait_tensor(C10D.all_gather_into_tensor(x.contiguous(), group.size(), group.group_name))


def _reduce_scatter(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    return C10D.wait_tensor(C10D.reduce_scatter_tensor(x.contiguous(), "sum", group.size(), group.group_name))


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _SPColumnLinear(torch.autograd.Function):
    """all-gather(x) @ W^T + b with x sequence-sharded; backward re-gathers x for dW."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(_all_gather(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        full = _all_gather(x, ctx.group)  # re-gathered for the weight gradient
        grad_x = _reduce_scatter(grad @ weight, ctx.group)
        flat_grad, flat_x = grad.flatten(0, -2), full.flatten(0, -2)
        return grad_x, flat_grad.t() @ flat_x, flat_grad.sum(0), None


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows over the group; output stays split."""

    def __init__(self, d_in: int, d_out: int, *, group: dist.ProcessGroup, sequence_parallel: bool, dtype):
        super().__init__()
        self.group, self.sp, self.tp = group, sequence_parallel, group.size()
        self.weight = nn.Parameter(torch.empty(d_out // self.tp, d_in, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_out // self.tp, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        if self.tp == 1:
            return nn.functional.linear(x, self.weight, self.bias)
        if self.sp:
            return _SPColumnLinear.apply(x, self.weight, self.bias, self.group)
        return nn.functional.linear(_CopyToTP.apply(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with x and W split by input columns; partial sums reduced over the group."""

    def __init__(self, d_in: int, d_out: int, *, group: dist.ProcessGroup, sequence_parallel: bool, dtype):
        super().__init__()
        self.group, self.sp, self.tp = group, sequence_parallel, group.size()
        self.weight = nn.Parameter(torch.empty(d_out, d_in // self.tp, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        partial = nn.functional.linear(x, self.weight)
        if self.tp > 1:
            partial = _ScatterToSP.apply(partial, self.group) if self.sp else _ReduceFromTP.apply(partial, self.group)
        return partial + self.bias


def reduce_from_tp(x: Tensor, group: dist.ProcessGroup, *, sequence_parallel: bool) -> Tensor:
    """Sum partial results over the group (scattered over the sequence under SP)."""
    if group.size() == 1:
        return x
    return _ScatterToSP.apply(x, group) if sequence_parallel else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: Tensor, group: dist.ProcessGroup, *, sequence_parallel: bool) -> Tensor:
    """The full sequence on every rank: all-gather under SP, f (identity) otherwise."""
    if group.size() == 1:
        return x
    return _GatherFromSP.apply(x, group) if sequence_parallel else _CopyToTP.apply(x, group)


def all_reduce_max(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Elementwise maximum over the group (no gradient)."""
    return x if group.size() == 1 else _all_reduce(x.detach(), group, "max")


def sum_over_tp(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over the group in forward, identity in backward (g)."""
    return x if group.size() == 1 else _ReduceFromTP.apply(x, group)
