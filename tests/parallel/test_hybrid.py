"""A tiny fp32 VideoDiT under head-, sequence- and hybrid context parallelism, alone and under
FSDP data parallelism, matches the one-process run: output and every parameter gradient; also on
a partial token grid (padding in the cube order)."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from cp_harness import run_distributed
from dsv.models.attention import dense_attention
from dsv.models.dit import DiTConfig, VideoDiT
from dsv.ops.block_index import BlockIndex, random_block_index
from dsv.ops.sparse_attention import sparse_attention_index
from dsv.parallel.hybrid import ContextParallelAttention, SelectionInput
from dsv.parallel.mesh import apply_context_parallel, build_parallel_mesh

CFG = DiTConfig(in_channels=1, patch=(1, 2, 2), hidden=24, depth=2, heads=3, mlp_ratio=2.0, cube=(2, 2, 2))
BATCH, VIDEO, BLOCK, FEATURES = 2, (4, 8, 8), 4, 5  # 64 tokens = 16 blocks of 4
# grid (3, 3, 4) padded to (4, 4, 4): 36 real of 64 tokens; the corner cube's 2 real tokens leave its
# second block of 4 padding only
PARTIAL_VIDEO = (3, 6, 8)
HEAD_COSTS = [[0.9, 0.2, 0.5], [0.1, 0.1, 0.6]]  # per layer: uneven head splits
# fp32 selector features: token-wise, summed in the same order on every rank
TOL = dict(rtol=1e-4, atol=1e-5)


class TableSelector:
    """Fixed global block lists per layer, sliced to the rank's samples, heads and query blocks;
    checks that the features it is handed are the one-process run's at the same place."""

    def __init__(self, indices: list[BlockIndex], features: list[torch.Tensor], samples: slice):
        self.indices, self.features, self.samples = indices, features, samples

    def __call__(self, inp: SelectionInput) -> BlockIndex:
        full, want = self.indices[inp.layer], self.features[inp.layer][self.samples, inp.heads]  # (B, H_r, S, F)
        first, nq = inp.first_query_block, inp.q.shape[2] // BLOCK
        queries = slice(first * BLOCK, (first + nq) * BLOCK)
        torch.testing.assert_close(inp.features_q, want[:, :, queries], **TOL,
                                   msg=lambda m: f"layer {inp.layer}, query features on the owner: {m}")
        torch.testing.assert_close(inp.features_k, want, **TOL,
                                   msg=lambda m: f"layer {inp.layer}, key features of the sequence: {m}")
        counts = full.counts[self.samples, inp.heads, first:first + nq].contiguous()
        indices = full.indices[self.samples, inp.heads, first:first + nq].contiguous()
        return BlockIndex(counts=counts, indices=indices,
                          block_size=BLOCK, seq_len=inp.seq_len)


def features(attn_input, *, layer, rope):
    """A token-wise stand-in for the predictor's low-rank projection, plus the tokens' rotary angles
    (so a rank handed another shard's tables fails): (B, S, hidden), (S, Dh/2) x 2 -> (B, H, S, F)."""
    weight = torch.linspace(-1, 1, CFG.hidden * CFG.heads * FEATURES).view(CFG.hidden, CFG.heads, FEATURES) / CFG.hidden
    weight = weight.to(attn_input.dtype)
    cos, sin = rope
    return torch.einsum("bsc,chf->bhsf", attn_input.detach(), weight + layer) + (cos - sin).sum(-1, keepdim=True)


def _model() -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(CFG)
    with torch.no_grad():  # leave adaLN-Zero's zero init so that every path carries gradient
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _inputs(video=VIDEO):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, CFG.in_channels, *video, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    t = torch.rand(BATCH, generator=gen)
    indices = [random_block_index(BATCH, CFG.heads, 64, BLOCK, d, generator=gen) for d in (0.3, 0.5)]
    return x, target, t, indices


def _one_process(sparse: bool, dtype: torch.dtype = torch.float32, video=VIDEO):
    """Output, parameter gradients, block lists and selector features of the one-process run; in
    float64 it is the same fp32 problem (model, inputs) computed exactly."""
    x, target, t, indices = _inputs(video)
    x, target, t = (a.to(dtype) for a in (x, target, t))
    model, feats = _model().to(dtype), [None] * CFG.depth

    def backend(q, k, v, *, layer, attn_input, rope, padding=None):
        feats[layer] = features(attn_input, layer=layer, rope=rope)
        if not sparse:
            return dense_attention(q, k, v, padding)
        valid = None if padding is None else padding.block_counts(BLOCK)
        return sparse_attention_index(q, k, v, indices[layer], backend="reference", valid=valid)

    model.set_attention(backend)
    out = model(x, t)
    ((out - target) ** 2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, indices, feats


def _assert_close_to_fp64(ours, one_process, exact, what):
    """The fp64-referenced rule of tests/ops/helpers.py: the ranks' fp32 result is at most 2x as far
    from the exact (fp64) one-process result as the fp32 one-process run is, plus 1e-6. In fp64 the
    ranks match the one-process run to 1e-13: what remains in fp32 is the order of the sums over
    tokens, ranks and FSDP shards, which moves an ill-conditioned element by many of its ulps."""
    torch_error = (one_process.double() - exact).abs().max().item()
    torch.testing.assert_close(ours.double(), exact, rtol=0, atol=2 * torch_error + 1e-6,
                               msg=lambda m: f"{what} (fp32 one-process error {torch_error:.3g}): {m}")


def _context_parallel(rank, world, plans, video=VIDEO):
    for cp_heads, cp_seq, heads_inner, sparse, fsdp in plans:
        want_out, want_grads, indices, feats = _one_process(sparse, video=video)
        exact_out, exact_grads, _, _ = _one_process(sparse, torch.float64, video)
        x, target, t, _ = _inputs(video)
        mesh = build_parallel_mesh("cpu", world, cp_heads=cp_heads, cp_seq=cp_seq, heads_inner=heads_inner)
        samples = slice(mesh.dp_rank * BATCH // mesh.dp, (mesh.dp_rank + 1) * BATCH // mesh.dp)
        attention = ContextParallelAttention(mesh, heads=CFG.heads, features=features, block_size=BLOCK,
                                             selector=TableSelector(indices, feats, samples) if sparse else None)
        attention.set_head_costs(HEAD_COSTS)
        model = apply_context_parallel(_model(), mesh, attention)
        if fsdp:
            for block in model.blocks:
                fully_shard(block, mesh=mesh.fsdp_mesh)
            fully_shard(model, mesh=mesh.fsdp_mesh)
        out = model(x[samples], t[samples])
        ((out - target[samples]) ** 2).mean().backward()
        plan = f"{cp_heads}x{cp_seq} heads_inner={heads_inner} sparse={sparse} dp={mesh.dp} fsdp={fsdp} video={video}"
        _assert_close_to_fp64(out, want_out[samples], exact_out[samples], f"{plan}: output")
        for name, p in model.named_parameters():
            if fsdp:  # FSDP averaged over dp x cp already
                grad = p.grad.full_tensor()
            else:  # the sum over cp ranks is the gradient of the (shared) loss times cp
                grad = p.grad.clone()
                dist.all_reduce(grad)
                grad /= world
            _assert_close_to_fp64(grad, want_grads[name], exact_grads[name], f"{plan}: grad of {name}")
    return True


def test_head_and_sequence_parallel_on_two_ranks():
    assert run_distributed(_context_parallel, 2, [
        (2, 1, True, True, False),  # uneven heads (3 heads: 2 + 1), sparse, predictor features on the owner
        (2, 1, True, False, False),  # uneven heads, dense
        (1, 2, True, True, False),  # sequence-parallel, selective KV exchange
        (1, 2, True, False, False),  # sequence-parallel, all-gather
    ])


def test_partial_grid_under_head_and_sequence_parallel_on_two_ranks():
    """The padding the DiT passes on a partial grid: masked keys (the exchanged blocks keep their
    counts), padding rows 0, as on one process."""
    assert run_distributed(_context_parallel, 2, [
        (2, 1, True, True, False),  # uneven heads, sparse
        (2, 1, True, False, False),  # uneven heads, dense
        (1, 2, True, True, False),  # sequence-parallel, selective KV exchange
        (1, 2, True, False, False),  # sequence-parallel, all-gather
    ], PARTIAL_VIDEO)


@pytest.mark.slow
def test_partial_grid_under_hybrid_parallelism_on_four_ranks():
    assert run_distributed(_context_parallel, 4, [(2, 2, True, True, False), (1, 4, True, True, False)],
                           PARTIAL_VIDEO)


@pytest.mark.slow
def test_hybrid_and_data_parallel_on_four_ranks():
    assert run_distributed(_context_parallel, 4, [
        (2, 2, True, True, False),  # hybrid 2x2, head group inside a node
        (2, 2, False, True, False),  # hybrid 2x2, sequence group inside a node
        (2, 1, True, True, True),  # uneven heads x 2-way FSDP data parallel
        (1, 2, True, True, True),  # sparse sequence-parallel x 2-way FSDP data parallel
        (1, 4, True, True, False),  # 4-way sparse sequence-parallel
    ])


@pytest.mark.slow
def test_hybrid_under_data_parallel_on_eight_ranks():
    assert run_distributed(_context_parallel, 8, [(2, 2, True, True, True)])  # hybrid 2x2 x 2-way FSDP
