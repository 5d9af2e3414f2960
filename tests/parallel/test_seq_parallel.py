"""Sequence-parallel attention: selective KV exchange (sparse) and all-gather (dense) match one process."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cp_harness import run_distributed
from dsv.ops.block_index import BlockIndex, random_block_index
from dsv.ops.sparse_attention import sparse_attention_index
from dsv.parallel.seq_parallel import check_sequence_fits, dense_sequence_attention, sparse_sequence_attention

B, H, BLOCK, D = 2, 3, 4, 8
# fp32; the fetched blocks sit in another order in the KV buffer than in the one-process run, so
# the softmax sums (and dK/dV sums over query blocks) add in another order: ~1e-7 relative
TOL = dict(rtol=1e-5, atol=1e-6)


def _local_index(index: BlockIndex, rank: int, world: int) -> BlockIndex:
    nl = index.num_blocks // world
    rows = slice(rank * nl, (rank + 1) * nl)
    return BlockIndex(counts=index.counts[:, :, rows].contiguous(), indices=index.indices[:, :, rows].contiguous(),
                      block_size=index.block_size, seq_len=index.seq_len)


def _remote_blocks_selected(index: BlockIndex, rank: int, world: int) -> int:
    """Distinct (batch, head, KV block) triples of other ranks that this rank's query blocks select."""
    nl = index.num_blocks // world
    selected = index.to_dense()[:, :, rank * nl:(rank + 1) * nl].any(dim=2)  # (B, H, NKV)
    selected[..., rank * nl:(rank + 1) * nl] = False
    return int(selected.sum())


def _reference(q, k, v, weight, attend):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = attend(q, k, v)
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _sequence_parallel(rank, world, blocks_per_rank):
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(1)
    s = blocks_per_rank * world * BLOCK
    q, k, v, weight = (torch.randn(B, H, s, D, generator=gen) for _ in range(4))
    tokens = slice(rank * s // world, (rank + 1) * s // world)
    sent = {}
    for name, density in (("sparse", 0.3), ("diagonal", 0.0)):  # "diagonal": every query block keeps only itself
        index = random_block_index(B, H, s, BLOCK, density, generator=gen)
        want = _reference(q, k, v, weight, lambda q, k, v: sparse_attention_index(q, k, v, index, backend="reference"))
        local = [x[:, :, tokens].clone().requires_grad_() for x in (q, k, v)]
        out, nbytes = sparse_sequence_attention(*local, _local_index(index, rank, world), group)
        (out * weight[:, :, tokens]).sum().backward()
        for got, ref, what in zip((out, *(x.grad for x in local)), want, ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(got, ref[:, :, tokens], **TOL, msg=f"{name} {what}")
        # exactly the selected remote blocks move: K and V, BLOCK x D fp32 each
        assert nbytes == _remote_blocks_selected(index, rank, world) * 2 * BLOCK * D * 4, name
        sent[name] = nbytes

    want = _reference(q, k, v, weight, F.scaled_dot_product_attention)
    local = [x[:, :, tokens].clone().requires_grad_() for x in (q, k, v)]
    out, nbytes = dense_sequence_attention(*local, group)
    (out * weight[:, :, tokens]).sum().backward()
    for got, ref, what in zip((out, *(x.grad for x in local)), want, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(got, ref[:, :, tokens], **TOL, msg=f"dense {what}")
    sent["dense"] = nbytes
    return sent


def test_sparse_exchange_moves_only_selected_blocks_and_matches_one_process():
    sent = run_distributed(_sequence_parallel, 2, 3)  # 3 query blocks per rank (odd)
    assert sent["diagonal"] == 0 < sent["sparse"] < sent["dense"]


def test_shards_that_do_not_fit_give_clear_errors():
    with pytest.raises(ValueError, match="does not split into 4 equal shards"):
        check_sequence_fits(30, 4)
    with pytest.raises(ValueError, match="not a multiple of the attention block"):
        check_sequence_fits(48, 4, block_size=8)
