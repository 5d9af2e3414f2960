"""Head-parallel attention (Ulysses-style) with heads assigned to ranks by cost, not count.

Each of g ranks holds S/g tokens of every head. One uneven all-to-all turns that into all S
tokens of the heads the rank owns; attention runs locally; the reverse all-to-all brings
the outputs back to sequence shards:

    assignment = assign_heads(costs, ranks=g)                 # greedy LPT on cost = 1 - sparsity
    q_full = scatter_heads(q, assignment, group)              # (B, H, S/g, D) -> (B, H_r, S, D)
    out = gather_heads(attention(q_full, ...), assignment, group)   # (B, H_r, S, D) -> (B, H, S/g, D)

Both directions are autograd-exact (the backward of an all-to-all is the reverse all-to-all)
and move data only: the result is bit-identical to the single-process tensors.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from dsv.parallel.collectives import all_to_all


@dataclass(frozen=True)
class HeadAssignment:
    """owners[h] = the rank (0..ranks-1 in the head group) that computes head h."""

    owners: tuple[int, ...]
    ranks: int

    @cached_property
    def order(self) -> list[int]:
        """Heads sorted by owner, ascending head id inside an owner: the all-to-all's send order."""
        return sorted(range(len(self.owners)), key=lambda h: (self.owners[h], h))

    @cached_property
    def inverse_order(self) -> list[int]:
        inverse = [0] * len(self.order)
        for position, head in enumerate(self.order):
            inverse[head] = position
        return inverse

    @cached_property
    def counts(self) -> list[int]:
        """Number of heads per rank."""
        return [self.owners.count(r) for r in range(self.ranks)]

    def order_on(self, device: torch.device, *, inverse: bool = False) -> Tensor:
        """`order` (or `inverse_order`) as an index tensor on `device`, made once per device: an
        index from a Python list is copied from pageable memory at every use, and on CUDA such
        a copy waits for the stream to drain (a host sync per layer and tensor)."""
        cache = self.__dict__.setdefault("_orders_on", {})  # frozen: cached like the properties
        key = (str(device), inverse)
        if key not in cache:
            cache[key] = torch.tensor(self.inverse_order if inverse else self.order, device=device)
        return cache[key]

    def heads_of(self, rank: int) -> list[int]:
        return [h for h in self.order if self.owners[h] == rank]

    def loads(self, costs: Sequence[float]) -> list[float]:
        """Summed cost per rank."""
        loads = [0.0] * self.ranks
        for head, owner in enumerate(self.owners):
            loads[owner] += costs[head]
        return loads


def check_heads_fit(heads: int, ranks: int) -> None:
    if ranks > heads:
        raise ValueError(f"head-parallel degree {ranks} > {heads} attention heads: every head-parallel rank needs "
                         f"at least one head; use --cp-heads <= {heads} and put the rest in --cp-seq")


def assign_heads(costs: Sequence[float], ranks: int) -> HeadAssignment:
    """Greedy longest-processing-time: heads by descending cost (ties: lower id first), each to
    the rank with the least load so far (ties: fewer heads, then lower rank), so every rank
    gets at least one head when heads >= ranks."""
    check_heads_fit(len(costs), ranks)
    if any(c < 0 for c in costs):
        raise ValueError(f"head costs must be >= 0 (cost = 1 - sparsity), got {list(costs)}")
    owners = [0] * len(costs)
    heap = [(0.0, 0, r) for r in range(ranks)]  # (load, heads, rank)
    for head in sorted(range(len(costs)), key=lambda h: (-costs[h], h)):
        load, count, rank = heapq.heappop(heap)
        owners[head] = rank
        heapq.heappush(heap, (load + costs[head], count + 1, rank))
    return HeadAssignment(owners=tuple(owners), ranks=ranks)


def even_assignment(heads: int, ranks: int) -> HeadAssignment:
    """Plain Ulysses: consecutive runs of heads / ranks heads per rank."""
    check_heads_fit(heads, ranks)
    if heads % ranks:
        raise ValueError(f"even head parallelism needs heads ({heads}) divisible by ranks ({ranks})")
    return HeadAssignment(owners=tuple(h // (heads // ranks) for h in range(heads)), ranks=ranks)


def scatter_heads(x: Tensor, assignment: HeadAssignment, group: ProcessGroup) -> Tensor:
    """x (B, H, S_loc, D), this rank's sequence shard of every head -> (B, H_r, g * S_loc, D),
    the whole (group's) sequence of the heads this rank owns, ascending head id."""
    rank, g = _check_group(assignment, group, x.shape[1])
    b, _, s_loc, d = x.shape
    send = x.index_select(1, assignment.order_on(x.device)).transpose(0, 1)  # (H, B, S_loc, D), heads by owner
    mine = assignment.counts[rank]
    recv = all_to_all(send, assignment.counts, [mine] * g, group)  # (g * H_r, B, S_loc, D), by source rank
    recv = recv.view(g, mine, b, s_loc, d).permute(2, 1, 0, 3, 4)  # (B, H_r, g, S_loc, D)
    return recv.reshape(b, mine, g * s_loc, d)  # (B, H_r, S, D)


def gather_heads(y: Tensor, assignment: HeadAssignment, group: ProcessGroup) -> Tensor:
    """Inverse of `scatter_heads`: y (B, H_r, S, D) -> (B, H, S / g, D)."""
    rank, g = _check_group(assignment, group, len(assignment.owners))
    b, mine, s, d = y.shape
    send = y.view(b, mine, g, s // g, d).permute(2, 1, 0, 3, 4).reshape(g * mine, b, s // g, d)  # by target rank
    recv = all_to_all(send, [mine] * g, assignment.counts, group)  # (H, B, S_loc, D), heads by owner
    return recv.transpose(0, 1).index_select(1, assignment.order_on(recv.device, inverse=True))  # (B, H, S_loc, D)


def _check_group(assignment: HeadAssignment, group: ProcessGroup, heads: int) -> tuple[int, int]:
    g = dist.get_world_size(group)
    if g != assignment.ranks:
        raise ValueError(f"head assignment is for {assignment.ranks} ranks, the head group has {g}")
    if heads != len(assignment.owners):
        raise ValueError(f"head assignment is for {len(assignment.owners)} heads, the tensor has {heads}")
    return dist.get_rank(group), g
