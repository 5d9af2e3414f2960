"""Block-sparse attention on partial token grids: the padding tokens of the cube order
(dsv/ops/layout.py) are masked by every backend, forward and backward, against float64."""
import pytest
import torch

from dsv.ops.block_index import BlockIndex, random_block_index
from dsv.ops.layout import block_valid_counts, valid_tokens
from dsv.ops.sparse_attention import dense_masked_attention, sparse_attention, sparse_attention_index
from tests.ops.helpers import assert_close_to_fp64, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = torch.bfloat16 if torch.cuda.is_available() else torch.float16  # interpreter: no bf16

# (grid, cube, block, density): partial cubes on every axis; an axis shorter than one cube and
# one a token past a cube; blocks smaller than a cube, so that some are all padding: lists that
# walk an all-padding block before real ones, and lists of all-padding blocks only
CASES = {
    "5x6x7-cube4-block64": ((5, 6, 7), (4, 4, 4), 64, 0.5),
    "3x10x13-cube2x4x4-block32": ((3, 10, 13), (2, 4, 4), 32, 0.4),
    "3x4x5-one-cube-short-block64": ((3, 4, 5), (4, 4, 4), 64, 1.0),
    "5x6x7-block16": ((5, 6, 7), (4, 4, 4), 16, 0.3),
    "5x6x7-block16-diagonal-only": ((5, 6, 7), (4, 4, 4), 16, 0.0),
}


def _problem(seed, grid, cube, block, density, dtype, heads=2, head_dim=32, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    valid = block_valid_counts(grid, cube, block, device)
    seq_len = valid_tokens(grid, cube).numel()
    index = random_block_index(1, heads, seq_len, block, density, generator=generator, device=device)
    q, k, v, do = (torch.randn(1, heads, seq_len, head_dim, generator=generator).to(device, dtype) for _ in range(4))
    return index, valid, q, k, v, do


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_on_padded_grids_matches_fp64(case):
    index, valid, q, k, v, do = _problem(0, *case, LOW_PRECISION)
    ours = run(lambda *t: sparse_attention_index(*t, index, backend="triton", valid=valid), q, k, v, do)
    assert_close_to_fp64(ours, index, q, k, v, do, atol=2e-3, valid=valid)  # atol: one fp16 ulp near 1 is 1e-3


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reference_on_padded_grids_matches_fp64(case):
    index, valid, q, k, v, do = _problem(1, *case, torch.float32, device="cpu")
    ours = run(lambda *t: sparse_attention_index(*t, index, backend="reference", valid=valid), q, k, v, do)
    assert_close_to_fp64(ours, index, q, k, v, do, atol=1e-5, valid=valid)  # softmax and matmuls in fp32


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padding_rows_give_zeros_and_padding_keys_get_no_gradient(backend):
    """Whatever dO the padding rows carry (random here), they send nothing to K and V, and
    padding keys neither receive gradient nor give any; nothing is NaN, even in the rows of
    all-padding query blocks whose lists hold only all-padding KV blocks (block 16)."""
    grid, cube, block, density = CASES["5x6x7-block16-diagonal-only"]
    index, valid, q, k, v, do = _problem(2, grid, cube, block, density, torch.float32)
    real = valid_tokens(grid, cube, q.device)
    out, dq, dk, dv = run(lambda *t: sparse_attention_index(*t, index, backend=backend, valid=valid), q, k, v, do)
    assert not any(t.isnan().any() for t in (out, dq, dk, dv))
    for t in (out, dq, dk, dv):
        assert t[:, :, ~real].eq(0).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_list_that_starts_with_an_all_padding_block_matches_fp64(backend):
    """Block 7 of grid 5x6x7 in blocks of 16 is all padding; every query block lists it and its
    own block, so the real query blocks 8, 9, 12, ... meet no real key in their first block."""
    grid, cube, block, _ = CASES["5x6x7-block16"]
    _, valid, q, k, v, do = _problem(7, grid, cube, block, 0.0, torch.float32)
    assert valid[7] == 0 and valid[8] > 0
    n = valid.numel()
    selected = torch.eye(n, dtype=torch.bool) | (torch.arange(n) == 7)
    index = BlockIndex.from_dense(selected.expand(1, 2, n, n).to(q.device), block_size=block, seq_len=n * block)
    ours = run(lambda *t: sparse_attention_index(*t, index, backend=backend, valid=valid), q, k, v, do)
    assert_close_to_fp64(ours, index, q, k, v, do, atol=1e-5, valid=valid)  # fp32 throughout


def test_dense_masked_reference_is_attention_over_the_real_tokens():
    """Every block kept: the masked reference equals plain softmax attention of the real tokens
    among themselves (float64), and its padding rows are 0."""
    grid, cube = (3, 10, 13), (2, 4, 4)
    index, valid, q, k, v, _ = _problem(3, grid, cube, 32, 1.0, torch.float64, device="cpu")
    real = valid_tokens(grid, cube)
    out = dense_masked_attention(q, k, v, index, q.shape[-1] ** -0.5, valid)
    plain = torch.softmax(q[:, :, real] @ k[:, :, real].transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v[:, :, real]
    torch.testing.assert_close(out[:, :, real], plain, atol=1e-12, rtol=1e-12)
    assert out[:, :, ~real].eq(0).all()


def test_flex_on_padded_grids_matches_reference():
    """CPU: eager FlexAttention, forward only; a BlockMask in takes the same path."""
    index, valid, q, k, v, do = _problem(4, (5, 6, 7), (4, 4, 4), 64, 0.5, torch.float32, device="cpu")
    reference = sparse_attention_index(q, k, v, index, backend="reference", valid=valid)
    flex = sparse_attention_index(q, k, v, index, backend="flex", valid=valid)
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)
    through_mask = sparse_attention(q, k, v, index.to_block_mask(), backend="reference", valid=valid)
    torch.testing.assert_close(through_mask, reference, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 128, 256], ids=lambda d: f"D{d}")
def test_gpu_padded_grids_bf16_match_fp64(head_dim):
    """Wan-like grid 21x30x52 cut down in space; head dim 256 at block 128 runs as halves of 64."""
    for grid, cube, block in (((21, 10, 13), (4, 4, 4), 64), ((5, 10, 13), (4, 4, 8), 128)):
        index, valid, q, k, v, do = _problem(5, grid, cube, block, 0.3, torch.bfloat16, head_dim=head_dim)
        ours = run(lambda *t: sparse_attention_index(*t, index, backend="triton", valid=valid), q, k, v, do)
        assert_close_to_fp64(ours, index, q, k, v, do, atol=1e-3, valid=valid)
        flex = sparse_attention_index(q, k, v, index, backend="flex", valid=valid)
        assert_close_to_fp64([flex], index, q, k, v, do, atol=1e-3, valid=valid)


def test_padded_inputs_run_the_triton_kernels_where_gluon_would(monkeypatch):
    """The Gluon kernels do not mask padding: inputs with valid counts take the Triton ones."""
    from types import SimpleNamespace

    from dsv.ops.sparse_attention import gluon_forward, kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(gluon_forward, "gluon_forward_supported", lambda q, block_size: True)
    hopper_input = SimpleNamespace(is_cuda=True)
    assert kernels.kernel_impl(hopper_input, 128) == "gluon"
    assert kernels.kernel_impl(hopper_input, 128, padded=True) == "triton"


def test_bad_valid_counts_are_rejected_by_name():
    index, valid, q, k, v, _ = _problem(6, (5, 6, 7), (4, 4, 4), 64, 0.5, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"valid must be \(8,\) int32"):
        sparse_attention_index(q, k, v, index, valid=valid[:4])
    with pytest.raises(ValueError, match=r"valid\[2\] = 65: a block's count of real tokens must be in \[0, 64\]"):
        sparse_attention_index(q, k, v, index, valid=valid.clone().index_fill_(0, torch.tensor([2]), 65))
