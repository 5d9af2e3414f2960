"""Block-sparse attention: Triton kernels (under the CPU interpreter here, bf16 on the GPU),
the gather reference and the FlexAttention backend against float64 dense references."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from dsv.ops.block_index import BlockIndex, random_block_index
from dsv.ops.sparse_attention import dense_masked_attention, sparse_attention, sparse_attention_index
from tests.ops.helpers import assert_close_to_fp64, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = torch.bfloat16 if torch.cuda.is_available() else torch.float16  # interpreter: no bf16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(seed, batch, heads, seq_len, head_dim, block, density, dtype, per_head=None, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)
    index = random_block_index(
        batch, heads, seq_len, block, density, generator=generator, per_head_density=per_head, device=device
    )
    q, k, v, do = (torch.randn(batch, heads, seq_len, head_dim, generator=generator).to(device, dtype) for _ in range(4))
    return index, q, k, v, do


def _check_against_fp64(index, q, k, v, do, backend, atol):
    ours = run(lambda *t: sparse_attention_index(*t, index, backend=backend), q, k, v, do)
    assert_close_to_fp64(ours, index, q, k, v, do, atol)


# (batch, heads, seq_len, head_dim, block, density, per_head)
CASES = {
    "tail-of-8": (2, 2, 200, 64, 64, 0.5, None),
    "head-dim-96-tail-of-2": (1, 2, 130, 96, 64, 0.7, None),
    "heads-of-one-and-all-blocks": (1, 3, 256, 32, 32, 0.0, (0.01, 1.0, 0.5)),
    "block-128-dense": (1, 1, 300, 64, 128, 1.0, None),
    "block-16-diagonal-only": (1, 1, 50, 16, 16, 0.0, (0.01,)),
    "head-dim-256-block-128-runs-as-64": (1, 1, 200, 256, 128, 0.5, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_triton_low_precision_matches_fp64(case):
    batch, heads, seq_len, head_dim, block, density, per_head = case
    problem = _problem(0, batch, heads, seq_len, head_dim, block, density, LOW_PRECISION, per_head)
    _check_against_fp64(*problem, backend="triton", atol=2e-3)  # atol: one fp16 ulp near 1 is 1e-3


def test_triton_fp32_matches_fp64():
    problem = _problem(1, 1, 2, 144, 64, 64, 0.6, torch.float32)
    # fp32 in the interpreter is exact fp32; on a GPU the dots run in tf32 (10-bit mantissa)
    atol = 2e-2 if DEVICE == "cuda" else 1e-5
    _check_against_fp64(*problem, backend="triton", atol=atol)


def _with_configs(index, q, k, v, do, forward_config, dkdv_config, dq_config):
    """Output and (dq, dk, dv) of our kernels, each launched with the given config."""
    from dsv.ops.sparse_attention import kernels

    scale = q.shape[-1] ** -0.5
    o, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    kernels.launch_forward(q, k, v, o, lse, index, scale, forward_config)
    delta = torch.empty_like(lse)
    kernels.launch_delta(o, do, delta)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    kernels.launch_dkdv(q, k, v, do, lse, delta, dk, dv, index, index.transpose(), scale, dkdv_config)
    kernels.launch_dq(q, k, v, do, lse, delta, dq, index, scale, dq_config)
    return o, dq, dk, dv


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter case; the GPU runs every config below")
def test_walking_sub_tiles_of_a_block_matches_fp64():
    """TILE < BLOCK: the other side is walked in sub-tiles; the last block's third sub-tile
    lies entirely past S (S = 200, block 64, tile 16)."""
    import triton

    index, q, k, v, do = _problem(11, 1, 2, 200, 32, 64, 0.5, torch.float32, per_head=(0.3, 1.0))
    tiles = triton.Config({"TILE": 16}, num_warps=4, num_stages=1)
    ours = _with_configs(index, q, k, v, do, tiles, tiles, tiles)
    assert_close_to_fp64(ours, index, q, k, v, do, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_backend_matches_fp64(dtype):
    problem = _problem(2, 2, 3, 150, 32, 32, 0.4, dtype, per_head=(0.1, 0.5, 1.0), device="cpu")
    _check_against_fp64(*problem, backend="reference", atol=1e-5)  # softmax and matmuls run in fp32


def test_triton_matches_flex_with_the_same_block_mask():
    index, q, k, v, do = _problem(3, 1, 2, 192, 32, 64, 0.5, torch.float32, per_head=(0.34, 1.0))
    mask = index.to_block_mask()
    ours = run(lambda *t: sparse_attention(*t, mask, backend="triton"), q, k, v, do)
    if DEVICE == "cpu":  # eager FlexAttention: no backward, and it needs the token mask_mod
        flex = [flex_attention(q, k, v, block_mask=index.to_block_mask(token_mask_mod=True))]
    else:
        flex = run(lambda *t: flex_attention(*t, block_mask=mask), q, k, v, do)
    for name, mine, theirs in zip(("out", "dq", "dk", "dv"), ours, flex):
        # two fp32 orders of summation (tf32 dots on a GPU)
        torch.testing.assert_close(mine, theirs, atol=1e-4 if DEVICE == "cpu" else 3e-3, rtol=1e-4, msg=name)


def test_flex_backend_matches_reference_backend():
    index, q, k, v, _ = _problem(4, 1, 2, 100, 16, 32, 0.5, torch.float32, device="cpu")
    flex = sparse_attention_index(q, k, v, index, backend="flex")
    reference = sparse_attention_index(q, k, v, index, backend="reference")
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)


def test_index_broadcast_over_batch_and_heads():
    index, q, k, v, _ = _problem(5, 2, 3, 96, 16, 32, 0.5, torch.float32, device="cpu")
    shared = BlockIndex(index.counts[:1, :1], index.indices[:1, :1], index.block_size, index.seq_len)
    out = sparse_attention_index(q, k, v, shared, backend="reference")
    expected = dense_masked_attention(q, k, v, shared.expand(2, 3), q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    index, q, k, v, _ = _problem(6, 1, 2, 64, 16, 32, 0.5, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="one shape"):
        sparse_attention_index(q, k[:, :, :32], v, index)
    with pytest.raises(TypeError, match="one dtype"):
        sparse_attention_index(q, k.half(), v, index)
    with pytest.raises(ValueError, match=r"\(B, H, S, D\)"):
        sparse_attention_index(q[0], k[0], v[0], index)
    with pytest.raises(ValueError, match="sequence of 64 tokens, q has 32"):
        sparse_attention_index(q[:, :, :32], k[:, :, :32], v[:, :, :32], index)
    with pytest.raises(ValueError, match=r"\(B, H\) = \(1, 2\), q has \(1, 3\)"):
        sparse_attention_index(*(torch.cat([t, t[:, :1]], 1) for t in (q, k, v)), index)
    with pytest.raises(ValueError, match=r"counts \(1, 2, 1\) / indices \(1, 2, 1, 1\) do not match 2 blocks of 32"):
        sparse_attention_index(q, k, v, BlockIndex(index.counts[..., :1], index.indices[..., :1, :1], 32, 64))
    with pytest.raises(ValueError, match="backend"):
        sparse_attention_index(q, k, v, index, backend="cudnn")
    with pytest.raises(TypeError, match="takes"):
        sparse_attention_index(q.double(), k.double(), v.double(), index, backend="triton")
    with pytest.raises(ValueError, match="is on meta"):
        sparse_attention_index(q, k, v, BlockIndex(index.counts.to("meta"), index.indices.to("meta"), 32, 64))
    with pytest.raises(TypeError, match="BlockMask"):
        sparse_attention(q, k, v, index)
    odd = [t[..., :12].half() for t in (q, k, v)]  # 12 fp16 = 24 bytes per row: no TMA
    with pytest.raises(ValueError, match="head_dim 12"):
        sparse_attention_index(*odd, index, backend="triton")


def _with_empty_lists(index: BlockIndex) -> BlockIndex:
    """The same lists, but query block 1 of head 0 and every query block of head 1 list nothing."""
    counts = index.counts.clone()
    counts[:, 0, 1] = 0
    counts[:, 1] = 0
    return BlockIndex(counts=counts, indices=index.indices, block_size=index.block_size, seq_len=index.seq_len)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_lists_give_zero_rows_and_zero_gradients(backend):
    """One behaviour for every backend, FlexAttention's: an empty list attends to nothing."""
    index, q, k, v, do = _problem(16, 1, 3, 100, 16, 32, 0.5, torch.float32, device="cpu")
    index = _with_empty_lists(index)
    out, dq, dk, dv = run(lambda *t: sparse_attention_index(*t, index, backend=backend), q, k, v, do)
    assert not any(t.isnan().any() for t in (out, dq, dk, dv))
    for t in (out, dq):
        assert t[:, 0, 32:64].eq(0).all() and t[:, 1].eq(0).all()
    assert dk[:, 1].eq(0).all() and dv[:, 1].eq(0).all()
    assert_close_to_fp64([out, dq, dk, dv], index, q, k, v, do, atol=1e-5)  # fp32 throughout
    flex = sparse_attention_index(q, k, v, index, backend="flex")  # CPU: eager, forward only
    torch.testing.assert_close(out, flex, atol=1e-5, rtol=1e-5)


def test_a_block_mask_for_other_lengths_is_rejected():
    """A mask for 512 keys used to be clamped to the 4 blocks of 256 tokens: block 3 alone."""
    q = torch.randn(1, 2, 256, 16)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 256, 1, 2, 256, 512, device="cpu", BLOCK_SIZE=64)
    for backend in ("reference", "flex"):
        with pytest.raises(ValueError, match=r"\(Q_LEN, KV_LEN\) = \(256, 512\), but q, k, v have 256 tokens"):
            sparse_attention(q, q, q, mask, backend=backend)
    three_heads = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 0, 1, 3, 256, 256, device="cpu",
                                    BLOCK_SIZE=64)
    with pytest.raises(ValueError, match=r"BlockMask is for \(B, H\) = \(1, 3\), q has \(1, 2\)"):
        sparse_attention(q, q, q, three_heads)


def _lists(counts, indices, block_size=32, seq_len=96):
    return BlockIndex(counts=torch.tensor(counts, dtype=torch.int32), indices=torch.tensor(indices, dtype=torch.int32),
                      block_size=block_size, seq_len=seq_len)


@pytest.mark.parametrize("counts, indices, message", [
    ([[[2, 1, 1]]], [[[[1, 1], [1, 0], [2, 0]]]], r"each KV block once.*\(0, 0, 0\) lists \[1, 1\]"),
    ([[[2, 1, 1]]], [[[[1, 0], [1, 0], [2, 0]]]], r"each KV block once.*\(0, 0, 0\) lists \[1, 0\]"),
    ([[[1, 3, 1]]], [[[[0, 0], [0, 1], [2, 0]]]], r"counts must be <= the list width indices.shape\[-1\] = 2, got 3"),
    ([[[1, -1, 1]]], [[[[0, 0], [0, 0], [2, 0]]]], r"counts must be >= 0, got -1"),
    ([[[1, 1, 1]]], [[[[0, 0], [3, 0], [2, 0]]]], r"KV block ids in \[0, 3\).*\(0, 0, 1\) lists \[3\]"),
])
def test_invalid_lists_are_rejected_by_name(counts, indices, message):
    q = torch.randn(1, 1, 96, 16)
    with pytest.raises(ValueError, match=message):
        sparse_attention_index(q, q, q, _lists(counts, indices))


def test_a_block_size_that_is_not_positive_is_rejected():
    with pytest.raises(ValueError, match="block_size must be a positive number of tokens, got 0"):
        _lists([[[1]]], [[[[0]]]], block_size=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("block", [64, 128], ids=lambda b: f"block{b}")
def test_gpu_bf16_matches_fp64(head_dim, block):
    problem = _problem(7, 2, 3, 1000, head_dim, block, 0.3, torch.bfloat16, per_head=(0.05, 0.3, 1.0))
    _check_against_fp64(*problem, backend="triton", atol=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_gpu_backward_is_deterministic():
    index, q, k, v, do = _problem(8, 1, 4, 2048, 128, 128, 0.2, torch.bfloat16)
    first = run(lambda *t: sparse_attention_index(*t, index), q, k, v, do)
    second = run(lambda *t: sparse_attention_index(*t, index), q, k, v, do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _all_configs():
    from dsv.ops.sparse_attention import kernels

    tuners = {"forward": kernels._forward_kernel, "dkdv": kernels._dkdv_kernel, "dq": kernels._dq_kernel}
    return [(name, config, block) for name, tuner in tuners.items() for config in tuner.configs
            for block in (64, 128) if config.kwargs["TILE"] <= block]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", _all_configs() if torch.cuda.is_available() else [],
                         ids=lambda c: f"{c[0]}-tile{c[1].kwargs['TILE']}-w{c[1].num_warps}s{c[1].num_stages}-block{c[2]}")
def test_gpu_every_autotune_config_matches_fp64(case):
    """The autotuner may pick any of them on some GPU: each must be right on its own."""
    name, config, block = case
    index, q, k, v, do = _problem(12, 1, 3, 1000, 128, block, 0.3, torch.bfloat16, per_head=(0.05, 0.3, 1.0))
    configs = {n: (config if n == name else None) for n in ("forward", "dkdv", "dq")}
    ours = _with_configs(index, q, k, v, do, configs["forward"], configs["dkdv"], configs["dq"])
    assert_close_to_fp64(ours, index, q, k, v, do, atol=1e-3)


def test_autotune_pruning_keeps_the_measured_winners_per_block():
    import triton

    from dsv.ops.sparse_attention import kernels

    for options in (kernels.FWD_OPTIONS, kernels.DKDV_OPTIONS, kernels.DQ_OPTIONS):
        configs = [triton.Config({"TILE": t}, num_warps=w, num_stages=s) for t, w, s in options]
        for block, warps in ((128, 8), (64, 4), (32, 4)):
            kept = kernels._prune(configs, {}, BLOCK=block)
            assert kept and all(c.num_warps == warps for c in kept), (block, kept)
            if block >= 64:
                assert all(c.kwargs["TILE"] <= block for c in kept)


@pytest.mark.gpu
@needs_cuda
def test_gpu_flex_backend_takes_block_64_masks_at_head_dim_128():
    """Compiled Flex tiles 128 rows by default and refuses 64-token blocks unless told (forward;
    see flex_kernel_options for its backward)."""
    index, q, k, v, _ = _problem(13, 1, 2, 1024, 128, 64, 0.3, torch.bfloat16)
    with torch.no_grad():
        flex = sparse_attention_index(q, k, v, index, backend="flex")
        ours = sparse_attention_index(q, k, v, index, backend="triton")
    torch.testing.assert_close(flex.float(), ours.float(), atol=2e-2, rtol=2e-2)


def test_triton_forward_without_gradients_matches_the_training_forward():
    """Inputs that need no gradient skip the backward's preparation; the output is the same."""
    index, q, k, v, _ = _problem(15, 1, 2, 100, 32, 32, 0.5, torch.float32)
    plain = sparse_attention_index(q, k, v, index, backend="triton")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    trained = sparse_attention_index(*leaves, index, backend="triton")
    torch.testing.assert_close(plain, trained.detach(), atol=0, rtol=0)
