"""Head assignment by greedy LPT, and the uneven head all-to-all (bit-exact, forward and backward)."""
import pytest
import torch
import torch.distributed as dist

from cp_harness import run_distributed
from dsv.parallel.head_parallel import assign_heads, even_assignment, gather_heads, scatter_heads


def test_lpt_reaches_the_balanced_optimum():
    costs = [4, 3, 3, 2, 2, 2]  # total 16: the optimum is 8 + 8; contiguous halves give 10 + 6
    assert assign_heads(costs, 2).loads(costs) == [8, 8]
    assert even_assignment(6, 2).loads(costs) == [10, 6]


def test_lpt_isolates_one_dense_head():
    costs = [0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]  # the dense head alone is the bottleneck
    assignment = assign_heads(costs, 2)
    assert assignment.heads_of(assignment.owners[2]) == [2]
    assert max(assignment.loads(costs)) == pytest.approx(0.9)


def test_lpt_gives_every_rank_a_head_even_at_zero_cost():
    assignment = assign_heads([0.0, 0.0, 0.0, 0.5], 3)
    assert sorted(assignment.counts) == [1, 1, 2]


def test_more_head_ranks_than_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="head-parallel degree 4 > 3 attention heads"):
        assign_heads([1.0, 1.0, 1.0], 4)
    with pytest.raises(ValueError, match="divisible"):
        even_assignment(5, 2)


def _uneven_all_to_all(rank, world):
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 5, 12, 3  # odd head count: the two ranks own 2 and 3 heads
    full = torch.randn(b, h, s, d, generator=gen)
    weight = torch.randn(b, h, s, d, generator=gen)
    assignment = assign_heads([0.9, 0.1, 0.5, 0.3, 0.2], world)
    tokens = slice(rank * s // world, (rank + 1) * s // world)
    local = full[:, :, tokens].clone().requires_grad_()
    mine = assignment.heads_of(rank)

    owned = scatter_heads(local, assignment, group)  # (B, H_r, S, D)
    assert torch.equal(owned, full[:, mine]), "scatter_heads must give the owned heads' whole sequence"
    assert torch.equal(gather_heads(owned, assignment, group), local), "gather_heads must invert scatter_heads"
    # the sum over ranks of (owned * weight) has gradient weight at every local token: exact, no reduction
    (owned * weight[:, mine]).sum().backward()
    assert torch.equal(local.grad, weight[:, :, tokens]), "the backward must be the reverse all-to-all"
    return assignment.counts


def test_uneven_head_all_to_all_is_bit_exact_on_two_ranks():
    assert run_distributed(_uneven_all_to_all, 2) == [2, 3]
