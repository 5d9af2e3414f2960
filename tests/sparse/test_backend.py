"""DSVAttention inside a VideoDiT: a sparse step over every block equals a dense step, the
activation-checkpoint recompute attends to the same blocks, and no_grad trains nothing."""
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from dsv.models.attention import DenseAttention
from dsv.models.dit import VideoDiT
from dsv.sparse.backend import DSVAttention
from tests.sparse.helpers import micro_model_config, sparse_config

CPU = torch.device("cpu")


def _model(backend, *, checkpointing: bool = False) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(micro_model_config())
    for p in model.parameters():  # adaLN-Zero would gate attention off: every weight random instead
        torch.nn.init.normal_(p, std=0.2)
    if checkpointing:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    model.set_attention(backend)
    return model


def _step(model: VideoDiT, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 1, 4, 16, 16, generator=gen), torch.rand(2, generator=gen)
    loss = model(x, t).square().mean()
    loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _in_stage_two(**overrides) -> DSVAttention:
    backend = DSVAttention(sparse_config(**overrides), micro_model_config(), CPU)
    backend.schedule.stage = 2
    return backend


def test_a_sparse_step_over_every_block_equals_a_dense_step():
    sparse = _in_stage_two(min_density=1.0, max_density=1.0)
    loss_dense, grads_dense = _step(_model(DenseAttention()))
    loss_sparse, grads_sparse = _step(_model(sparse))
    assert sparse.step_end(1)["sparse/density"] == 1.0 and sparse.layer_runs_sparse(0, 64)
    # fp32: gathered softmax over the same keys in another summation order than SDPA's math path
    assert abs(loss_sparse - loss_dense) <= 1e-6 * abs(loss_dense)
    for name, grad in grads_dense.items():
        torch.testing.assert_close(grads_sparse[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_recompute_under_activation_checkpointing_uses_the_forward_selection():
    plain, checkpointed = _in_stage_two(max_density=0.5), _in_stage_two(max_density=0.5)
    model_plain, model_ckpt = _model(plain), _model(checkpointed, checkpointing=True)
    for step in range(1, 4):
        loss_a, grads_a = _step(model_plain, seed=step)
        loss_b, grads_b = _step(model_ckpt, seed=step)
        metrics_a, metrics_b = plain.step_end(step), checkpointed.step_end(step)
        assert metrics_a["sparse/density"] == 0.5
        assert loss_a == loss_b
        for name, grad in grads_a.items():
            assert torch.equal(grads_b[name], grad), name
        assert metrics_a["sparse/predictor_loss"] == metrics_b["sparse/predictor_loss"]  # trained once per step
    for a, b in zip(plain.predictors.parameters(), checkpointed.predictors.parameters()):
        assert torch.equal(a, b)


def test_no_grad_trains_nothing_and_stage_one_is_dense():
    backend = DSVAttention(sparse_config(max_dense_steps=100), micro_model_config(), CPU)
    model = _model(backend)
    before = [p.clone() for p in backend.predictors.parameters()]
    x, t = torch.randn(2, 1, 4, 16, 16), torch.rand(2)
    with torch.no_grad():
        out_dsv = model(x, t)
        model.set_attention(DenseAttention())
        assert torch.equal(out_dsv, model(x, t))
    assert backend.step_end(1).get("sparse/predictor_loss") is None
    assert all(torch.equal(a, b) for a, b in zip(before, backend.predictors.parameters()))
