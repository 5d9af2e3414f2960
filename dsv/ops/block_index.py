"""Compact per-query-block lists of selected key/value blocks, and the BlockMask boundary.

A FlexAttention `BlockMask` stores a (S/block)-wide index row per query block and head;
at 128k-512k tokens that is hundreds of MB per layer. Inside the training path we keep
only the selected blocks, `max_selected` wide, and build a `BlockMask` only where a
caller asks for one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask


@dataclass(frozen=True)
class BlockIndex:
    """Which key/value blocks each (batch, head, query block) attends to.

    counts:  (B, H, NQ) int32, number of selected KV blocks, >= 1.
    indices: (B, H, NQ, MAXSEL) int32, selected KV block ids in ascending order;
             entries past `counts` are padding (0) and are never read.
    """

    counts: Tensor
    indices: Tensor
    block_size: int
    seq_len: int

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    def density(self) -> float:
        """Fraction of (query block, KV block) tiles that are computed."""
        return self.counts.float().mean().item() / self.num_blocks

    def to_block_mask(self) -> BlockMask:
        n = self.num_blocks
        b, h, nq, _ = self.indices.shape
        wide = torch.zeros(b, h, nq, n, dtype=torch.int32, device=self.indices.device)
        wide[..., : self.indices.shape[-1]] = self.indices
        return BlockMask.from_kv_blocks(
            self.counts, wide, BLOCK_SIZE=self.block_size, seq_lengths=(self.seq_len, self.seq_len)
        )

    @classmethod
    def from_block_mask(cls, mask: BlockMask, seq_len: int) -> "BlockIndex":
        """Union of the mask's partial and full KV blocks (their mask_mod is ignored: the
        blocks are taken whole), sorted ascending, trimmed to the longest list."""
        q_block, kv_block = mask.BLOCK_SIZE
        if q_block != kv_block:
            raise ValueError(f"BlockMask must use square blocks, got BLOCK_SIZE={mask.BLOCK_SIZE}")
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
