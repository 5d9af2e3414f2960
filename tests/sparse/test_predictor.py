"""The predictor learns a planted low-rank attention pattern, and a RoPE position pattern when it
is given the model's rotary tables; its loss is zero only for the exact softmax; its training
stays out of the DiT's graph."""
import torch

from dsv.models.dit import Rotary3D
from dsv.sparse.backend import DSVAttention
from dsv.sparse.predictor import predictor_loss, rotary_pairs, sampled_rows
from tests.sparse.helpers import micro_model_config, planted_qk, sparse_config


def _explicit_loss(q_rows_lr, k_lr, q_rows, k, cosine_weight=0.95, magnitude_weight=0.05):
    """The loss written out on the predicted and exact (B, H, M, S) score rows, in float64."""
    p = (q_rows_lr.double() @ k_lr.double().transpose(-1, -2)) * q_rows_lr.shape[-1] ** -0.5
    e = (q_rows.double() @ k.double().transpose(-1, -2)) * q_rows.shape[-1] ** -0.5
    p, e = p - p.mean(-1, keepdim=True), e - e.mean(-1, keepdim=True)
    cosine = torch.nn.functional.cosine_similarity(p, e, dim=-1)
    log_ratio = torch.log(p.norm(dim=-1) / e.norm(dim=-1))
    return (cosine_weight * (1 - cosine) + magnitude_weight * log_ratio.square()).mean((0, 2))


def test_closed_form_loss_equals_the_loss_on_explicit_rows():
    torch.manual_seed(0)
    q_rows_lr, k_lr = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 45, 4) + 0.5  # S = 45: not a multiple of 64
    q_rows, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 45, 8) - 0.3
    got = predictor_loss(q_rows_lr, k_lr, q_rows, k, cosine_weight=0.95, magnitude_weight=0.05)
    torch.testing.assert_close(got, _explicit_loss(q_rows_lr, k_lr, q_rows, k).float())  # fp32 vs fp64 rounding


def test_loss_is_zero_for_the_exact_softmax_only():
    torch.manual_seed(0)
    q_rows, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 40, 4)
    weights = dict(cosine_weight=0.95, magnitude_weight=0.05)
    shift = torch.randn(4)  # k~ = k + c shifts every predicted row by a constant: same softmax
    torch.testing.assert_close(predictor_loss(q_rows, k + shift, q_rows, k, **weights), torch.zeros(3),
                               atol=1e-5, rtol=0)
    hotter = predictor_loss(2 * q_rows, k, q_rows, k, **weights)  # twice the exact scores
    torch.testing.assert_close(hotter, torch.full((3,), 0.05 * torch.log(torch.tensor(2.0)).item() ** 2))
    assert (predictor_loss(torch.randn(2, 3, 5, 4), k, q_rows, k, **weights) > 0.3).all()


def test_sampled_rows_rotate_and_cover_every_row():
    seen = torch.cat([sampled_rows(100, 8, 512, step, torch.device("cpu")) for step in range(8)])
    assert torch.equal(seen.sort().values, torch.arange(100))
    assert sampled_rows(4096, 8, 64, 3, torch.device("cpu")).numel() == 64  # max_rows grows the stride


def test_predictor_learns_a_planted_low_rank_pattern():
    torch.manual_seed(0)
    model_cfg = micro_model_config(hidden=32, heads=2, depth=1)
    cfg = sparse_config(rank=4, predictor_lr=1e-2, row_stride=8, loss_threshold=0.05, max_dense_steps=10_000,
                        min_dense_steps=10_000)
    backend = DSVAttention(cfg, model_cfg, torch.device("cpu"))
    first = None
    for step in range(1, 301):
        x = torch.randn(2, 128, 32)
        q, k = planted_qk(x, heads=2, head_dim=16, rank=4, scale=4.0, seed=1)
        backend(q, k, k, layer=0, attn_input=x)
        loss = backend.step_end(step)["sparse/predictor_loss"]
        first = first or loss
    assert first > 0.5
    assert loss < 0.02 and backend.schedule.loss_ema < cfg.loss_threshold


def test_rotary_pairs_take_each_axis_from_its_highest_frequency():
    head_dim, rank = 64, 16  # Rotary3D(64): t 12 pairs, then h 10, then w 10
    pairs = rotary_pairs(head_dim, rank).tolist()
    assert pairs == [0, 6, 12, 14, 17, 22, 24, 27]  # t: 2 pairs, h and w: 3 each, down to the middle one
    for head_dim, rank in ((32, 4), (96, 16), (128, 16), (128, 32)):
        pairs = rotary_pairs(head_dim, rank)
        assert len(pairs) <= rank // 2 and pairs.unique().numel() == len(pairs) and pairs.max() < head_dim // 2


def test_predictor_learns_a_rope_position_pattern_only_with_positions():
    """Scores that depend on relative position alone (constant q, k rotated by the model's RoPE, on
    the predictor's pairs): with the rotary tables the predictor learns them, without it cannot."""
    model_cfg = micro_model_config(hidden=64, heads=2, depth=1)  # head_dim 32
    head_dim, rank = model_cfg.head_dim, 8
    cos, sin = Rotary3D(head_dim, 10000.0).cos_sin((4, 8, 8), model_cfg.cube, torch.device("cpu"))  # (256, 16)
    on_pairs = torch.zeros(head_dim // 2, 2)
    on_pairs[rotary_pairs(head_dim, rank)] = 1
    gen = torch.Generator().manual_seed(1)
    q_const, k_const = (2 * torch.randn(1, 2, 1, head_dim, generator=gen) * on_pairs.flatten() for _ in range(2))
    q, k = (Rotary3D.rotate(c.expand(2, 2, 256, head_dim), cos, sin) for c in (q_const, k_const))
    final = {}
    for with_positions in (True, False):
        torch.manual_seed(0)
        cfg = sparse_config(rank=rank, predictor_lr=1e-2, row_stride=8, min_dense_steps=10_000,
                            max_dense_steps=10_000, predictor_rope=with_positions)
        backend = DSVAttention(cfg, model_cfg, torch.device("cpu"))
        for step in range(1, 301):
            backend(q, k, k, layer=0, attn_input=torch.randn(2, 256, 64), rope=(cos, sin))
            final[with_positions] = backend.step_end(step)["sparse/predictor_loss"]
    assert final[True] < 0.01
    assert final[False] > 0.8


def test_predictor_training_leaves_the_dit_gradients_unchanged():
    from dsv.models.attention import DenseAttention
    from dsv.models.dit import VideoDiT

    model_cfg = micro_model_config()
    x, t = torch.randn(2, 1, 4, 16, 16), torch.rand(2)
    grads = []
    for backend in (DenseAttention(), DSVAttention(sparse_config(max_dense_steps=100), model_cfg, torch.device("cpu"))):
        torch.manual_seed(0)
        model = VideoDiT(model_cfg)
        for p in model.parameters():  # adaLN-Zero would gate attention off: every weight random instead
            torch.nn.init.normal_(p, std=0.2)
        model.set_attention(backend)
        model(x, t).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert grads[0]["blocks.0.attn.qkv.weight"].abs().min() > 0
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name
