"""3D-cube token order: every run of prod(cube) consecutive tokens is one small cube of the video.

The tokens of a video form a grid (T, H, W) after patchify. Raster order (t, h, w) puts the
neighbours of a token in time or height far apart in the sequence, so a block of the
attention kernel (128 consecutive tokens) would be a thin strip of one frame. In cube order
the grid is cut into ct x ch x cw cubes; the cubes follow each other in raster order over the
cube grid (T/ct, H/ch, W/cw), and the tokens of one cube follow each other in raster order
inside it. With cube (4, 4, 4) a 64-token block, or a 128-token kernel block (two cubes
along w), is a compact 3D neighbourhood, so neighbouring queries share their critical keys.

    perm = cube_permutation(grid, cube)      # (N,) raster index of the i-th token in cube order
    tokens_cube = tokens_raster[:, perm]     # == to_cube_order(tokens_raster, grid, cube)
    tokens_raster = tokens_cube[:, inverse_cube_permutation(grid, cube)]  # == from_cube_order(...)

to_cube_order / from_cube_order move the data with one reshape + permute copy (as cheap as a
gather, and no index tensor); the cached permutations serve callers that need indices (RoPE
positions, block-to-cube maps).

Grids whose dims are not multiples of the cube dims are rejected, not padded: padding tokens
would have to be masked out in every attention kernel (dense, sparse, selection, context
parallel), which costs more than choosing a compatible resolution.
"""
from __future__ import annotations

from functools import lru_cache
from math import prod

import torch
from torch import Tensor

Dims = tuple[int, int, int]


def _check(grid: Dims, cube: Dims) -> tuple[Dims, Dims]:
    grid, cube = tuple(int(g) for g in grid), tuple(int(c) for c in cube)
    if len(grid) != 3 or len(cube) != 3:
        raise ValueError(f"grid and cube must be (t, h, w) triples, got grid={grid}, cube={cube}")
    if min(grid) < 1 or min(cube) < 1:
        raise ValueError(f"grid and cube dims must be >= 1, got grid={grid}, cube={cube}")
    bad = [name for name, g, c in zip("thw", grid, cube) if g % c]
    if bad:
        fix = ", ".join(f"{n}: {g} -> a multiple of {c}" for n, g, c in zip("thw", grid, cube) if g % c)
        raise ValueError(
            f"token grid {grid} (t, h, w) is not divisible by cube {cube} along {'/'.join(bad)}. "
            f"Fix: change the frames/resolution so the token grid becomes divisible ({fix}), "
            f"or pick a cube whose dims divide the grid. (We raise rather than pad: padding "
            f"tokens would need masking in every attention kernel.)"
        )
    return grid, cube


@lru_cache(maxsize=64)
def _permutations(grid: Dims, cube: Dims, device: torch.device) -> tuple[Tensor, Tensor]:
    (t, h, w), (ct, ch, cw) = grid, cube
    raster = torch.arange(t * h * w, device=device).view(t // ct, ct, h // ch, ch, w // cw, cw)
    perm = raster.permute(0, 2, 4, 1, 3, 5).reshape(-1)  # (N,) cube grid outer, in-cube inner
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=device)
    return perm, inv


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def cube_permutation(grid: Dims, cube: Dims, device=None) -> Tensor:
    """(N,) long: raster index of the i-th token in cube order, N = prod(grid).

    Cached per (grid, cube, device); the returned tensor is shared, do not modify it in place.
    """
    grid, cube = _check(grid, cube)
    return _permutations(grid, cube, _device(device))[0]


def inverse_cube_permutation(grid: Dims, cube: Dims, device=None) -> Tensor:
    """(N,) long: cube-order position of the raster token i (the inverse of `cube_permutation`)."""
    grid, cube = _check(grid, cube)
    return _permutations(grid, cube, _device(device))[1]


def cube_coordinates(grid: Dims, cube: Dims, device=None) -> Tensor:
    """(N, 3) long: grid coordinates (t, h, w) of the tokens, in cube order."""
    grid, cube = _check(grid, cube)
    axes = [torch.arange(g, device=_device(device)) for g in grid]
    raster = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).view(1, -1, 3)  # (1, N, 3)
    return to_cube_order(raster, grid, cube)[0]


def _check_tokens(x: Tensor, grid: Dims) -> None:
    if x.dim() < 2 or x.shape[1] != prod(grid):
        raise ValueError(f"expected x of shape (B, N, ...) with N = prod(grid {tuple(grid)}) = "
                         f"{prod(grid)}, got {tuple(x.shape)}")


def to_cube_order(x: Tensor, grid: Dims, cube: Dims) -> Tensor:
    """x (B, N, ...) in raster order -> (B, N, ...) in cube order; equal to x[:, cube_permutation(...)].

    Done as a reshape + permute (one copy kernel, no index tensor), which torch.compile traces
    without a cache lookup."""
    (t, h, w), (ct, ch, cw) = _check(grid, cube)
    _check_tokens(x, grid)
    b, rest = x.shape[0], x.shape[2:]
    x = x.reshape(b, t // ct, ct, h // ch, ch, w // cw, cw, *rest)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, *range(7, x.dim()))  # (B, T/ct, H/ch, W/cw, ct, ch, cw, ...)
    return x.reshape(b, t * h * w, *rest)


def from_cube_order(x: Tensor, grid: Dims, cube: Dims) -> Tensor:
    """x (B, N, ...) in cube order -> (B, N, ...) in raster order; the exact inverse of to_cube_order."""
    (t, h, w), (ct, ch, cw) = _check(grid, cube)
    _check_tokens(x, grid)
    b, rest = x.shape[0], x.shape[2:]
    x = x.reshape(b, t // ct, h // ch, w // cw, ct, ch, cw, *rest)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, *range(7, x.dim()))  # (B, T/ct, ct, H/ch, ch, W/cw, cw, ...)
    return x.reshape(b, t * h * w, *rest)
