"""DSV under context parallelism: 2-process gloo runs over the heads and over the sequence match
the 1-process DSV run step by step (DiT loss, predictor loss, recall, budgets, density), and the
head costs the context-parallel backend balances follow the budgets."""

import pytest
import torch

from dsv.models.dit import VideoDiT
from dsv.parallel.head_parallel import assign_heads
from dsv.parallel.mesh import apply_context_parallel, build_parallel_mesh
from dsv.sparse.backend import DSVAttention
from dsv.sparse.schedule import kept_counts
from tests.parallel.cp_harness import run_distributed
from tests.sparse.helpers import micro_model_config, sparse_config
from tests.train.helpers import run_train

# 4 x 32 x 16 videos: 128 tokens, 16 blocks of 8, so each of 2 sequence ranks holds 8 whole blocks;
# budgets 0.6 x profiled block fraction in [0.1, 0.9] differ per head, so the heads get re-balanced
VIDEO = ["--data.height", "32", "--activation-checkpointing"]
DSV = ["--sparse", "dsv", "--sparse.block-size", "8", "--sparse.row-stride", "4", "--sparse.profile-every", "1",
       "--sparse.min-dense-steps", "0", "--sparse.max-dense-steps", "1", "--sparse.dispatch", "sparse",
       "--sparse.budget-margin", "0.6", "--sparse.min-density", "0.1", "--sparse.max-density", "0.9",
       "--no-sparse.timing"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_train(tmp_path_factory.mktemp("single"), "single", 1, *VIDEO, *DSV)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--cp-heads", "2"), ("--cp-seq", "2")])
def test_two_process_context_parallel_dsv_matches_one_process(tmp_path, single, flags):
    cp = run_train(tmp_path, "cp", 2, *VIDEO, *DSV, *flags)
    assert [r["sparse/stage"] for r in single] == [r["sparse/stage"] for r in cp] == [2, 2, 2, 2]
    assert all(r["sparse/density"] < 1 for r in single[1:])  # sparse attention from step 2
    for a, b in zip(single, cp, strict=True):
        # fp32. Same selection (same budgets, predictor weights equal up to rounding); what differs is
        # the order of sums: the DiT's gradient over 2 FSDP ranks, the predictor's gradient as the sum
        # of 2 ranks' token shares, a head's loss and profile as the sum of its sequence ranks' rows.
        for key in ("loss", "sparse/predictor_loss", "sparse/recall", "sparse/budget"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
        assert b["sparse/density"] == a["sparse/density"]  # kept-block counts from identical budgets
    assert cp[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)  # sparse under no_grad


def _micro_model(backend) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(micro_model_config())
    for p in model.parameters():  # adaLN-Zero would gate attention off: every weight random instead
        torch.nn.init.normal_(p, std=0.2)
    model.set_attention(backend)
    return model


def _train(model: VideoDiT, dsv: DSVAttention, steps: int, video=(4, 16, 16)) -> list[tuple[float, float]]:
    """(DiT loss, predictor loss) per step; the DiT itself is not updated."""
    out = []
    for step in range(1, steps + 1):
        gen = torch.Generator().manual_seed(step)
        x, t = torch.randn(2, 1, *video, generator=gen), torch.rand(2, generator=gen)
        loss = model(x, t).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        out.append((loss.item(), dsv.step_end(step)["sparse/predictor_loss"]))
    return out


def test_one_rank_grid_equals_the_plain_backend_and_head_costs_follow_the_budgets():
    cfg = sparse_config(max_dense_steps=1, budget_margin=0.6, min_density=0.1, max_density=0.9)
    plain = DSVAttention(cfg, micro_model_config(), torch.device("cpu"))
    split = DSVAttention(cfg, micro_model_config(), torch.device("cpu"))
    cp_attention = split.context_parallel_attention(build_parallel_mesh("cpu", 1))
    given = []
    set_costs = cp_attention.set_head_costs
    cp_attention.set_head_costs = lambda costs: (given.append(costs.clone()), set_costs(costs))
    for got, want in zip(_train(_micro_model(cp_attention), split, 3), _train(_micro_model(plain), plain, 3)):
        # 1 x 1 grid, the plain backend's math; fp32 products over concatenated features instead of
        # views of the projection may sum in another order, so predictor weights drift by rounding
        assert got == pytest.approx(want, rel=1e-5)
    # stage 2 from step 2: one hand-over on the switch, then one per budget change
    assert split.schedule.switch_step == 1 and 1 <= len(given) <= 3
    n = 64 // cfg.block_size
    want = torch.stack([kept_counts(split.budgets[i], n) / n for i in range(2)])  # (L, H) kept-block fractions
    assert torch.equal(given[-1], want) and not torch.equal(want, torch.ones_like(want))
    for layer in range(2):
        assert cp_attention.assignment(layer) == assign_heads(want[layer].tolist(), 1)


def test_one_rank_grid_on_a_partial_grid_equals_the_plain_backend():
    """Video 3 x 12 x 16: token grid (3, 3, 4) padded to (4, 4, 4), 36 real of 64 tokens. The
    selector hands DSV the padding as the plain backend gets it: same selection, predictor loss, profile."""
    cfg = sparse_config(max_dense_steps=1, budget_margin=0.6, min_density=0.1, max_density=0.9)
    plain = DSVAttention(cfg, micro_model_config(), torch.device("cpu"))
    split = DSVAttention(cfg, micro_model_config(), torch.device("cpu"))
    cp_attention = split.context_parallel_attention(build_parallel_mesh("cpu", 1))
    got = _train(_micro_model(cp_attention), split, 3, video=(3, 12, 16))
    want = _train(_micro_model(plain), plain, 3, video=(3, 12, 16))
    assert got == pytest.approx(want, rel=1e-5)
    assert split.schedule.switch_step == 1  # steps 2 and 3 sparse


def _sequence_parallel_run(rank, world_size, cfg):
    mesh = build_parallel_mesh("cpu", world_size, cp_seq=world_size)
    dsv = DSVAttention(cfg, micro_model_config(), torch.device("cpu"), world_size=world_size,
                       context_parallel=world_size)
    cp_attention = dsv.context_parallel_attention(mesh)
    return _train(apply_context_parallel(_micro_model(cp_attention), mesh, cp_attention), dsv, 3)


@pytest.mark.slow
def test_a_sequence_rank_without_sampled_rows_adds_a_zero_share():
    """One sampled row per step, always among rank 0's queries: rank 1 trains on nothing, yet
    joins the gradient exchange and the reduction."""
    cfg = sparse_config(max_dense_steps=1, max_rows=1, budget_margin=0.6, min_density=0.1, max_density=0.9)
    plain = DSVAttention(cfg, micro_model_config(), torch.device("cpu"))
    want = _train(_micro_model(plain), plain, 3)
    for got, one in zip(run_distributed(_sequence_parallel_run, 2, cfg), want, strict=True):
        assert got == pytest.approx(one, rel=1e-5)  # fp32, sums in another order (see above)
