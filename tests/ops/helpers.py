"""Shared by the attention kernel tests: outputs and gradients of an attention function, and
flash-attention's accuracy rule against a float64 dense reference."""
from dsv.ops.sparse_attention import dense_masked_attention


def run(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn on leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def assert_close_to_fp64(ours, index, q, k, v, do, atol, valid=None):
    """Flash-attention's rule: our error vs float64 <= 2x PyTorch's error in the same precision + atol.
    `ours` is [out, dq, dk, dv]; `valid` the real tokens per block of a padded grid, or None."""
    scale = q.shape[-1] ** -0.5
    exact = run(lambda *t: dense_masked_attention(*t, index, scale, valid), *(x.double() for x in (q, k, v, do)))
    torch_same_precision = run(lambda *t: dense_masked_attention(*t, index, scale, valid), q, k, v, do)
    for name, mine, ref, base in zip(("out", "dq", "dk", "dv"), ours, exact, torch_same_precision):
        error = (mine.double() - ref).abs().max().item()
        torch_error = (base.double() - ref).abs().max().item()
        assert error <= 2 * torch_error + atol, f"{name}: {error:.3g} > 2 * {torch_error:.3g} + {atol}"
