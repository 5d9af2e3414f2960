"""Compact per-query-block lists of selected key/value blocks, and the BlockMask boundary.

A FlexAttention `BlockMask` stores a (S/block)-wide index row per query block and head
(and the transposed one per KV block); at 128k-512k tokens that is hundreds of MB per
layer. Inside the training path we keep only the selected blocks, `max_selected` wide,
and build a `BlockMask` only where a caller asks for one.

The backward pass of block-sparse attention walks the *transposed* lists (for each KV
block, the query blocks that selected it); `BlockIndex.transpose()` builds them on the
device with one stable sort, in a flat layout that needs no host sync.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask


@dataclass(frozen=True)
class TransposedBlockIndex:
    """For each (batch, head, KV block), the query blocks that selected it, ascending.

    counts:   (B, H, NKV) int32, how many query blocks selected the KV block (may be 0).
    offsets:  (B, H, NKV) int32, where that list starts in its (b, h) row of `q_blocks`.
    q_blocks: (B, H, NQ * MAXSEL) int32, the lists of one (b, h) back to back; entries
              past the row's total are padding and are never read.
    """

    counts: Tensor
    offsets: Tensor
    q_blocks: Tensor

    def to_padded(self, num_q_blocks: int) -> Tensor:
        """(B, H, NKV, NQ) int32 lists padded with 0: FlexAttention's `q_indices` layout."""
        slot = torch.arange(num_q_blocks, device=self.counts.device)
        valid = slot < self.counts[..., None]  # (B, H, NKV, NQ)
        where = (self.offsets[..., None] + slot).clamp(max=self.q_blocks.shape[-1] - 1)
        b, h, nkv, nq = where.shape
        picked = torch.gather(self.q_blocks, -1, where.reshape(b, h, nkv * nq).long())
        return torch.where(valid, picked.view(b, h, nkv, nq), 0).to(torch.int32)


@dataclass(frozen=True)
class BlockIndex:
    """Which key/value blocks each (batch, head, query block) attends to.

    counts:  (B, H, NQ) int32, number of selected KV blocks, 0 to MAXSEL; a query block
             with none gets output 0 and zero gradients (as in FlexAttention).
    indices: (B, H, NQ, MAXSEL) int32, selected KV block ids, strictly ascending (each
             block once); entries past `counts` are padding (0) and are never read.
    """

    counts: Tensor
    indices: Tensor
    block_size: int
    seq_len: int

    def __post_init__(self):
        _check_block_size(self.block_size)

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    def density(self) -> float:
        """Fraction of (query block, KV block) tiles that are computed."""
        return self.counts.float().mean().item() / self.num_blocks

    def nbytes(self) -> int:
        """Memory held by the compact lists."""
        return self.counts.nbytes + self.indices.nbytes

    def check_lists(self) -> None:
        """ValueError unless the lists keep the contract above: counts in [0, MAXSEL], listed ids
        in [0, NKV), strictly ascending. Reads one small tensor back: a host sync on a GPU."""
        width, n = self.indices.shape[-1], self.num_blocks
        valid = torch.arange(width, device=self.indices.device) < self.counts[..., None]  # (B, H, NQ, MAXSEL)
        ids = self.indices
        out_of_range = valid & ((ids < 0) | (ids >= n))
        not_ascending = valid[..., 1:] & (ids[..., 1:] <= ids[..., :-1])
        flags = torch.stack([(self.counts < 0).any(), (self.counts > width).any(), out_of_range.any(),
                             not_ascending.any()]).tolist()  # the one read-back
        if flags[0]:
            raise ValueError(f"block index counts must be >= 0, got {self.counts.min().item()}")
        if flags[1]:
            raise ValueError(f"block index counts must be <= the list width indices.shape[-1] = {width}, "
                             f"got {self.counts.max().item()}")
        for bad, where, what in ((flags[2], out_of_range, f"KV block ids in [0, {n})"),
                                 (flags[3], not_ascending, "each KV block once, in ascending order")):
            if bad:
                b, h, q = where.any(-1).nonzero()[0].tolist()
                listed = ids[b, h, q, : self.counts[b, h, q]].tolist()
                raise ValueError(f"block index indices must list {what}; (batch, head, query block) = "
                                 f"({b}, {h}, {q}) lists {listed}")

    def expand(self, batch: int, heads: int) -> "BlockIndex":
        """Broadcast a batch or head dimension of size 1 (as BlockMask allows), contiguous."""
        b, h, nq, width = self.indices.shape
        counts = self.counts.expand(batch, heads, nq).contiguous()
        indices = self.indices.expand(batch, heads, nq, width).contiguous()
        return BlockIndex(counts=counts, indices=indices, block_size=self.block_size, seq_len=self.seq_len)

    def transpose(self) -> TransposedBlockIndex:
        """Lists of query blocks per KV block, built on the index's device without a sync."""
        b, h, nq, width = self.indices.shape
        n = self.num_blocks
        valid = torch.arange(width, device=self.indices.device) < self.counts[..., None]
        # -- flatten the (query block, slot) pairs; padding gets the sentinel KV id n
        kv = torch.where(valid, self.indices, n).reshape(b, h, nq * width)
        # -- stable sort by KV id: groups by KV block, query blocks stay ascending inside
        slots = torch.sort(kv, dim=-1, stable=True).indices
        q_blocks = (slots // width).to(torch.int32)
        # -- per KV block counts and start offsets (the sentinel bucket is dropped)
        counts = torch.zeros(b, h, n + 1, dtype=torch.int32, device=kv.device)
        counts.scatter_add_(-1, kv.long(), torch.ones_like(kv, dtype=torch.int32))
        counts = counts[..., :n].contiguous()
        offsets = (torch.cumsum(counts, -1, dtype=torch.int32) - counts).contiguous()
        return TransposedBlockIndex(counts=counts, offsets=offsets, q_blocks=q_blocks.contiguous())

    def halve_blocks(self) -> "BlockIndex":
        """The same token-level mask in blocks of half the size: query sub-block 2i (and 2i+1)
        takes each listed KV block j as its halves 2j and 2j+1 (the second dropped where it
        lies past the sequence)."""
        if self.block_size % 2:
            raise ValueError(f"cannot halve blocks of {self.block_size} tokens")
        half = self.block_size // 2
        n = -(-self.seq_len // half)
        b, h, nq, width = self.indices.shape
        valid = torch.arange(width, device=self.indices.device) < self.counts[..., None]
        # -- a list stays ascending: j -> (2j, 2j + 1); only the sequence's last block can lose
        #    its upper half, and it can only be the last entry of a list
        indices = torch.stack([2 * self.indices, 2 * self.indices + 1], -1).reshape(b, h, nq, 2 * width)
        upper_past_end = (valid & (2 * self.indices + 1 >= n)).sum(-1, dtype=torch.int32)
        counts = 2 * self.counts - upper_past_end
        # -- both query halves of block i share its list; the sequence may end in the lower one
        counts = counts.repeat_interleave(2, dim=-1)[..., :n].contiguous()
        indices = torch.where(indices < n, indices, 0).repeat_interleave(2, dim=-2)[..., :n, :].contiguous()
        return BlockIndex(counts=counts, indices=indices.to(torch.int32), block_size=half, seq_len=self.seq_len)

    def to_block_mask(self, *, token_mask_mod: bool = False, valid: Tensor | None = None) -> BlockMask:
        """The (NQ, NKV)-wide FlexAttention mask. Compiled FlexAttention skips unlisted blocks;
        its eager (CPU) path ignores the lists and applies only mask_mod, so `token_mask_mod`
        adds one that reads the block map, for the same result there. `valid` (NB,) int32, the
        real tokens of each block (its first ones, dsv/ops/layout.py), adds a mask_mod that
        drops padding queries and keys."""
        n = self.num_blocks
        b, h, nq, width = self.indices.shape
        wide = torch.zeros(b, h, nq, n, dtype=torch.int32, device=self.indices.device)
        wide[..., :width] = self.indices
        mask_mod, block = None, self.block_size
        if token_mask_mod:
            selected = self.to_dense()  # (B, H, NQ, NKV)

            def mask_mod(b, h, q_idx, kv_idx):
                return selected[b, h, q_idx // block, kv_idx // block]

        if valid is not None:
            listed = mask_mod

            def mask_mod(b, h, q_idx, kv_idx):
                real = (q_idx % block < valid[q_idx // block]) & (kv_idx % block < valid[kv_idx // block])
                return real if listed is None else real & listed(b, h, q_idx, kv_idx)

        return BlockMask.from_kv_blocks(
            self.counts, wide, BLOCK_SIZE=self.block_size, mask_mod=mask_mod,
            seq_lengths=(self.seq_len, self.seq_len),
        )

    @classmethod
    def from_block_mask(cls, mask: BlockMask, seq_len: int) -> "BlockIndex":
        """Union of the mask's partial and full KV blocks (their mask_mod is ignored: the
        blocks are taken whole), sorted ascending, trimmed to the longest list."""
        check_block_mask(mask, seq_len)
        kv_block = mask.BLOCK_SIZE[1]
        n = -(-seq_len // kv_block)
        lists = [(mask.kv_num_blocks, mask.kv_indices)]
        if mask.full_kv_num_blocks is not None:
            lists.append((mask.full_kv_num_blocks, mask.full_kv_indices))
        selected = None
        for num, idx in lists:
            idx = idx[..., :n].long()
            valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
            hits = torch.zeros(*idx.shape[:-1], n, dtype=torch.int32, device=idx.device)
            hit = hits.scatter_add_(-1, idx.clamp(max=n - 1), valid.to(torch.int32)) > 0
            selected = hit if selected is None else selected | hit
        return cls.from_dense(selected, block_size=kv_block, seq_len=seq_len)

    @classmethod
    def from_dense(cls, selected: Tensor, *, block_size: int, seq_len: int) -> "BlockIndex":
        """selected: (B, H, NQ, NKV) bool block map -> compact lists."""
        counts = selected.sum(-1, dtype=torch.int32)
        width = max(int(counts.max().item()), 1)
        # stable sort puts selected ids first, in ascending order
        order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        valid = torch.arange(width, device=selected.device) < counts[..., None]
        indices = torch.where(valid, order, 0).to(torch.int32)
        return cls(counts=counts, indices=indices.contiguous(), block_size=block_size, seq_len=seq_len)

    def to_dense(self) -> Tensor:
        """(B, H, NQ, NKV) bool block map."""
        b, h, nq, width = self.indices.shape
        valid = torch.arange(width, device=self.indices.device) < self.counts[..., None]
        hits = torch.zeros(b, h, nq, self.num_blocks, dtype=torch.int32, device=self.indices.device)
        return hits.scatter_add_(-1, self.indices.long(), valid.to(torch.int32)) > 0


def check_block_mask(mask: BlockMask, seq_len: int) -> None:
    """ValueError unless `mask` has square blocks and is for seq_len queries and keys (a mask for
    other lengths would be clamped or truncated silently)."""
    q_block, kv_block = mask.BLOCK_SIZE
    if q_block != kv_block:
        raise ValueError(f"BlockMask must use square blocks, got BLOCK_SIZE={mask.BLOCK_SIZE}")
    if tuple(mask.seq_lengths) != (seq_len, seq_len):
        raise ValueError(f"BlockMask is for (Q_LEN, KV_LEN) = {tuple(mask.seq_lengths)}, but q, k, v have "
                         f"{seq_len} tokens: build it for ({seq_len}, {seq_len})")
    n = -(-seq_len // kv_block)
    for side, blocks in (("query", mask.kv_num_blocks.shape[-1]), ("KV", mask.kv_indices.shape[-1])):
        if blocks != n:
            raise ValueError(f"BlockMask has {blocks} {side} blocks of {kv_block}, "
                             f"but a sequence of {seq_len} needs {n}")


def _check_block_size(block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive number of tokens, got {block_size}")


def random_block_index(
    batch: int,
    heads: int,
    seq_len: int,
    block_size: int,
    density: float,
    *,
    keep_diagonal: bool = True,
    generator: torch.Generator | None = None,
    per_head_density: Sequence[float] | None = None,
    device: torch.device | str | None = None,
) -> BlockIndex:
    """Uniformly random KV blocks per query block: round(density * NKV) of them (at least 1),
    or `per_head_density[h]` for head h. With `keep_diagonal` the query block's own KV
    block is always among them. Sampled on the generator's device, returned on `device`."""
    _check_block_size(block_size)
    n = -(-seq_len // block_size)
    densities = per_head_density if per_head_density is not None else [density] * heads
    if len(densities) != heads:
        raise ValueError(f"per_head_density has {len(densities)} entries for {heads} heads")
    per_head = [min(n, max(1, round(d * n))) for d in densities]
    sample_device = generator.device if generator is not None else device
    scores = torch.rand(batch, heads, n, n, generator=generator, device=sample_device)  # (B, H, NQ, NKV)
    if keep_diagonal:
        scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)  # above every uniform sample
    # -- the highest-scoring blocks, then the first per_head[h] of them, ascending
    top = scores.topk(max(per_head), dim=-1).indices  # (B, H, NQ, MAXSEL)
    counts = torch.tensor(per_head, dtype=torch.int32, device=top.device).view(1, heads, 1)
    counts = counts.expand(batch, heads, n).contiguous()
    valid = torch.arange(top.shape[-1], device=top.device) < counts[..., None]
    top = torch.where(valid, top, n).sort(dim=-1).values
    indices = torch.where(top == n, 0, top).to(torch.int32)
    return BlockIndex(
        counts=counts.to(device or top.device),
        indices=indices.contiguous().to(device or top.device),
        block_size=block_size,
        seq_len=seq_len,
    )
