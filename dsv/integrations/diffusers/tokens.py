"""What the DSV processors need besides q, k, v: the latent token grid, the rotary tables in
the predictor's layout, and the block lists of a joint text + video sequence.

    grid = TokenGrid(cube=(4, 4, 4), block_size=64)      # shared by the layers' processors
    grid.set((21, 30, 52))                               # by a hook on the patch embedding, per forward
    padding = grid.padding()                             # CubePadding of a partial grid, else None
    cos, sin = predictor_rope(cos, sin, model_axis_pairs=(8, 12, 12))   # (S, D/2) in Rotary3D's layout
    index = with_text_blocks(video_index, seq_len)       # text rows and columns kept

A grid that is not a multiple of the cube is padded per axis (dsv/ops/layout.py): `padding()`
says which tokens of the cube order are padding, and the kernels mask them.

Joint attention: the processor puts the N video tokens (cube order, N a multiple of the block)
first and the L text tokens after them, so the text fills the trailing ceil(L / block) blocks
(the last one partial: the kernels mask keys past S). Every video query block keeps its
selected video blocks plus every text block; every text query block keeps every block. So the
text rows and columns are dense and only the video-video part is sparse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv.models.dit import Rotary3D
from dsv.ops.block_index import BlockIndex
from dsv.ops.layout import CubePadding, is_padded, padded_grid

Dims = tuple[int, int, int]


@dataclass(kw_only=True)
class TokenGrid:
    """The latent token grid (frames, height, width after patching) of the forward being run."""

    cube: Dims
    block_size: int
    grid: Dims | None = field(default=None, init=False)

    def set(self, grid: Dims) -> None:
        """Record the grid of this forward; ValueError (one line) where DSV's layout cannot take it."""
        grid = tuple(int(g) for g in grid)
        if is_padded(grid, self.cube):  # partial cubes: padding tokens, masked in the kernels (dsv/ops/layout.py)
            if prod(self.cube) % self.block_size:
                raise ValueError(f"DSV: latent token grid {grid} (frames, height, width after patching) is padded "
                                 f"to {padded_grid(grid, self.cube)} by the cube {self.cube}, and blocks of "
                                 f"{self.block_size} tokens would span several cubes: pick a block_size that "
                                 f"divides prod(cube)={prod(self.cube)}")
        elif prod(grid) % self.block_size:
            raise ValueError(f"DSV: {prod(grid)} video tokens (grid {grid}) are not a multiple of "
                             f"block_size={self.block_size}: pick a block_size that divides prod(cube)={prod(self.cube)}")
        self.grid = grid

    def current(self) -> Dims:
        if self.grid is None:
            raise RuntimeError("DSV processor ran before the patch embedding: call the transformer, not a block")
        return self.grid

    def padding(self, text_len: int = 0) -> CubePadding | None:
        """The padding tokens of the current grid's cube order (`text_len` real text tokens after
        it), None where it has none."""
        grid = self.current()
        return CubePadding(grid, self.cube, tail=text_len) if is_padded(grid, self.cube) else None


def predictor_rope(cos: Tensor, sin: Tensor, model_axis_pairs: Dims) -> tuple[Tensor, Tensor]:
    """cos, sin (S, D/2): the model's per-pair rotary angles, its pairs ordered t, h, w with
    `model_axis_pairs` pairs each, each axis from its highest frequency down (Wan's and
    CogVideoX's layout). Returns the tables in Rotary3D's split of D (what the predictor's
    `rotary_pairs` index): pair i of an axis with m pairs takes the model's pair of the same
    relative rank, round(i * m' / m), i.e. (nearly) the same frequency theta^(-i/m). Where the
    splits agree (Wan) the tables are returned as they are."""
    head_dim = 2 * cos.shape[-1]
    dsv_pairs = tuple(d // 2 for d in Rotary3D.axis_dims(head_dim))
    if tuple(model_axis_pairs) == dsv_pairs:
        return cos, sin
    columns, start = [], 0
    for m_dsv, m_model in zip(dsv_pairs, model_axis_pairs):
        rank = (torch.arange(m_dsv) * m_model / m_dsv).round().long().clamp(max=m_model - 1)
        columns.append(start + rank)
        start += m_model
    columns = torch.cat(columns).to(cos.device)
    return cos[:, columns], sin[:, columns]


def with_text_blocks(video: BlockIndex, seq_len: int) -> BlockIndex:
    """video: the selection (B, H, NV) of the video tokens, the first NV blocks of a sequence of
    seq_len tokens whose tail is text -> the selection (B, H, NB) over the whole sequence: each
    video query block lists its video blocks then every text block, each text query block every block."""
    block = video.block_size
    b, h, nv, width = video.indices.shape
    n = -(-seq_len // block)
    nt = n - nv  # text blocks, the last partial
    full = max(width + nt, n)
    slot = torch.arange(full, device=video.indices.device)
    counts = video.counts[..., None].long()  # (B, H, NV, 1)
    text_id = nv + slot - counts  # text block ids follow a list's video ids: still ascending
    video_rows = torch.where(slot < counts, F.pad(video.indices, (0, full - width)),
                             torch.where(slot < counts + nt, text_id, 0))  # (B, H, NV, full)
    text_rows = torch.where(slot < n, slot, 0).expand(b, h, nt, full)  # (B, H, NT, full)
    indices = torch.cat([video_rows, text_rows], 2).to(torch.int32)
    counts = torch.cat([video.counts + nt, torch.full_like(video.counts[:, :, :1], n).expand(b, h, nt)], 2)
    return BlockIndex(counts=counts.contiguous(), indices=indices.contiguous(), block_size=block, seq_len=seq_len)
