"""Differentiable collectives for context parallelism, each the exact adjoint of its backward.

    y = all_to_all(x, send_splits, recv_splits, group)   # uneven, along dim 0; backward: the reverse all-to-all
    y = all_gather(x, group)                              # along dim 0; backward: reduce-scatter (sum)
    n = exchange_counts(counts, group)                    # not differentiable: what every peer sends me

Gradients are exact adjoints: with one loss per rank, the sum of the ranks' parameter
gradients is the gradient of the sum of their losses. Both NCCL and gloo run uneven
`all_to_all_single`, so the same code serves GPUs and the CPU tests.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from torchkit.collectives import all_gather_into, reduce_scatter_into


def all_to_all(x: Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group: ProcessGroup) -> Tensor:
    """Rank i sends rows [sum(send_splits[:j]), +send_splits[j]) of x to rank j and receives
    recv_splits[j] rows from rank j, stacked in rank order. x: (sum(send_splits), *rest)."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


def all_gather(x: Tensor, group: ProcessGroup) -> Tensor:
    """(n, *rest) on each of g ranks -> (g * n, *rest), rank order."""
    return _AllGather.apply(x, group)


def exchange_counts(counts: Tensor, group: ProcessGroup) -> Tensor:
    """counts (g,) int64, counts[j] = what this rank will send to rank j -> (g,), what rank j sends here."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received


def _all_to_all_rows(x: Tensor, send_splits: list[int], recv_splits: list[int], group: ProcessGroup) -> Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all_rows(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_rows(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        all_gather_into(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        reduce_scatter_into(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None
