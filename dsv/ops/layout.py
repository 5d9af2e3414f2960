"""3D-cube token order: every run of prod(cube) consecutive tokens is one small cube of the video.

The tokens of a video form a grid (T, H, W) after patchify. Raster order (t, h, w) puts the
neighbours of a token in time or height far apart in the sequence, so a block of the
attention kernel (128 consecutive tokens) would be a thin strip of one frame. In cube order
the grid is cut into ct x ch x cw cubes; the cubes follow each other in raster order over the
cube grid (T/ct, H/ch, W/cw), and the tokens of one cube follow each other in raster order
inside it. With cube (4, 4, 4) a 64-token block, or a 128-token kernel block (two cubes
along w), is a compact 3D neighbourhood, so neighbouring queries share their critical keys.

    x_cube = to_cube_order(x, grid, cube)        # (B, N, ...) raster -> (B, Np, ...) cube order
    x = from_cube_order(x_cube, grid, cube)      # and back: exact (torch.equal)
    valid = block_valid_counts(grid, cube, 64)   # (Np / 64,) int32 real tokens per block
    padding = CubePadding(grid, cube)            # what a model hands its attention backend
    joint = CubePadding(grid, cube, tail=226)    # the same, 226 text tokens after the video

Any grid: real latent grids are rarely multiples of the cube (Wan 480p, 81 frames: 21 x 30 x 52
after patching). Each axis is padded up to a multiple of the cube, `padded_grid`, so the
sequence holds Np = prod(padded grid) >= N tokens, and every cube holds at least one real token
(an axis is padded by less than one cube). Inside each cube the real tokens come first, in
raster order, and its padding tokens last. So the real tokens of any block that is a run of one
cube (a block dividing prod(cube) tokens, the default block being one cube) are a prefix of it,
and one int per block, its `valid` count, describes the padding exactly: the attention kernels
mask key columns >= valid[kv_block] with one load per KV tile, and a query row >= valid[q_block]
gets output 0 and no gradient (dsv/ops/sparse_attention). The alternative, a ragged last cube
per axis, would give blocks of varying length and break the fixed-size tiles every kernel and
the block selection rely on; padding costs at most (1 + (c - 1) / g) per axis in tokens
(Wan 480p with cube (4, 4, 4): 24 x 32 x 52 / (21 x 30 x 52) = 1.22x).
Padding tokens are zeros on the way in and dropped on the way out.

to_cube_order / from_cube_order are one gather (index_select, or one scatter into zeros on
padded grids) each, which runs at the speed of a plain copy (H100, 2026-11-22,
(1, 32768, 2048) bf16: 0.095 ms gather, 0.092 ms clone, 0.224 ms for the equivalent 6-D
reshape + permute copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily

BLOCK_SIZE = 64  # tokens per attention block by default: one cube of the default (4, 4, 4) layout

Dims = tuple[int, int, int]


class _Layout(NamedTuple):
    perm: Tensor  # (Np,) long: padded-grid raster index of the i-th token in cube order
    inv: Tensor  # (N,) long: cube-order position of the real raster token i
    valid: Tensor  # (Np,) bool: the i-th token in cube order is a real token


def _check(grid: Dims, cube: Dims) -> tuple[Dims, Dims]:
    grid, cube = tuple(int(g) for g in grid), tuple(int(c) for c in cube)
    if len(grid) != 3 or len(cube) != 3:
        raise ValueError(f"grid and cube must be (t, h, w) triples, got grid={grid}, cube={cube}")
    if min(grid) < 1 or min(cube) < 1:
        raise ValueError(f"grid and cube dims must be >= 1, got grid={grid}, cube={cube}")
    return grid, cube


def padded_grid(grid: Dims, cube: Dims) -> Dims:
    """Each axis of `grid` rounded up to a multiple of the cube's."""
    grid, cube = _check(grid, cube)
    return tuple(-(-g // c) * c for g, c in zip(grid, cube))


def is_padded(grid: Dims, cube: Dims) -> bool:
    """Whether the cube order of `grid` holds padding tokens."""
    return padded_grid(grid, cube) != tuple(int(g) for g in grid)


def _build(grid: Dims, cube: Dims, device: torch.device) -> _Layout:
    (t, h, w), (ct, ch, cw) = grid, cube
    pt, ph, pw = padded_grid(grid, cube)
    raster = torch.arange(pt * ph * pw, device=device).view(pt // ct, ct, ph // ch, ch, pw // cw, cw)
    perm = raster.permute(0, 2, 4, 1, 3, 5).reshape(-1, ct * ch * cw)  # (cubes, tokens per cube)
    pos_t, pos_h, pos_w = perm // (ph * pw), perm // pw % ph, perm % pw
    valid = (pos_t < t) & (pos_h < h) & (pos_w < w)
    # -- real tokens first inside each cube (a stable sort keeps them in raster order)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    perm, valid = perm.gather(-1, order).reshape(-1), valid.gather(-1, order).reshape(-1)  # (Np,)
    real = (perm // (ph * pw) * h + perm // pw % ph) * w + perm % pw  # raster index in the real grid
    n = t * h * w
    # -- padding slots all write to the one slot past the end, which is dropped (no boolean indexing:
    #    the shapes stay data-independent for fake tensors and torch.compile)
    inv = torch.empty(n + 1, dtype=torch.long, device=device)
    inv.scatter_(0, torch.where(valid, real, n), torch.arange(perm.numel(), device=device))
    return _Layout(perm, inv[:n], valid)


_cached = lru_cache(maxsize=64)(_build)


def _layout(grid: Dims, cube: Dims, device) -> _Layout:
    grid, cube = _check(grid, cube)
    device = torch.device("cpu") if device is None else torch.device(device)
    # Under torch.compile build inside the graph; under a fake-tensor mode (tracing, e.g. echosim)
    # the result is fake and must never enter the cache that real calls read.
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None:
        return _build(grid, cube, device)
    return _cached(grid, cube, device)


def cube_permutation(grid: Dims, cube: Dims, device=None) -> Tensor:
    """(Np,) long: raster index, in the padded grid, of the i-th token in cube order.

    Cached per (grid, cube, device); the returned tensors are shared, do not modify them in place.
    """
    return _layout(grid, cube, device).perm


def inverse_cube_permutation(grid: Dims, cube: Dims, device=None) -> Tensor:
    """(N,) long: cube-order position of the real raster token i (the inverse of
    `cube_permutation` on a grid without padding)."""
    return _layout(grid, cube, device).inv


def valid_tokens(grid: Dims, cube: Dims, device=None) -> Tensor:
    """(Np,) bool: which tokens of the cube order are real (False: padding)."""
    return _layout(grid, cube, device).valid


def cube_coordinates(grid: Dims, cube: Dims, device=None) -> Tensor:
    """(Np, 3) long: padded-grid coordinates (t, h, w) of the tokens, in cube order."""
    perm = cube_permutation(grid, cube, device)
    _, h, w = padded_grid(grid, cube)
    return torch.stack((perm // (h * w), perm // w % h, perm % w), dim=-1)


@lru_cache(maxsize=64)
def _block_valid_counts(grid: Dims, cube: Dims, block_size: int) -> Tensor:
    with unset_fake_temporarily():  # built from real CPU tensors even while tracing with fake ones
        valid = valid_tokens(grid, cube)
        return _counts_of_prefixes(valid, grid, cube, block_size)


def _counts_of_prefixes(valid: Tensor, grid: Dims, cube: Dims, block_size: int) -> Tensor:
    n = -(-valid.numel() // block_size)
    blocks = torch.nn.functional.pad(valid, (0, n * block_size - valid.numel())).view(n, block_size)
    counts = blocks.sum(-1, dtype=torch.int32)  # (NB,)
    if not torch.equal(blocks, torch.arange(block_size) < counts[:, None]):
        raise ValueError(
            f"token grid {grid} is padded to {padded_grid(grid, cube)} by cube {cube}, and blocks of {block_size} "
            f"tokens span several cubes, so their real tokens are no prefix of the block: use a block size "
            f"that divides prod(cube) = {prod(cube)}, or a cube of {block_size} tokens")
    return counts


def block_valid_counts(grid: Dims, cube: Dims, block_size: int, device=None) -> Tensor:
    """(ceil(Np / block_size),) int32: real tokens of each block of the cube order; they are the
    first of their block. A block of a few cubes on a padded grid has no such prefix: ValueError."""
    grid, cube = _check(grid, cube)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    counts = _block_valid_counts(grid, cube, int(block_size))
    return counts if device is None else counts.to(device)


@lru_cache(maxsize=64)
def _real_positions(grid: Dims, cube: Dims, device: torch.device) -> Tensor:
    return inverse_cube_permutation(grid, cube, device).sort().values


def _check_tokens(x: Tensor, tokens: int, what: str) -> None:
    if x.dim() < 2 or x.shape[1] != tokens:
        raise ValueError(f"expected x of shape (B, N, ...) with N = {what} = {tokens}, got {tuple(x.shape)}")


def to_cube_order(x: Tensor, grid: Dims, cube: Dims) -> Tensor:
    """x (B, N, ...) in raster order -> (B, Np, ...) in cube order, padding tokens 0 (one gather,
    or one scatter into zeros on a padded grid)."""
    _check_tokens(x, prod(grid), f"prod(grid {tuple(grid)})")
    layout = _layout(grid, cube, x.device)
    if layout.perm.numel() == layout.inv.numel():
        return x.index_select(1, layout.perm)
    out = x.new_zeros(x.shape[0], layout.perm.numel(), *x.shape[2:])
    return out.index_copy(1, layout.inv, x)


def from_cube_order(x: Tensor, grid: Dims, cube: Dims) -> Tensor:
    """x (B, Np, ...) in cube order -> (B, N, ...) in raster order, padding dropped (one gather)."""
    _check_tokens(x, prod(padded_grid(grid, cube)), f"prod(padded grid {padded_grid(grid, cube)})")
    return x.index_select(1, inverse_cube_permutation(grid, cube, x.device))


def grid_to_cube_order(x: Tensor, cube: Dims) -> Tensor:
    """x (B, T, H, W, ...) -> (B, Np, ...) in cube order (the grid is x's)."""
    grid = tuple(x.shape[1:4])
    return to_cube_order(x.flatten(1, 3), grid, cube)


def cube_order_to_grid(x: Tensor, grid: Dims, cube: Dims) -> Tensor:
    """x (B, Np, ...) in cube order -> (B, T, H, W, ...) of the real grid."""
    return from_cube_order(x, grid, cube).unflatten(1, tuple(grid))


@dataclass(frozen=True)
class CubePadding:
    """The padding of a partial grid's cube order, as the model hands it to its attention
    backend: each backend asks for the form it masks with. `tail` real tokens may follow the
    video's cube order in the sequence (the text of a joint text + video attention)."""

    grid: Dims  # the real token grid
    cube: Dims
    tail: int = 0

    def tokens(self, device=None) -> Tensor:
        """(Np + tail,) bool: real tokens of the sequence (`valid_tokens`, then the tail's)."""
        valid = valid_tokens(self.grid, self.cube, device)
        return torch.cat([valid, valid.new_ones(self.tail)]) if self.tail else valid

    def positions(self, device=None) -> Tensor:
        """(N + tail,) long: sequence positions of the real tokens, ascending."""
        device = torch.device("cpu") if device is None else torch.device(device)
        real = _real_positions(self.grid, self.cube, device)
        if not self.tail:
            return real
        start = prod(padded_grid(self.grid, self.cube))
        return torch.cat([real, torch.arange(start, start + self.tail, device=device)])

    def block_counts(self, block_size: int, device=None) -> Tensor:
        """(NB,) int32: real tokens per block, the first of each (`block_valid_counts`); the
        tail's blocks are full but for its last."""
        counts = block_valid_counts(self.grid, self.cube, block_size)
        if self.tail:
            if prod(padded_grid(self.grid, self.cube)) % block_size:
                raise ValueError(f"the cube order of grid {self.grid} by cube {self.cube} does not end on a block "
                                 f"of {block_size} tokens, so no tail can follow it: use a block size that "
                                 f"divides prod(cube) = {prod(self.cube)}")
            tail = torch.full((-(-self.tail // block_size),), block_size, dtype=torch.int32)
            tail[-1] = self.tail - block_size * (tail.numel() - 1)
            counts = torch.cat([counts, tail])
        return counts if device is None else counts.to(device)
