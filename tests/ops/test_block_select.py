"""Block-mass estimation, selection rules and mass recall against naive fp64 references.

CPU: the torch path and the Triton kernel under TRITON_INTERPRET=1 (fp32/fp16, small
sizes); GPU (marked): the compiled kernel in bf16/fp16/fp32 against the torch path.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

from dsv.ops.block_index import BlockIndex  # noqa: E402
from dsv.ops.block_select import (  # noqa: E402
    block_select,
    estimate_block_mass,
    mass_recall,
    select_blocks,
    select_from_mass,
)

BLOCK = 16
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: compiled on GPU, interpreted on CPU
SEQ = 77  # 5 blocks, the last one of 13 tokens


def naive_mass(q, k, block, scale, mode):
    """Dense fp64 block masses, one block at a time: (B, H, NQ, NKV)."""
    q, k = q.double(), k.double()
    n = math.ceil(q.shape[2] / block)
    blocks = [slice(i * block, (i + 1) * block) for i in range(n)]
    if mode == "fast":
        q = torch.stack([q[:, :, sl].mean(2) for sl in blocks], 2)  # pooled queries
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, -1)  # (B, H, M, S)
    per_row = torch.stack([probs[..., sl].sum(-1) for sl in blocks], -1)  # (B, H, M, NKV)
    if mode == "fast":
        return per_row
    return torch.stack([per_row[:, :, sl].mean(2) for sl in blocks], 2)


def naive_recall(q, k, selected, block, rows):
    """Exact mass inside a (B, H, NQ, NKV) bool map, averaged over the given rows."""
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    token_map = selected.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, : q.shape[2], : k.shape[2]]
    return (probs * token_map)[:, :, rows].sum(-1).mean(-1)


def low_rank(b=2, h=3, s=SEQ, r=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, r, generator=g).to(dtype) for _ in range(2)]


# ---------------------------------------------------------------- mass estimation
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_torch_mass_equals_naive(mode):
    q, k = low_rank()
    mass = estimate_block_mass(q, k, block_size=BLOCK, mode=mode, use_triton=False)
    ref = naive_mass(q, k, BLOCK, 16**-0.5, mode)
    # fp32 softmax and block sums of <= 77 terms: ~1e-7 relative
    torch.testing.assert_close(mass.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("dtype,rank", [(torch.float32, 16), (torch.float16, 16), (torch.float32, 12)])
def test_triton_mass_equals_naive(mode, dtype, rank):
    q, k = low_rank(b=1, h=2, r=rank, dtype=dtype, seed=1)
    mass = estimate_block_mass(
        q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), block_size=BLOCK, mode=mode, scale=0.3, use_triton=True
    ).cpu()
    ref = naive_mass(q, k, BLOCK, 0.3, mode)  # from the same (rounded) inputs
    # fp32 accumulation (tf32 dot on GPU); fp16 pooled queries are rounded before the dot (~5e-4 relative)
    tol = (1e-5 if KERNEL_DEVICE == "cpu" else 2e-3) if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(mass.double(), ref, atol=tol, rtol=tol)


def test_mass_rejects_unknown_mode():
    q, k = low_rank(s=32)
    with pytest.raises(ValueError, match="mode"):
        estimate_block_mass(q, k, block_size=BLOCK, mode="pooled")


# ---------------------------------------------------------------- selection rules
def test_top_k_picks_the_k_largest():
    q, k = low_rank()
    index = select_blocks(q, k, block_size=BLOCK, top_k=3, keep_diagonal=False, mode="exact")
    expected = torch.topk(naive_mass(q, k, BLOCK, 16**-0.5, "exact"), 3, dim=-1).indices.sort(-1).values
    assert torch.equal(index.indices.long(), expected)
    assert (index.counts == 3).all()
    assert index.seq_len == SEQ and index.block_size == BLOCK


def select(mass, *, use_triton=False, **rules):
    """select_from_mass with the Triton path on KERNEL_DEVICE; the index comes back on the CPU."""
    index = select_from_mass(mass.to(KERNEL_DEVICE if use_triton else "cpu"), use_triton=use_triton, **rules)
    return BlockIndex(counts=index.counts.cpu(), indices=index.indices.cpu(), block_size=index.block_size, seq_len=index.seq_len)


def random_mass(b=1, h=3, n=9, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(b, h, n, n, generator=g), -1)


SELECTORS = pytest.mark.parametrize("use_triton", [False, True], ids=["sort", "triton"])


@SELECTORS
@pytest.mark.parametrize("keep_diagonal", [False, True])
def test_top_p_picks_the_smallest_covering_set(keep_diagonal, use_triton):
    mass = random_mass()
    top_p = torch.tensor([0.5, 0.8, 0.95])  # one mass fraction per head
    index = select(
        mass, block_size=BLOCK, seq_len=9 * BLOCK - 3, top_p=top_p, keep_diagonal=keep_diagonal, use_triton=use_triton
    )
    selected = index.to_dense()
    n = mass.shape[-1]
    must = torch.eye(n, dtype=torch.bool).expand_as(selected) if keep_diagonal else torch.zeros_like(selected)
    covered = (mass * selected).sum(-1)
    target = top_p[None, :, None].expand_as(covered)
    assert (covered >= target - 1e-6).all()
    # dropping the lightest optional block falls short: the set is the smallest one
    optional = selected & ~must
    lightest = torch.where(optional, mass, 2.0).min(-1).values
    has_optional = optional.any(-1)
    assert (covered[has_optional] - lightest[has_optional] < target[has_optional]).all()
    # and every optional selected block outweighs every unselected one
    heaviest_left = torch.where(selected, -1.0, mass).max(-1).values
    assert (lightest[has_optional] >= heaviest_left[has_optional]).all()
    assert selected[must].all()


@SELECTORS
def test_budgets_clamps_and_diagonal(use_triton):
    mass = random_mass(n=10)
    n = 10
    rules = dict(block_size=BLOCK, seq_len=n * BLOCK, use_triton=use_triton)
    fractions = torch.tensor([0.05, 0.25, 1.0])
    index = select(mass, budget=fractions, top_k=7, **rules)
    assert torch.equal(index.counts[0, :, 0], torch.tensor([1, 3, 10], dtype=torch.int32))  # ceil(f * n)
    counts_budget = torch.tensor([2, 4, 6])
    index = select(mass, budget=counts_budget, min_blocks=3, max_blocks=5, **rules)
    assert torch.equal(index.counts[0, :, 0], torch.tensor([3, 4, 5], dtype=torch.int32))
    assert index.to_dense().diagonal(dim1=-2, dim2=-1).all()
    index = select(mass, top_p=1e-3, min_blocks=2, keep_diagonal=False, **rules)
    assert (index.counts == 2).all()
    # the two heaviest blocks, indices ascending, padding zero
    expected = torch.topk(mass, 2, -1).indices.sort(-1).values
    assert torch.equal(index.indices.long(), expected)
    with pytest.raises(ValueError, match="not both"):
        select(mass, top_k=2, top_p=0.5, **rules)


@SELECTORS
def test_indices_are_ascending_with_zero_padding(use_triton):
    mass = random_mass(n=8)
    index = select(mass, block_size=BLOCK, seq_len=8 * BLOCK, top_p=0.7, use_triton=use_triton)
    width = index.indices.shape[-1]
    valid = torch.arange(width) < index.counts[..., None]
    assert (index.indices[~valid] == 0).all()
    gaps = index.indices.diff(dim=-1)
    assert (gaps[valid[..., 1:]] > 0).all()
    assert torch.equal(BlockIndex.from_dense(index.to_dense(), block_size=BLOCK, seq_len=8 * BLOCK).indices, index.indices)


@pytest.mark.parametrize("rule", [dict(top_k=4), dict(top_p=0.85), dict(budget=torch.tensor([0.2, 0.7]))])
def test_triton_selection_equals_sorting(rule):
    mass = random_mass(b=2, h=2, n=13, seed=8)  # 13 blocks: a power-of-two padded row
    sort, kernel = (select(mass, block_size=BLOCK, seq_len=13 * BLOCK, use_triton=t, **rule) for t in (False, True))
    assert torch.equal(sort.counts, kernel.counts) and torch.equal(sort.indices, kernel.indices)


def test_triton_selection_breaks_ties_by_lowest_id():
    mass = torch.zeros(1, 1, 6, 6)
    mass[..., 4] = 1.0  # every other block has mass exactly 0
    index = select(mass, block_size=BLOCK, seq_len=6 * BLOCK, top_k=3, keep_diagonal=False, use_triton=True)
    assert (index.counts == 3).all()
    assert torch.equal(index.indices.long(), torch.tensor([0, 1, 4]).expand(1, 1, 6, 3))


def test_block_select_returns_the_same_blocks_as_a_block_mask():
    q, k = low_rank()
    index = select_blocks(q, k, block_size=BLOCK, top_p=0.6, use_triton=False)
    mask = block_select(q, k, block_size=BLOCK, top_p=0.6, use_triton=False)
    assert torch.equal(BlockIndex.from_block_mask(mask, seq_len=SEQ).to_dense(), index.to_dense())


# ---------------------------------------------------------------- mass recall
def test_recall_is_one_when_everything_is_selected():
    q, k = low_rank(r=24)
    index = select_blocks(q, k, block_size=BLOCK, top_k=100)
    torch.testing.assert_close(mass_recall(q, k, index), torch.ones(2, 3), atol=1e-5, rtol=0)


def test_recall_equals_naive_on_a_random_selection():
    q, k = low_rank(r=24, seed=3)
    g = torch.Generator().manual_seed(4)
    selected = (torch.rand(2, 3, 5, 5, generator=g) < 0.4) | torch.eye(5, dtype=torch.bool)
    index = BlockIndex.from_dense(selected, block_size=BLOCK, seq_len=SEQ)
    torch.testing.assert_close(mass_recall(q, k, index).double(), naive_recall(q, k, selected, BLOCK, slice(None)))
    rows = torch.randperm(SEQ, generator=torch.Generator().manual_seed(5))[:20]
    sampled = mass_recall(q, k, index.to_block_mask(), sample_rows=20, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sampled.double(), naive_recall(q, k, selected, BLOCK, rows))


# ---------------------------------------------------------------- planted pattern
def planted(seed=6, blocks=6, tail=11):
    """q, k (1, 2, S, 16) where query block i attends to KV blocks (i+1)%6 and (i+3)%6."""
    g = torch.Generator().manual_seed(seed)
    seq = (blocks - 1) * BLOCK + tail
    codes = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:blocks] * 4  # orthogonal keys per block
    block_of = torch.arange(seq) // BLOCK
    targets = torch.stack([(torch.arange(blocks) + 1) % blocks, (torch.arange(blocks) + 3) % blocks], 1)
    k = codes[block_of] + 0.1 * torch.randn(1, 2, seq, 16, generator=g)
    q = codes[targets].sum(1)[block_of] + 0.1 * torch.randn(1, 2, seq, 16, generator=g)
    return q, k, targets.sort(-1).values


@pytest.mark.parametrize("mode,use_triton", [("exact", False), ("fast", False), ("fast", True)])
def test_planted_pattern_is_recovered(mode, use_triton):
    q, k, targets = planted()
    device = KERNEL_DEVICE if use_triton else "cpu"
    index = select_blocks(
        q.to(device), k.to(device), block_size=BLOCK, top_k=2, keep_diagonal=False, mode=mode, use_triton=use_triton
    )
    index = BlockIndex(counts=index.counts.cpu(), indices=index.indices.cpu(), block_size=BLOCK, seq_len=q.shape[2])
    assert torch.equal(index.indices.long(), targets.expand(1, 2, -1, -1))
    assert (mass_recall(q, k, index, scale=0.25) > 0.9).all()


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_cuda_kernel_matches_reference(block, dtype, mode):
    q, k = (x.cuda() for x in low_rank(b=2, h=4, s=3000, dtype=dtype, seed=7))
    mass = estimate_block_mass(q, k, block_size=block, mode=mode)
    ref = estimate_block_mass(q.double(), k.double(), block_size=block, mode=mode, use_triton=False)
    # bf16 pooled queries are rounded before the dot (~4e-3 relative in scores); tf32 dot for fp32
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(mass, ref, atol=tol / 40, rtol=tol)


@pytest.mark.parametrize("slices", [1, 3, 100])
def test_triton_mass_is_the_same_however_the_keys_are_sliced(slices, monkeypatch):
    """Each program streams one slice of the keys; the slices' softmax statistics are merged
    (100 slices: clamped to one KV block per slice; 3: uneven, the last one holds the tail)."""
    from dsv.ops.block_select import kernel

    monkeypatch.setattr(kernel, "_key_slices", lambda programs, kv_blocks, device: min(slices, kv_blocks))
    q, k = low_rank(b=1, h=2, seed=2)
    for mode in ("fast", "exact"):
        mass = estimate_block_mass(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), block_size=BLOCK, mode=mode,
                                   use_triton=True).cpu()
        ref = naive_mass(q, k, BLOCK, 16**-0.5, mode)
        tol = 1e-5 if KERNEL_DEVICE == "cpu" else 2e-3
        torch.testing.assert_close(mass.double(), ref, atol=tol, rtol=tol)


# ---------------------------------------------------------------- partial token grids
def naive_padded_mass(q, k, real, block, scale, mode):
    """fp64 block masses of the real tokens only: softmax over the real keys, queries averaged
    (or pooled) over the real rows of each query block. real (S,) bool. -> (B, H, NQ, NKV)."""
    q, k = q.double(), k.double()
    n = q.shape[2] // block
    blocks = [torch.arange(i * block, (i + 1) * block) for i in range(n)]
    rows = [ids[real[ids]] for ids in blocks]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~real, float("-inf"))
    if mode == "fast":
        pooled = torch.stack([q[:, :, r].mean(2) for r in rows], 2)
        scores = (pooled @ k.transpose(-1, -2) * scale).masked_fill(~real, float("-inf"))
    probs = torch.softmax(scores, -1)
    per_row = torch.stack([probs[..., ids].sum(-1) for ids in blocks], -1)
    if mode == "fast":
        return per_row
    return torch.stack([per_row[:, :, r].mean(2) for r in rows], 2)


PADDED_GRIDS = {"3x5x7-cube1x4x4": ((3, 5, 7), (1, 4, 4)), "5x6x7-cube4-all-padding-blocks": ((5, 6, 7), (4, 4, 4))}


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("grid,cube", PADDED_GRIDS.values(), ids=PADDED_GRIDS.keys())
def test_padded_mass_is_the_mass_of_the_real_tokens(grid, cube, use_triton, mode):
    from dsv.ops.layout import block_valid_counts, valid_tokens

    real = valid_tokens(grid, cube)
    valid = block_valid_counts(grid, cube, BLOCK)
    q, k = low_rank(1, 2, real.numel(), seed=5)
    mass = estimate_block_mass(q.to(KERNEL_DEVICE) if use_triton else q, k.to(KERNEL_DEVICE) if use_triton else k,
                               block_size=BLOCK, mode=mode, use_triton=use_triton,
                               valid=valid.to(KERNEL_DEVICE) if use_triton else valid).cpu()
    has_rows = valid > 0
    ref = naive_padded_mass(q, k, real, BLOCK, 16**-0.5, mode)
    torch.testing.assert_close(mass[:, :, has_rows].double(), ref[:, :, has_rows], atol=1e-5, rtol=1e-4)  # fp32
    assert mass.isfinite().all() and mass[..., ~has_rows].eq(0).all()  # padding keys carry no mass


def test_padded_selection_and_recall_ignore_padding_keys():
    from dsv.ops.layout import block_valid_counts, valid_tokens

    grid, cube = (5, 6, 7), (4, 4, 4)
    real, valid = valid_tokens(grid, cube), block_valid_counts(grid, cube, BLOCK)
    q, k = low_rank(1, 2, real.numel(), seed=6)
    index = select_blocks(q, k, block_size=BLOCK, top_k=3, keep_diagonal=False, use_triton=False, valid=valid)
    listed = index.to_dense()[:, :, valid > 0]  # the real query blocks' lists
    assert not listed[..., valid == 0].any(), "a block of padding only is never among the top 3"
    recall = mass_recall(q, k, index, scale=16**-0.5, valid=valid)
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2) / 4).masked_fill(~real, float("-inf")), -1)
    token_map = index.to_dense().repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)
    expected = (probs * token_map)[:, :, real].sum(-1).mean(-1)
    torch.testing.assert_close(recall.double(), expected, atol=1e-5, rtol=1e-5)
