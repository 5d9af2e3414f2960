"""DSV inside a VideoDiT on a token grid that is not a multiple of the cube: the sparse path
masks the padding, and the predictor and profiler see the real tokens only."""
import torch

from dsv.models.attention import DenseAttention
from dsv.models.dit import DiTConfig, VideoDiT
from dsv.ops.layout import CubePadding
from dsv.sparse.backend import DSVAttention
from dsv.sparse.config import SparseConfig
from dsv.sparse.layer import LayerShard, predictor_loss_share, profile
from dsv.sparse.profiler import fewest_covering

GRID, CUBE = (3, 5, 7), (2, 2, 2)  # padded to (4, 6, 8): 192 tokens for 105 real ones
PADDING = CubePadding(GRID, CUBE)


def _model_config() -> DiTConfig:
    return DiTConfig(in_channels=1, patch=(1, 4, 4), hidden=32, depth=2, heads=2, cube=CUBE)


def _sparse_config(**overrides) -> SparseConfig:
    base = dict(mode="dsv", block_size=8, row_stride=4, profile_every=1, min_dense_steps=0, max_dense_steps=2,
                dispatch="sparse", timing=False)
    return SparseConfig(**{**base, **overrides})


def _step(backend):
    torch.manual_seed(0)
    model = VideoDiT(_model_config())
    for p in model.parameters():  # adaLN-Zero would gate attention off: every weight random instead
        torch.nn.init.normal_(p, std=0.2)
    model.set_attention(backend)
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 1, 3, 20, 28, generator=gen), torch.rand(2, generator=gen)  # token grid GRID
    loss = model(x, t).square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_sparse_step_over_every_block_of_a_partial_grid_equals_a_dense_step():
    sparse = DSVAttention(_sparse_config(min_density=1.0, max_density=1.0), _model_config(), torch.device("cpu"))
    sparse.schedule.stage = 2
    loss_dense, grads_dense = _step(DenseAttention())
    loss_sparse, grads_sparse = _step(sparse)
    metrics = sparse.step_end(1)
    assert metrics["sparse/density"] == 1.0 and 0 < metrics["sparse/recall"] <= 1 + 1e-6
    # fp32: gathered softmax over the same real keys in another summation order than SDPA's
    assert abs(loss_sparse - loss_dense) <= 1e-6 * abs(loss_dense)
    for name, grad in grads_dense.items():
        torch.testing.assert_close(grads_sparse[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _shards():
    """The same layer as a padded shard and as a shard of the real tokens alone."""
    gen = torch.Generator().manual_seed(2)
    s = PADDING.tokens().numel()
    q, k = (torch.randn(1, 2, s, 16, generator=gen) for _ in range(2))
    q_lr, k_lr = (torch.randn(1, 2, s, 4, generator=gen) for _ in range(2))
    real = PADDING.positions()
    padded = LayerShard(q=q, k=k, q_lr=q_lr, k_lr=k_lr, heads=[0, 1], query_start=0, padding=PADDING)
    alone = LayerShard(q=q[:, :, real], k=k[:, :, real], q_lr=q_lr[:, :, real], k_lr=k_lr[:, :, real],
                       heads=[0, 1], query_start=0)
    return padded, alone, real


def test_predictor_loss_and_key_fraction_are_those_of_the_real_tokens():
    padded, alone, real = _shards()
    rows = torch.tensor([0, 3, 17, 50, 104])  # among the 105 real tokens
    cfg = _sparse_config()
    torch.testing.assert_close(predictor_loss_share(padded, real[rows], 5, cfg),
                               predictor_loss_share(alone, rows, 5, cfg), atol=1e-6, rtol=1e-5)  # fp32
    measured = profile(padded, real[rows], None, 5, 8, 0.9)
    torch.testing.assert_close(measured["key_fraction"], profile(alone, rows, None, 5, 8, 0.9)["key_fraction"])


def test_block_fraction_counts_only_blocks_that_hold_real_keys():
    """Blocks of 4 in cubes of 8: some blocks are padding only and never count."""
    padded, _, real = _shards()
    rows = real[torch.tensor([1, 40, 90])]
    measured = profile(padded, rows, None, 3, 4, 0.9)
    is_real = PADDING.tokens()
    scores = (padded.q[:, :, rows].double() @ padded.k.double().transpose(-1, -2) / 4).masked_fill(~is_real, -torch.inf)
    mass = torch.softmax(scores, -1).view(1, 2, 3, -1, 4).sum(-1)  # (B, H, M, NKV)
    holding = int(is_real.view(-1, 4).any(-1).sum())
    assert holding < is_real.numel() // 4
    expected = (fewest_covering(mass, 0.9).double() / holding).sum((0, 2)) / 3
    torch.testing.assert_close(measured["block_fraction"].double(), expected, atol=1e-6, rtol=1e-6)
