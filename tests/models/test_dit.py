"""VideoDiT: shapes, parameter counts by hand, zero init, the backend call, layout plumbing, errors."""
from dataclasses import replace
from math import prod

import pytest
import torch
import torch.nn as nn

from dsv.models.attention import DenseAttention
from dsv.models.dit import (DIT_PRESETS, DiTConfig, VideoDiT, matmul_params_per_token, param_count,
                            train_flops)


def small(**kw) -> DiTConfig:
    """2 blocks, hidden 32, 2 heads of 16 (RoPE split t/h/w = 8/4/4)."""
    base = dict(in_channels=3, patch=(1, 2, 2), hidden=32, depth=2, heads=2, cube=(2, 2, 2))
    return DiTConfig(**{**base, **kw})


def awake(model: VideoDiT, seed: int = 0) -> VideoDiT:
    """Give the zero-initialised layers (adaLN modulation, final projection) random weights, so
    the output depends on everything; the rest keeps its DiT initialisation."""
    g = torch.Generator().manual_seed(seed)
    lins = [b.adaLN[-1] for b in model.blocks] + [model.final.adaLN[-1], model.final.linear]
    with torch.no_grad():
        for lin in lins:
            for p in lin.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(cfg: DiTConfig, b=2, size=(4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, *size, generator=g)
    t = torch.rand(b, generator=g)
    y = torch.randint(0, cfg.num_classes, (b,), generator=g) if cfg.num_classes else None
    return x, t, y


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", ["tiny", "S"])
def test_output_shape_small_presets(name):
    torch.manual_seed(0)
    cfg = DIT_PRESETS[name](num_classes=5)
    model = VideoDiT(cfg).eval()
    size = tuple(p * c for p, c in zip(cfg.patch, cfg.cube))  # smallest valid video: one cube of tokens
    x, t, y = inputs(cfg, b=2, size=size)
    with torch.no_grad():
        assert model(x, t, y).shape == x.shape


@pytest.mark.parametrize("name", ["L", "XL", "1.3B", "2.7B"])
def test_output_shape_large_presets_on_meta(name):
    cfg = DIT_PRESETS[name]()
    with torch.device("meta"):
        model = VideoDiT(cfg)
        x = torch.empty(1, cfg.in_channels, *(2 * p * c for p, c in zip(cfg.patch, cfg.cube)))
        assert model(x, torch.empty(1)).shape == x.shape


# --------------------------------------------------------------------------- parameter counts

def hand_count(cfg: DiTConfig) -> int:
    d, m, hd, c = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio), cfg.hidden // cfg.heads, cfg.in_channels
    p = prod(cfg.patch)
    lin = lambda i, o: i * o + o  # weight + bias
    qk_norm = 2 * hd if cfg.qk_norm else 0
    block = (lin(d, 3 * d) + qk_norm + lin(d, d)  # self-attention
             + lin(d, m) + lin(m, d)  # MLP
             + lin(d, 6 * d))  # adaLN modulation
    if cfg.text_dim:
        block += 2 * d + lin(d, d) + lin(cfg.text_dim, 2 * d) + qk_norm + lin(d, d)  # LN, q, kv, norms, out
    embed = (c * p * d + d  # Conv3d patch embedding
             + lin(256, d) + lin(d, d)  # timestep MLP
             + ((cfg.num_classes + 1) * d if cfg.num_classes else 0))  # labels + null label
    final = lin(d, 2 * d) + lin(d, p * c)
    return embed + cfg.depth * block + final


@pytest.mark.parametrize("name", list(DIT_PRESETS))
def test_param_count_every_preset_matches_hand_formula(name):
    cfg = DIT_PRESETS[name]()
    assert param_count(cfg) == hand_count(cfg)


def test_param_count_with_labels_text_no_qk_norm():
    cfg = small(num_classes=7, text_dim=24, qk_norm=False, mlp_ratio=3.0)
    assert param_count(cfg) == hand_count(cfg)
    assert sum(p.numel() for p in VideoDiT(cfg).parameters()) == hand_count(cfg)


def test_2_7b_count_documented():
    # 32 x (18 d^2 + 15 d + 2*128) in blocks + embeddings and final layer, d = 2048
    d = 2048
    assert 32 * (18 * d * d + 15 * d + 256) == 2_416_910_336
    assert param_count(DIT_PRESETS["2.7B"]()) == 2_430_093_328
    assert param_count(DIT_PRESETS["1.3B"]()) == 1_282_246_672


def test_train_flops_counts_every_token_wise_linear():
    cfg = small(text_dim=24)
    model = VideoDiT(cfg)
    per_sample = {id(m) for b in model.blocks for m in (b.adaLN[-1], b.cross.kv)}
    per_sample |= {id(model.final.adaLN[-1])} | {id(m) for m in model.t_embed.modules()}
    token_wise = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, (nn.Linear, nn.Conv3d)) and id(m) not in per_sample)
    assert matmul_params_per_token(cfg) == token_wise
    s, L, d = 64, 5, cfg.hidden
    attn = 3 * cfg.depth * (4 * s * s * d + 4 * s * L * d)  # self + cross, fwd+bwd = 3x fwd
    kv = 6 * cfg.depth * cfg.text_dim * 2 * d * L
    assert train_flops(cfg, s, batch=3, text_len=L) == 3 * (6 * token_wise * s + attn + kv)


# --------------------------------------------------------------------------- initialisation

def test_zero_init_output_is_exactly_zero():
    cfg = small(num_classes=4, text_dim=8)
    model = VideoDiT(cfg)
    x, t, y = inputs(cfg)
    out = model(x, t, y, text=torch.randn(2, 3, 8))
    assert torch.equal(out, torch.zeros_like(x))


# --------------------------------------------------------------------------- the attention backend

class Recording:
    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, *, layer, attn_input, rope):
        self.calls.append((layer, q.shape, k.shape, v.shape, attn_input.shape, tuple(t.shape for t in rope)))
        return DenseAttention()(q, k, v, layer=layer, attn_input=attn_input)


def test_backend_called_once_per_block_with_shapes_and_layer():
    cfg = small(depth=3)
    model = awake(VideoDiT(cfg))
    x, t, _ = inputs(cfg, b=2, size=(4, 8, 8))  # grid (4, 4, 4): N = 64
    ref = model(x, t)
    rec = Recording()
    model.set_attention(rec)
    assert all(b.attn.attention_backend is rec for b in model.blocks)
    out = model(x, t)
    qkv = (2, 2, 64, 16)  # (B, H, N, head_dim)
    rope = ((64, 8), (64, 8))  # cos, sin (N, head_dim / 2)
    assert rec.calls == [(i, qkv, qkv, qkv, (2, 64, 32), rope) for i in range(3)]
    assert torch.equal(out, ref)
    # the backend is no module state: not in state_dict, not a child module
    assert not any("backend" in k for k in model.state_dict())
    assert all(not isinstance(m, Recording) for m in model.modules())


def fp64_softmax_attention(q, k, v, *, layer, attn_input, rope):
    scale = q.shape[-1] ** -0.5
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    return (p @ v.double()).to(q.dtype)


def test_fp64_softmax_backend_matches_dense():
    cfg = small(num_classes=3)
    model = awake(VideoDiT(cfg))
    x, t, y = inputs(cfg)
    dense = model(x, t, y)
    model.set_attention(fp64_softmax_attention)
    exact = model(x, t, y)
    assert dense.abs().max() > 0.1
    # fp32 SDPA vs fp64 attention: ~1e-7 relative error per attention, grown by 2 blocks and the
    # final layer on outputs of size ~1; 1e-5 is ~100x that and far below any layout/scale bug.
    torch.testing.assert_close(dense, exact, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- partial token grids

def fp64_masked_attention(q, k, v, *, layer, attn_input, rope, padding=None):
    """Softmax over the real keys in fp64, padding rows 0: the dense masked reference."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if padding is not None:
        real = padding.tokens(q.device)
        scores = scores.masked_fill(~real, float("-inf"))
        return (torch.softmax(scores, -1) @ v.double() * real[:, None]).to(q.dtype)
    return (torch.softmax(scores, -1) @ v.double()).to(q.dtype)


class SparseAtFullDensity:
    """Every KV block kept, through our block-sparse attention (reference backend) with the
    padding's valid counts."""

    def __call__(self, q, k, v, *, layer, attn_input, rope, padding):
        from dsv.ops.block_index import random_block_index
        from dsv.ops.sparse_attention import sparse_attention_index

        index = random_block_index(1, 1, q.shape[2], 16, 1.0)
        return sparse_attention_index(q, k, v, index, backend="reference", valid=padding.block_counts(16))


def _forward_backward(model, x, t, y):
    model.zero_grad()
    out = model(x, t, y)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# (video size, cube): partial cubes on every axis; an axis shorter than one cube
PARTIAL_GRIDS = [((5, 12, 14), (4, 4, 4)), ((3, 20, 26), (2, 4, 4)), ((2, 6, 10), (4, 4, 4))]


@pytest.mark.parametrize("size,cube", PARTIAL_GRIDS, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("backend", ["dense-sdpa", "fp64-masked", "sparse-reference"])
def test_partial_grid_equals_the_model_on_the_real_tokens(size, cube, backend):
    """A grid that is not a multiple of the cube (padded inside the model) gives the output and
    every parameter gradient of the same weights with cube (1, 1, 1), which has no padding:
    attention is permutation-equivariant, so only attending to padding would differ. fp64."""
    ref_model = awake(VideoDiT(small(cube=(1, 1, 1), num_classes=3))).double()
    ref_model.set_attention(fp64_softmax_attention)
    x, t, y = inputs(ref_model.cfg, size=size)
    x, t = x.double(), t.double()
    ref_out, ref_grads = _forward_backward(ref_model, x, t, y)
    model = VideoDiT(small(cube=cube, num_classes=3)).double()
    model.load_state_dict(ref_model.state_dict())
    grid = model.cfg.check_input(*size)
    assert any(g % c for g, c in zip(grid, cube)), "the case must be a partial grid"
    model.set_attention({"dense-sdpa": DenseAttention(), "fp64-masked": fp64_masked_attention,
                         "sparse-reference": SparseAtFullDensity()}[backend])
    out, grads = _forward_backward(model, x, t, y)
    assert out.shape == x.shape and ref_out.abs().max() > 0.1
    # fp64 throughout: sums in another order only (~1e-16 relative); 1e-10 is far below any
    # leak of padding (which moves outputs by ~1e-2)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-10, rtol=1e-10, msg=name)


def test_training_loss_on_a_partial_grid_counts_the_real_tokens_only():
    """The trainer's loss (flow matching on the model's output) on a partial grid is the loss of
    the model without padding, value and gradients: the output holds the real tokens only."""
    from dsv.flow import flow_matching_loss

    ref_model = awake(VideoDiT(small(cube=(1, 1, 1), num_classes=3))).double()
    model = VideoDiT(small(cube=(4, 4, 4), num_classes=3)).double()
    model.load_state_dict(ref_model.state_dict())
    x, t, y = inputs(ref_model.cfg, size=(5, 12, 14))
    noise = torch.randn_like(x)
    losses = []
    for m in (ref_model, model):
        m.set_attention(fp64_masked_attention)
        loss = flow_matching_loss(m, x.double(), noise.double(), t.double(), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-12, rtol=1e-12)  # fp64, other sum order
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-10, rtol=1e-10, msg=name)


def test_attending_to_padding_would_be_caught():
    """The test above is not vacuous: a backend that ignores the padding differs."""
    ref_model = awake(VideoDiT(small(cube=(1, 1, 1), num_classes=3))).double()
    x, t, y = inputs(ref_model.cfg, size=PARTIAL_GRIDS[0][0])
    model = VideoDiT(small(cube=PARTIAL_GRIDS[0][1], num_classes=3)).double()
    model.load_state_dict(ref_model.state_dict())
    model.set_attention(lambda q, k, v, *, layer, attn_input, rope, padding: fp64_softmax_attention(
        q, k, v, layer=layer, attn_input=attn_input, rope=rope))
    assert (model(x.double(), t.double(), y) - ref_model(x.double(), t.double(), y)).abs().max() > 1e-3


def test_full_grids_pass_no_padding_to_the_backend():
    """Backends that predate padding keep working on grids that are multiples of the cube."""
    rec = Recording()
    model = VideoDiT(small())
    model.set_attention(rec)
    model(*inputs(model.cfg, size=(4, 8, 8))[:2])
    assert len(rec.calls) == 2


# --------------------------------------------------------------------------- cube-order plumbing

def test_output_independent_of_cube_layout():
    # Attention is permutation-equivariant when RoPE positions follow the tokens, so any cube
    # gives the same output: checks patchify -> cube order -> RoPE positions -> unpatchify.
    ref_model = awake(VideoDiT(small(cube=(1, 1, 1), num_classes=3)))
    x, t, y = inputs(ref_model.cfg, size=(4, 8, 8))
    ref = ref_model(x, t, y)
    for cube in [(2, 2, 2), (4, 4, 4), (1, 2, 4), (4, 1, 2)]:
        model = VideoDiT(small(cube=cube, num_classes=3))
        model.load_state_dict(ref_model.state_dict())
        # fp32 sums over keys in another order: rounding only (outputs up to ~2; measured 7e-7)
        torch.testing.assert_close(model(x, t, y), ref, atol=2e-6, rtol=1e-5)


def test_rope_positions_matter():
    # ... and the test above is not vacuous: shuffling the token grid changes the output.
    model = awake(VideoDiT(small()))
    x, t, _ = inputs(model.cfg, size=(4, 8, 8))
    out, out_flipped = model(x, t), model(x.flip(2), t).flip(2)
    assert (out - out_flipped).abs().max() > 1e-3


def test_rope_scores_depend_on_relative_3d_offset_only():
    # q.k after 3D RoPE is a function of (t, h, w)_q - (t, h, w)_k alone, and every axis moves it.
    from dsv.models.dit import Rotary3D
    from dsv.ops.layout import cube_coordinates
    grid, cube, hd = (4, 4, 4), (2, 2, 2), 16
    n = prod(grid)
    cos, sin = Rotary3D(hd, theta=100.0).cos_sin(grid, cube, torch.device("cpu"))
    q, k = torch.randn(2, 1, 1, 1, hd, generator=torch.Generator().manual_seed(0)).expand(2, 1, 1, n, hd)
    scores = (Rotary3D.rotate(q, cos, sin)[0, 0] @ Rotary3D.rotate(k, cos, sin)[0, 0].T).flatten()  # (N*N,)
    pos = cube_coordinates(grid, cube)
    offsets = [tuple(d) for d in (pos[:, None] - pos[None]).view(-1, 3).tolist()]
    by_offset: dict[tuple, list[float]] = {}
    for d, sc in zip(offsets, scores.tolist()):
        by_offset.setdefault(d, []).append(sc)
    assert max(max(v) - min(v) for v in by_offset.values()) < 1e-5  # fp32 rotation of O(1) vectors
    for d in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert abs(by_offset[d][0] - by_offset[(0, 0, 0)][0]) > 1e-3, f"offset {d} does not move the score"


# --------------------------------------------------------------------------- conditioning

def test_text_padding_mask():
    cfg = small(text_dim=8)
    model = awake(VideoDiT(cfg))
    x, t, _ = inputs(cfg)
    text = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = model(x, t, text=text, text_mask=mask)
    padded = text.clone()
    padded[0, 4:] = torch.randn(2, 8) * 100
    # padded keys get exactly zero weight, so the output is bit-identical
    assert torch.equal(model(x, t, text=padded, text_mask=mask), out)
    real = text.clone()
    real[0, 0] += 1.0
    changed = model(x, t, text=real, text_mask=mask)
    assert (changed[0] - out[0]).abs().max() > 1e-4 and torch.equal(changed[1], out[1])


def test_fully_masked_text_gives_finite_output_and_grads():
    cfg = small(text_dim=8)
    model = awake(VideoDiT(cfg))
    x, t, _ = inputs(cfg)
    out = model(x, t, text=torch.randn(2, 3, 8), text_mask=torch.tensor([[False] * 3, [True] * 3]))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_labels_null_class():
    cfg = small(num_classes=3)
    model = awake(VideoDiT(cfg))
    with torch.no_grad():
        model.y_embed.table.weight.normal_()
    x, t, y = inputs(cfg)
    model.eval()
    null = model(x, t, torch.full_like(y, cfg.num_classes))
    torch.testing.assert_close(model(x, t, None), null, atol=0, rtol=0)  # y=None is the null label
    assert (model(x, t, y) - null).abs().max() > 1e-3
    model.train()  # no label dropout inside the model: training mode gives the same output
    torch.testing.assert_close(model(x, t, y), model.eval()(x, t, y), atol=0, rtol=0)


# --------------------------------------------------------------------------- errors name the field

@pytest.mark.parametrize("kw,field", [
    (dict(hidden=30, heads=4), "heads"),
    (dict(hidden=20, heads=4), "head_dim"),  # head_dim 5: odd
    (dict(hidden=8, heads=2), "head_dim"),  # head_dim 4: < 6
    (dict(patch=(1, 2)), "patch"),
    (dict(cube=(0, 2, 2)), "cube"),
    (dict(num_classes=-1), "num_classes"),
    (dict(text_dim=-2), "text_dim"),
    (dict(depth=0), "depth"),
])
def test_bad_config_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        VideoDiT(small(**kw))


def test_bad_input_names_field():
    cfg = small(patch=(2, 4, 4), cube=(2, 2, 2))
    assert cfg.check_input(8, 16, 32) == (4, 4, 8)
    with pytest.raises(ValueError, match=r"frames=7 % 2.*patch"):
        cfg.check_input(7, 16, 16)
    with pytest.raises(ValueError, match=r"width=18 % 4.*patch"):
        cfg.check_input(8, 16, 18)
    assert cfg.check_input(8, 12, 16) == (4, 3, 4)  # not a multiple of the cube: padded, not refused
    model = VideoDiT(cfg)
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.randn(1, 4, 8, 16, 16), torch.rand(1))
    with pytest.raises(ValueError, match="text_dim=0"):
        model(torch.randn(1, 3, 8, 16, 16), torch.rand(1), text=torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="num_classes=0"):
        model(torch.randn(1, 3, 8, 16, 16), torch.rand(1), torch.zeros(1, dtype=torch.long))


def test_replace_keeps_config_valid():
    cfg = replace(DIT_PRESETS["tiny"](), num_classes=10)
    assert VideoDiT(cfg).cfg.num_classes == 10
