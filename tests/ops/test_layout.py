"""3D-cube token order: exact round trips, permutation structure, cube geometry, padding of
partial grids, error text."""
from itertools import product
from math import prod

import pytest
import torch

from dsv.ops.layout import (CubePadding, block_valid_counts, cube_coordinates, cube_order_to_grid, cube_permutation,
                            from_cube_order, grid_to_cube_order, inverse_cube_permutation, is_padded, padded_grid,
                            to_cube_order, valid_tokens)

# odd sizes: cube dims 1, 3, 5, 7; grids with one cube along an axis; a single token
CASES = [
    ((3, 5, 7), (1, 1, 7)),
    ((6, 10, 9), (3, 5, 3)),
    ((5, 3, 14), (5, 1, 2)),
    ((2, 6, 6), (2, 3, 3)),
    ((8, 8, 8), (4, 4, 4)),
    ((1, 1, 1), (1, 1, 1)),
]


@pytest.mark.parametrize("grid,cube", CASES)
def test_round_trip_is_exact(grid, cube):
    x = torch.randn(2, prod(grid), 3, 5)
    y = to_cube_order(x, grid, cube)
    assert torch.equal(y, x[:, cube_permutation(grid, cube)])
    assert torch.equal(from_cube_order(y, grid, cube), x)
    assert torch.equal(to_cube_order(from_cube_order(x, grid, cube), grid, cube), x)


@pytest.mark.parametrize("grid,cube", CASES)
def test_perm_is_a_permutation_and_inverse_inverts(grid, cube):
    n = prod(grid)
    perm, inv = cube_permutation(grid, cube), inverse_cube_permutation(grid, cube)
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(inv[perm], torch.arange(n))
    assert torch.equal(perm[inv], torch.arange(n))


@pytest.mark.parametrize("grid,cube", CASES)
def test_every_block_of_prod_cube_tokens_is_one_cube(grid, cube):
    t, h, w = grid
    block = prod(cube)
    perm = cube_permutation(grid, cube)
    # coordinates from the raster index, independently of cube_coordinates
    coords = torch.stack((perm // (h * w), perm // w % h, perm % w), dim=-1).view(-1, block, 3)
    assert torch.equal(cube_coordinates(grid, cube).view(-1, block, 3), coords)
    offsets = torch.tensor(list(product(*(range(c) for c in cube))))  # in-cube raster order
    origins = torch.tensor(list(product(*(range(0, g, c) for g, c in zip(grid, cube)))))  # cubes in raster order
    assert coords.shape[0] == origins.shape[0]
    for b in range(coords.shape[0]):
        assert torch.equal(coords[b], origins[b] + offsets), f"block {b} is not the cube at {origins[b].tolist()}"


def test_cached_and_per_device():
    a = cube_permutation((4, 4, 4), (2, 2, 2))
    assert a is cube_permutation((4, 4, 4), (2, 2, 2), device="cpu")
    assert a is not cube_permutation((4, 4, 4), (4, 4, 4))


# partial grids: cubes cut on every axis, an axis shorter than one cube, one a token past a cube
PARTIAL = [
    ((5, 6, 7), (4, 4, 4)),
    ((3, 10, 13), (2, 4, 4)),
    ((3, 4, 5), (4, 4, 4)),
    ((21, 30, 52), (4, 4, 4)),  # Wan 480p, 81 frames
]


@pytest.mark.parametrize("grid,cube", PARTIAL)
def test_partial_grid_round_trip_is_exact_and_pads_with_zeros(grid, cube):
    x = torch.randn(2, prod(grid), 3)
    y = to_cube_order(x, grid, cube)  # (B, Np, 3)
    real = valid_tokens(grid, cube)
    assert y.shape == (2, prod(padded_grid(grid, cube)), 3) and is_padded(grid, cube)
    assert torch.equal(from_cube_order(y, grid, cube), x)
    assert y[:, ~real].eq(0).all() and int(real.sum()) == prod(grid)
    grid_form = x.view(2, *grid, 3)  # (B, T, H, W, C)
    assert torch.equal(grid_to_cube_order(grid_form, cube), y)
    assert torch.equal(cube_order_to_grid(y, grid, cube), grid_form)


@pytest.mark.parametrize("grid,cube", PARTIAL)
def test_partial_grid_cubes_hold_their_real_tokens_first(grid, cube):
    """Every run of prod(cube) tokens is the cube of the padded grid; its real tokens (coordinates
    inside the grid) come first in raster order, then its padding, also in raster order."""
    block = prod(cube)
    coords = cube_coordinates(grid, cube).view(-1, block, 3)
    real = valid_tokens(grid, cube).view(-1, block)
    inside = (coords < torch.tensor(grid)).all(-1)
    assert torch.equal(real, inside)
    offsets = torch.tensor(list(product(*(range(c) for c in cube))))
    origins = torch.tensor(list(product(*(range(0, p, c) for p, c in zip(padded_grid(grid, cube), cube)))))
    for b in range(coords.shape[0]):
        expected = origins[b] + offsets  # the cube in raster order
        is_real = (expected < torch.tensor(grid)).all(-1)
        assert torch.equal(coords[b], torch.cat([expected[is_real], expected[~is_real]]))
        assert is_real.any(), "every cube holds a real token"
    perm = cube_permutation(grid, cube)
    assert torch.equal(perm.sort().values, torch.arange(perm.numel()))
    assert torch.equal(inverse_cube_permutation(grid, cube).sort().values, torch.arange(perm.numel())[real.view(-1)])


def test_block_valid_counts_are_the_real_prefix_of_each_block():
    grid, cube = (5, 6, 7), (4, 4, 4)  # cubes of 4 x 4 x 4 at t, h, w in {0, 4}: real 4|1 x 4|2 x 4|3
    assert block_valid_counts(grid, cube, 64).tolist() == [64, 48, 32, 24, 16, 12, 8, 6]
    halves = block_valid_counts(grid, cube, 32).tolist()
    assert halves[:4] == [32, 32, 32, 16] and halves[-2:] == [6, 0]  # a half cube of padding only
    assert block_valid_counts((8, 8, 8), cube, 128).tolist() == [128] * 4  # whole cubes: any block
    with pytest.raises(ValueError, match=r"blocks of 128 tokens span several cubes.*divides prod\(cube\) = 64"):
        block_valid_counts(grid, cube, 128)


def test_a_tail_of_text_tokens_after_the_cube_order_is_all_real():
    grid, cube = (5, 6, 7), (4, 4, 4)  # 512 tokens in cube order, 210 real
    joint = CubePadding(grid, cube, tail=70)  # 70 text tokens: one full block of 64, then 6
    video = CubePadding(grid, cube)
    assert torch.equal(joint.tokens(), torch.cat([video.tokens(), torch.ones(70, dtype=torch.bool)]))
    assert torch.equal(joint.positions(), torch.cat([video.positions(), torch.arange(512, 582)]))
    assert torch.equal(joint.positions(), joint.tokens().nonzero()[:, 0])
    assert joint.block_counts(64).tolist() == [64, 48, 32, 24, 16, 12, 8, 6, 64, 6]
    assert joint.block_counts(32).tolist()[-3:] == [32, 32, 6]
    with pytest.raises(ValueError, match=r"block size that divides prod\(cube\) = 8"):
        CubePadding((4, 4, 4), (2, 2, 2), tail=3).block_counts(128)  # 64 tokens: no whole block of 128


def test_wrong_token_count_is_rejected():
    with pytest.raises(ValueError, match=r"N = prod\(grid \(2, 2, 2\)\) = 8, got \(1, 7, 4\)"):
        to_cube_order(torch.randn(1, 7, 4), (2, 2, 2), (1, 1, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    grid, cube = (4, 8, 12), (2, 4, 4)
    x = torch.randn(2, prod(grid), 8)
    y = to_cube_order(x.cuda(), grid, cube)
    partial = to_cube_order(x[:, : 4 * 8 * 11].cuda(), (4, 8, 11), cube)
    assert torch.equal(partial.cpu(), to_cube_order(x[:, : 4 * 8 * 11], (4, 8, 11), cube))
    assert y.device.type == "cuda" and torch.equal(y.cpu(), to_cube_order(x, grid, cube))
    assert torch.equal(from_cube_order(y, grid, cube).cpu(), x)


def test_fake_mode_never_poisons_the_cache():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    grid, cube = (2, 6, 4), (1, 3, 2)
    with FakeTensorMode():
        assert isinstance(cube_permutation(grid, cube), FakeTensor)
    perm = cube_permutation(grid, cube)
    assert not isinstance(perm, FakeTensor)
    assert torch.equal(perm.sort().values, torch.arange(48))
