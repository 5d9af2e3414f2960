"""dsv's Triton block-sparse kernel behind echosim's modelled sparse attention on CUDA.

    import dsv.sim.kernels   # registers it: echosim.block_sparse_attention(q, k, v, density) on CUDA

The modelled op (echosim.trace.flops) keeps `density` of the key blocks; on CUDA it runs dsv's
kernel on uniformly random block lists of that density (blocks of SPARSE_BLOCK tokens, the same
lists at every call of a shape), so measured and real steps time the real kernel.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsv.ops.block_index import BlockIndex, random_block_index
from dsv.ops.sparse_attention import kernels
from echosim.trace.flops import SparseKernel, register_sparse_kernel

SPARSE_BLOCK = 64  # tokens per block of the random index
_indices: dict[tuple, BlockIndex] = {}


def random_index(q: Tensor, density: float) -> BlockIndex:
    """The same uniformly random block lists for every call of one shape and density."""
    b, h, s, _ = q.shape
    key = (b, h, s, density, q.device)
    if key not in _indices:
        generator = torch.Generator(q.device).manual_seed(0)
        _indices[key] = random_block_index(b, h, s, SPARSE_BLOCK, density, generator=generator)
    return _indices[key]


def _check_square(q: Tensor, k: Tensor) -> None:
    if k.shape[-2] != q.shape[-2]:
        raise NotImplementedError(
            f"echosim.block_sparse_attention runs on CUDA only with as many keys as queries (got {q.shape[-2]} "
            f"queries, {k.shape[-2]} keys, as under sequence parallelism); trace such configurations with fake "
            "tensors")


def forward(q: Tensor, k: Tensor, v: Tensor, density: float) -> tuple[Tensor, Tensor]:
    _check_square(q, k)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return kernels.forward(q, k, v, random_index(q, density), q.shape[-1] ** -0.5)


def backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             density: float) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.backward(grad.contiguous(), q, k, v, out, lse, random_index(q, density), q.shape[-1] ** -0.5)


register_sparse_kernel("cuda", SparseKernel(forward=forward, backward=backward))
