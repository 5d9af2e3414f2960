"""3D-cube token order: exact round trips, permutation structure, cube geometry, error text."""
from itertools import product
from math import prod

import pytest
import torch

from dsv.ops.layout import (cube_coordinates, cube_permutation, from_cube_order, inverse_cube_permutation,
                            to_cube_order)

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


def test_indivisible_grid_error_names_grid_cube_and_fix():
    with pytest.raises(ValueError) as e:
        cube_permutation((3, 5, 8), (2, 2, 4))
    msg = str(e.value)
    assert "(3, 5, 8)" in msg and "(2, 2, 4)" in msg and "t/h" in msg
    assert "t: 3 -> a multiple of 2" in msg and "h: 5 -> a multiple of 2" in msg and "w:" not in msg
    assert "Fix" in msg and "pad" in msg


def test_wrong_token_count_is_rejected():
    with pytest.raises(ValueError, match=r"N = prod\(grid \(2, 2, 2\)\) = 8, got \(1, 7, 4\)"):
        to_cube_order(torch.randn(1, 7, 4), (2, 2, 2), (1, 1, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    grid, cube = (4, 8, 12), (2, 4, 4)
    x = torch.randn(2, prod(grid), 8)
    y = to_cube_order(x.cuda(), grid, cube)
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
