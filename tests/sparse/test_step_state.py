"""The per-step state of DSVAttention: what a layer's training forward records (checked against
fp64 references), that step_end consumes it once and in order, that a second forward or a
recompute without one is an error, and that the recompute is recognised by where it runs."""
import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

from dsv.models.dit import VideoDiT
from dsv.ops.block_select import select_blocks
from dsv.parallel.mesh import build_parallel_mesh
from dsv.sparse.backend import DSVAttention
from dsv.sparse.predictor import sampled_rows
from dsv.sparse.profiler import profile_rows
from dsv.sparse.step_state import StepOrderError, in_recompute
from tests.sparse.helpers import micro_model_config, sparse_config

CPU = torch.device("cpu")


def _backend(**overrides) -> DSVAttention:
    """Stage 2 at half the KV blocks of the micro model (64 tokens, 8 blocks of 8), profiling every step."""
    backend = DSVAttention(sparse_config(min_density=0.5, max_density=0.5, **overrides), micro_model_config(), CPU)
    backend.schedule.stage = 2
    return backend


def _layer_inputs(seed: int = 0):
    """q, k, v (2, 2, 64, 16) and the attention input (2, 64, 32) of the micro model's shapes."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=gen) for _ in range(3))
    return q, k, v, torch.randn(2, 64, 32, generator=gen)


def _model(backend, checkpoint_impl: CheckpointImpl | None = None) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(micro_model_config())
    for p in model.parameters():  # adaLN-Zero would gate attention off: every weight random instead
        torch.nn.init.normal_(p, std=0.2)
    if checkpoint_impl is not None:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=checkpoint_impl, preserve_rng_state=False)
    model.set_attention(backend)
    return model


def _video(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 4, 16, 16, generator=gen), torch.rand(2, generator=gen)


def _direct_loss(q_lr, k_lr, q, k, cosine_weight, magnitude_weight):
    """(H,) the predictor loss by its definition, on explicit score rows: centred predicted and
    exact rows, cosine_weight (1 - cos) + magnitude_weight log(|p| / |e|)^2, mean over batch and rows."""
    p = q_lr @ k_lr.transpose(-1, -2) / q_lr.shape[-1] ** 0.5  # (B, H, M, S)
    e = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    p, e = p - p.mean(-1, keepdim=True), e - e.mean(-1, keepdim=True)
    cosine = (p * e).sum(-1) / (p.norm(dim=-1) * e.norm(dim=-1))
    ratio = torch.log(p.norm(dim=-1) / e.norm(dim=-1))
    return (cosine_weight * (1 - cosine) + magnitude_weight * ratio.square()).mean((0, 2))


def test_a_training_forward_records_selection_density_loss_and_profile():
    backend = _backend()
    predictor = copy.deepcopy(backend.predictors[0])
    q, k, v, x = _layer_inputs()
    backend(q, k, v, layer=0, attn_input=x)
    assert list(backend.step_state.layers) == [0] and backend.step_state.step == 1
    record = backend.step_state.layers[0]
    # selection: the predictor's q~, k~ at budget 0.5 -> 4 of 8 KV blocks per query block
    q_lr, k_lr = predictor(x)
    want = select_blocks(q_lr.detach(), k_lr.detach(), block_size=8, budget=torch.tensor([0.5, 0.5]), mode="fast")
    assert torch.equal(record.selection.counts, torch.full((2, 2, 8), 4, dtype=torch.int32))
    assert torch.equal(record.selection.indices, want.indices)
    assert record.density == 0.5
    # loss and profile of the sampled rows (every 4th from 0 in step 1), in fp64 by their definitions
    rows = sampled_rows(64, 4, 256, 0, CPU)
    proj = predictor.proj
    low_rank = torch.nn.functional.linear(x.double(), proj.weight.double(), proj.bias.double())  # (B, S, 2 * H * r)
    q_lr64, k_lr64 = low_rank.unflatten(-1, (2, 2, 16)).permute(2, 0, 3, 1, 4)  # each (B, H, S, r), no rope
    q64, k64 = q.double(), k.double()
    cfg = backend.cfg
    want_loss = _direct_loss(q_lr64[:, :, rows], k_lr64, q64[:, :, rows], k64, cfg.cosine_weight, cfg.magnitude_weight)
    torch.testing.assert_close(record.loss.double(), want_loss, rtol=1e-4, atol=1e-6)  # fp32 Gram form vs fp64 rows
    probs = torch.softmax(q64[:, :, rows] @ k64.transpose(-1, -2) / 4.0, -1)  # (B, H, M, S), sqrt(D) = 4
    want_profile = profile_rows(probs, rows, 8, cfg.tau, record.selection.to_dense())
    assert record.profile.keys() == want_profile.keys() == {"key_fraction", "block_fraction", "recall"}
    for name, value in want_profile.items():
        # fp32 vs fp64 probabilities; the counts are whole keys and blocks, the recall a sum of masses
        torch.testing.assert_close(record.profile[name].double(), value.double() / (2 * rows.numel()), rtol=1e-5,
                                   atol=1e-6)
    metrics = backend.step_end(1)
    assert metrics["sparse/density/L0"] == 0.5
    assert metrics["sparse/predictor_loss/L0"] == pytest.approx(record.loss.mean().item(), rel=1e-6)
    assert backend.step_state.steps_taken == 1 and backend.step_state.layers == {}


def test_no_grad_records_nothing():
    backend = _backend()
    q, k, v, x = _layer_inputs()
    with torch.no_grad():
        backend(q, k, v, layer=0, attn_input=x)
    assert backend.step_state.layers == {}
    assert "sparse/predictor_loss" not in backend.step_end(1)


def test_step_end_twice_or_out_of_order_is_an_error():
    backend = _backend()
    q, k, v, x = _layer_inputs()
    backend(q, k, v, layer=0, attn_input=x)
    backend.step_end(1)
    with pytest.raises(StepOrderError, match=r"step_end\(1\) after 1 steps.*\(2 now\)"):
        backend.step_end(1)
    with pytest.raises(StepOrderError, match=r"step_end\(3\) after 1 steps"):
        backend.step_end(3)
    assert backend.step == 1
    backend.step_end(2)  # a step without a training forward (e.g. all layers frozen) still counts


def test_a_second_training_forward_before_step_end_is_an_error_and_trains_nothing():
    backend = _backend()
    q, k, v, x = _layer_inputs()
    backend(q, k, v, layer=0, attn_input=x)
    grads = [p.grad.clone() for p in backend.predictors[0].parameters()]
    with pytest.raises(StepOrderError, match=r"layer 0 ran a second training forward in step 1: call step_end\(1\)"):
        backend(q, k, v, layer=0, attn_input=x)
    assert all(torch.equal(p.grad, g) for p, g in zip(backend.predictors[0].parameters(), grads))


def test_a_second_forward_under_context_parallelism_is_an_error():
    backend = _backend()
    model = _model(backend.context_parallel_attention(build_parallel_mesh("cpu", 1)))
    model(*_video())
    with pytest.raises(StepOrderError, match="layer 0 ran a second training forward in step 1"):
        model(*_video())


def test_in_recompute_is_true_only_inside_the_checkpoint_recompute():
    seen = []

    def block(x):
        seen.append(in_recompute())
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    block(x).sum().backward()
    assert seen == [False]
    for reentrant in (False, True):
        seen.clear()
        checkpoint(block, x, use_reentrant=reentrant).sum().backward()
        assert seen == [False, True], reentrant


def test_reentrant_checkpointing_is_refused_with_the_fix():
    """Its forward runs under no_grad, so the recompute would be the layer's only training forward."""
    model = _model(_backend(), CheckpointImpl.REENTRANT)
    loss = model(*_video()).square().mean()
    with pytest.raises(StepOrderError, match=r"recompute of layer 1 found no training forward.*use_reentrant=False"):
        loss.backward()


def test_loading_a_state_starts_the_step_after_it():
    saved = _backend()
    for step in (1, 2, 3):
        saved.step_end(step)
    backend = _backend()
    q, k, v, x = _layer_inputs()
    backend(q, k, v, layer=0, attn_input=x)
    backend.load_state_dict(saved.state_dict())
    assert backend.step_state.steps_taken == 3 and backend.step_state.layers == {}
    with pytest.raises(StepOrderError, match=r"step_end\(1\) after 3 steps"):
        backend.step_end(1)
    backend.step_end(4)
