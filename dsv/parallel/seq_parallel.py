"""Sequence-parallel attention: each of g ranks owns S/g query and key/value tokens.

Sparse: a rank fetches from its peers only the KV blocks its query blocks selected, in three
exchanges (how many blocks, which blocks, then the blocks), lays them after its own blocks
in a compact KV buffer, and runs block-sparse attention on it; autograd returns the
gradients of the fetched blocks to their owners (the reverse all-to-all, summed into the
owner's dK/dV). Dense fallback: all-gather K and V.

On a partial token grid `valid` (NB,) gives the real tokens of each of the sequence's blocks
(dsv/ops/layout.py): every slot of the compact buffer keeps its block's count. Those differ per
(batch, head), while the kernels take one count per block of the sequence, so the padded path
runs the B x H compact buffers as one sequence of B * H * width blocks (same lists, same tiles).

    out, nbytes = sparse_sequence_attention(q, k, v, index, group)   # index: local query blocks, global KV ids
    out, nbytes = dense_sequence_attention(q, k, v, group)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from dsv.ops.block_index import BlockIndex
from dsv.ops.sparse_attention import sparse_attention_index
from dsv.parallel.collectives import all_gather, all_to_all, exchange_counts


@dataclass(frozen=True)
class KVExchange:
    """Which KV blocks move between this rank and its peers, and the compact index over them.

    The compact KV buffer holds, per (batch, head), `width` blocks: the rank's own `local_blocks`
    blocks first, then the fetched ones in ascending global id; unused tail slots are padding.
    """

    send_splits: list[int]  # blocks this rank serves to each peer
    recv_splits: list[int]  # blocks this rank fetches from each peer
    serve_rows: Tensor  # (sum(send_splits),) long: (b * H + h) * local_blocks + own block, grouped by peer
    fetch_slots: Tensor  # (sum(recv_splits),) long: (b * H + h) * width + slot, in arrival order
    local_blocks: int
    width: int
    index: BlockIndex  # (B, H, width) lists into the compact buffer; rows past local_blocks are padding queries
    slot_blocks: Tensor  # (B * H, width) long: global id of the block in each slot, -1 for an unused one


def check_sequence_fits(seq_len: int, ranks: int, block_size: int | None = None) -> None:
    """ValueError unless S splits into `ranks` equal shards (of whole blocks, when sparse)."""
    if seq_len % ranks:
        raise ValueError(f"sequence of {seq_len} tokens does not split into {ranks} equal shards; use a rank count "
                         f"that divides {seq_len}, or change the video size")
    if block_size and (seq_len // ranks) % block_size:
        raise ValueError(f"sequence shard of {seq_len // ranks} tokens ({seq_len} / {ranks} ranks) is not a multiple "
                         f"of the attention block ({block_size}); use fewer sequence-parallel ranks or a longer video")


def plan_kv_exchange(index: BlockIndex, group: ProcessGroup) -> KVExchange:
    """index: counts (B, H, NL) and global KV ids (B, H, NL, MAXSEL) of this rank's NL query
    blocks, NL equal on every rank; index.seq_len is the whole sequence. Exchanges counts and
    block ids with the peers (two small all-to-alls); the K/V data moves in `fetch_kv_blocks`."""
    g, rank = dist.get_world_size(group), dist.get_rank(group)
    b, h, nl, maxsel = index.indices.shape
    n = nl * g
    if index.num_blocks != n:
        raise ValueError(f"index covers {index.num_blocks} KV blocks, but {g} ranks x {nl} query blocks = {n}")
    device, offset = index.indices.device, rank * nl
    # -- the KV blocks any local query block selected, per (batch, head)
    valid = torch.arange(maxsel, device=device) < index.counts[..., None]  # (B, H, NL, MAXSEL)
    hits = torch.zeros(b, h, n, dtype=torch.int32, device=device)
    hits.scatter_add_(-1, index.indices.long().flatten(2), valid.flatten(2).to(torch.int32))
    remote = hits > 0
    remote[..., offset:offset + nl] = False  # (B, H, N)
    # -- remote blocks in (b, h, block) order; slot = own blocks first, then rank among the (b, h) fetches
    bh, block = remote.view(b * h, n).nonzero(as_tuple=True)
    per_bh = remote.view(b * h, n).sum(-1)  # (B*H,)
    first = torch.cumsum(per_bh, 0) - per_bh
    width = nl + int(per_bh.max().item()) if bh.numel() else nl
    slot = nl + torch.arange(bh.numel(), device=device) - first[bh]
    # -- requests grouped by owner; the owner learns how many, then which of its blocks
    owner = block // nl
    by_owner = torch.sort(owner, stable=True).indices
    wanted = torch.bincount(owner, minlength=g)  # (g,) blocks this rank fetches from each peer
    send_splits, recv_splits = exchange_counts(wanted, group).tolist(), wanted.tolist()
    requests = (bh * nl + block % nl)[by_owner]
    serve_rows = all_to_all(requests, recv_splits, send_splits, group)
    fetch_slots = (bh * width + slot)[by_owner]
    slot_blocks = torch.full((b * h, width), -1, dtype=torch.long, device=device)
    slot_blocks[:, :nl] = torch.arange(offset, offset + nl, device=device)
    slot_blocks[bh, slot] = block
    return KVExchange(send_splits=send_splits, recv_splits=recv_splits, serve_rows=serve_rows,
                      fetch_slots=fetch_slots, local_blocks=nl, width=width,
                      index=_compact_index(index, remote, bh, block, slot, offset, width), slot_blocks=slot_blocks)


def _compact_index(index: BlockIndex, remote: Tensor, bh: Tensor, block: Tensor, slot: Tensor, offset: int,
                   width: int) -> BlockIndex:
    """Global KV ids -> slots of the compact buffer, sorted; padding query rows select slot 0."""
    b, h, nl, maxsel = index.indices.shape
    n = remote.shape[-1]
    slot_of = torch.zeros(b * h, n, dtype=torch.long, device=bh.device)
    slot_of[:, offset:offset + nl] = torch.arange(nl, device=bh.device)
    slot_of[bh, block] = slot
    slots = torch.gather(slot_of.view(b, h, 1, n).expand(b, h, nl, n), -1, index.indices.long())
    valid = torch.arange(maxsel, device=bh.device) < index.counts[..., None]
    slots = torch.where(valid, slots, width).sort(-1).values  # padding sorts last
    slots = torch.where(slots == width, 0, slots).to(torch.int32)
    counts = torch.ones(b, h, width, dtype=torch.int32, device=bh.device)
    counts[..., :nl] = index.counts
    indices = torch.zeros(b, h, width, maxsel, dtype=torch.int32, device=bh.device)
    indices[:, :, :nl] = slots
    return BlockIndex(counts=counts, indices=indices, block_size=index.block_size, seq_len=width * index.block_size)


def fetch_kv_blocks(k: Tensor, v: Tensor, exchange: KVExchange, group: ProcessGroup) -> tuple[Tensor, Tensor, int]:
    """k, v (B, H, S_loc, D) own tokens -> compact buffers (B, H, width * block, D) and the bytes
    this rank received. Differentiable: gradients of fetched blocks go back to their owners."""
    b, h, s_loc, d = k.shape
    nl, width = exchange.local_blocks, exchange.width
    block = s_loc // nl
    own = torch.stack((k, v), dim=2).view(b * h, 2, nl, block, d).transpose(1, 2)  # (B*H, NL, 2, BLOCK, D)
    served = own.reshape(b * h * nl, 2, block, d)[exchange.serve_rows]  # (n_send, 2, BLOCK, D)
    fetched = all_to_all(served, exchange.send_splits, exchange.recv_splits, group)  # (n_recv, 2, BLOCK, D)
    buffer = F.pad(own, (0, 0, 0, 0, 0, 0, 0, width - nl)).reshape(b * h * width, 2, block, d)
    buffer = buffer.index_copy(0, exchange.fetch_slots, fetched)
    buffer = buffer.view(b, h, width, 2, block, d).transpose(2, 3).reshape(b, h, 2, width * block, d)
    return buffer[:, :, 0], buffer[:, :, 1], fetched.numel() * fetched.element_size()


def sparse_sequence_attention(q: Tensor, k: Tensor, v: Tensor, index: BlockIndex, group: ProcessGroup, *,
                              scale: float | None = None, backend: str = "auto",
                              valid: Tensor | None = None) -> tuple[Tensor, int]:
    """q, k, v (B, H, S_loc, D) of this rank's tokens; index: the local query blocks' global KV
    lists; valid: (NB,) int32 real tokens per block of the whole sequence, or None. Returns the
    attention output (B, H, S_loc, D) and the K/V bytes received."""
    s_loc = q.shape[2]
    check_sequence_fits(index.seq_len, dist.get_world_size(group), index.block_size)
    exchange = plan_kv_exchange(index, group)
    k_buf, v_buf, nbytes = fetch_kv_blocks(k, v, exchange, group)  # (B, H, width * BLOCK, D)
    q_pad = F.pad(q, (0, 0, 0, k_buf.shape[2] - s_loc))  # padding queries: zero, their output is dropped
    if valid is not None:
        return _padded_compact_attention(q_pad, k_buf, v_buf, exchange, valid, scale, backend)[:, :, :s_loc], nbytes
    out = sparse_attention_index(q_pad, k_buf, v_buf, exchange.index, scale=scale, backend=backend,
                                 check_lists=False)  # built by plan_kv_exchange: valid, and no host sync
    return out[:, :, :s_loc], nbytes


def _padded_compact_attention(q: Tensor, k: Tensor, v: Tensor, exchange: KVExchange, valid: Tensor,
                              scale: float | None, backend: str) -> Tensor:
    """q, k, v (B, H, width * BLOCK, D) compact buffers -> (B, H, width * BLOCK, D), each slot's keys
    masked by its block's count: the B * H buffers as one sequence (1, 1, B * H * width * BLOCK, D)."""
    b, h, n, d = q.shape
    index, width = exchange.index, exchange.width
    slot_valid = torch.where(exchange.slot_blocks >= 0, valid[exchange.slot_blocks.clamp(min=0)], 0)  # (B*H, width)
    offsets = (torch.arange(b * h, device=q.device, dtype=torch.int32) * width).view(b, h, 1, 1)
    folded = BlockIndex(counts=index.counts.reshape(1, 1, b * h * width),
                        indices=(index.indices + offsets).reshape(1, 1, b * h * width, -1),
                        block_size=index.block_size, seq_len=b * h * n)
    q, k, v = (x.reshape(1, 1, b * h * n, d) for x in (q, k, v))
    out = sparse_attention_index(q, k, v, folded, scale=scale, backend=backend, check_lists=False,
                                 valid=slot_valid.reshape(-1).to(torch.int32))
    return out.view(b, h, n, d)


def dense_sequence_attention(q: Tensor, k: Tensor, v: Tensor, group: ProcessGroup, *, scale: float | None = None,
                             attention: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, int]:
    """All-gather K and V (one collective), then dense attention of the local queries:
    `attention(q, k, v)` if given, else SDPA at `scale`."""
    kv = gather_sequence(torch.stack((k, v)), group)  # (2, B, H, S, D)
    nbytes = kv.numel() * kv.element_size() * (1 - 1 / dist.get_world_size(group))
    if attention is not None:
        return attention(q, kv[0], kv[1]), int(nbytes)
    return F.scaled_dot_product_attention(q, kv[0], kv[1], scale=scale), int(nbytes)


def gather_sequence(x: Tensor, group: ProcessGroup) -> Tensor:
    """(..., S_loc, D) shards in rank order -> (..., S, D); backward: reduce-scatter."""
    gathered = all_gather(x.movedim(-2, 0), group)  # (S, ..., D)
    return gathered.movedim(0, -2)
