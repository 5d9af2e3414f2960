"""Block-sparse attention: each (batch, head, query block) attends to its own list of whole
key/value blocks.

    out = sparse_attention(q, k, v, block_mask)          # FlexAttention BlockMask in
    out = sparse_attention_index(q, k, v, block_index)   # compact lists (the training path)

Backends: "triton" (our kernels; on CPU tensors only under TRITON_INTERPRET=1; on Hopper at head
dim 128, forward and backward run the warp-specialised Gluon kernels, see `kernels.kernel_impl`), "flex"
(torch FlexAttention with the same mask, compiled on CUDA), "reference" (plain PyTorch that
gathers the selected blocks; what CPU training uses) and "auto" (triton on CUDA, or flex
for head dims whose rows are not a multiple of 16 bytes; reference on CPU).

Partial token grids (dsv/ops/layout.py): `valid` (NB,) int32, the real tokens of each block,
which are its first ones (`layout.block_valid_counts`). Every backend then drops the padding
keys and gives the padding query rows output 0 and no gradient: the result is that of the
dense mask `block selected & real query & real key`. The Gluon kernels do not mask; inputs
with `valid` run the Triton kernels (`kernels.kernel_impl`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from dsv.ops.block_index import BlockIndex, TransposedBlockIndex, check_block_mask
from dsv.ops.sparse_attention.reference import dense_masked_attention, gathered_attention

BACKENDS = ("auto", "triton", "flex", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)

__all__ = ["sparse_attention", "sparse_attention_index", "dense_masked_attention", "gathered_attention",
           "flex_kernel_options", "check_valid_counts", "halve_valid"]


def sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, *, scale: float | None = None, backend: str = "auto",
    valid: Tensor | None = None,
) -> Tensor:
    """q, k, v: (B, H, S, D); `block_mask` (for S queries and keys, batch and heads B or 1, H
    or 1) selects whole blocks (its mask_mod is ignored); valid (NB,) int32 or None, see the
    module docstring. Converts the mask to compact lists once and runs `sparse_attention_index`."""
    _check_inputs(q, k, v, backend)
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask, got {type(block_mask).__name__}")
    check_block_mask(block_mask, q.shape[-2])
    _check_batch_and_heads("BlockMask", tuple(block_mask.kv_num_blocks.shape[:2]), q)
    if backend == "flex" and q.is_cuda and valid is None:
        return _flex(q, k, v, block_mask, _scale(q, scale))
    index = BlockIndex.from_block_mask(block_mask, seq_len=q.shape[-2])
    return sparse_attention_index(q, k, v, index, scale=scale, backend=backend, check_lists=False,  # lists built here
                                  valid=valid)


def sparse_attention_index(
    q: Tensor, k: Tensor, v: Tensor, index: BlockIndex, *, scale: float | None = None, backend: str = "auto",
    check_lists: bool = True, valid: Tensor | None = None,
) -> Tensor:
    """q, k, v: (B, H, S, D); index: lists of KV blocks per (B or 1, H or 1, query block); a
    query block with an empty list gets output 0 and zero gradients; valid: (NB,) int32 real
    tokens per block of a partial grid, or None (see the module docstring). Returns
    (B, H, S, D) in q's dtype; differentiable in q, k, v.

    The index's shapes are always checked against q. `check_lists` also checks its values
    (`BlockIndex.check_lists`: counts in range, ids in range, each block once, ascending),
    which reads a result back from the device: on a GPU that is a host sync per call, which
    the training step must not have. So it is on for indices a user builds, and our own
    selection path (dsv.sparse's attention backend, the context-parallel attention of
    dsv.parallel, the timing benchmarks), whose lists are valid by construction, turns it off."""
    _check_inputs(q, k, v, backend)
    b, h, s, _ = q.shape
    index = _check_index(index, q)
    _check_valid(valid, index, q)
    if check_lists:
        index.check_lists()
        if valid is not None:
            check_valid_counts(valid, index.block_size, s)
    scale = _scale(q, scale)
    if backend == "auto":
        backend = "reference" if not q.is_cuda else "triton" if _tma_readable(q) else "flex"
    if backend == "reference":
        return gathered_attention(q, k, v, index, scale, valid)
    if backend == "flex":
        return _flex(q, k, v, index.to_block_mask(token_mask_mod=not q.is_cuda, valid=valid), scale)
    _check_kernel_inputs(q, index)
    if q.shape[-1] > 128 and index.block_size > 64:
        valid = None if valid is None else halve_valid(valid, index.block_size, s)
        index = index.halve_blocks()  # 128-row tiles of a head wider than 128 overflow shared memory
    return _SparseAttention.apply(q, k, v, index.counts, index.indices, index.block_size, scale, valid)


class _SparseAttention(torch.autograd.Function):
    """Triton forward (saves o and the log-sum-exp) and backward (dQ over the lists, dK/dV
    over the transposed lists)."""

    @staticmethod
    def forward(ctx, q, k, v, counts, indices, block_size, scale, valid):
        from dsv.ops.sparse_attention import kernels

        q, k, v = (_tma_ready(t) for t in (q, k, v))
        index = BlockIndex(counts=counts, indices=indices, block_size=block_size, seq_len=q.shape[-2])
        o, lse = kernels.forward(q, k, v, index, scale, valid)
        ctx.block_size, ctx.scale, ctx.valid = block_size, scale, valid
        if not any(ctx.needs_input_grad[:3]):  # no backward will run (sampling, no_grad evaluation)
            return o
        # the backward walks the transposed lists; building them here hides their launches
        # behind the forward kernel instead of stalling the GPU at the start of the backward
        transposed = index.transpose()
        ctx.save_for_backward(q, k, v, o, lse, counts, indices, transposed.counts, transposed.offsets, transposed.q_blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        from dsv.ops.sparse_attention import kernels

        q, k, v, o, lse, counts, indices, *transposed = ctx.saved_tensors
        index = BlockIndex(counts=counts, indices=indices, block_size=ctx.block_size, seq_len=q.shape[-2])
        dq, dk, dv = kernels.backward(
            _tma_ready(do), q, k, v, o, lse, index, ctx.scale, transposed=TransposedBlockIndex(*transposed),
            valid=ctx.valid,
        )
        return dq, dk, dv, None, None, None, None, None


def _tma_readable(q: Tensor) -> bool:
    """The kernels read rows with TMA, which needs each row to be a multiple of 16 bytes."""
    return q.shape[-1] * q.element_size() % 16 == 0


def _tma_ready(t: Tensor) -> Tensor:
    """Contiguous and 16-byte aligned, as the kernels' tensor descriptors need."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float) -> Tensor:
    """FlexAttention with the same mask: compiled on CUDA, eager (forward only) on CPU."""
    global _compiled_flex
    if not q.is_cuda:
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, kernel_options=flex_kernel_options(block_mask))


def flex_kernel_options(block_mask: BlockMask) -> dict | None:
    """Compiled FlexAttention tiles 128 query rows by default (at head dim 128 on Hopper) and
    refuses masks of smaller blocks; tile its forward at the mask's block size instead. Its
    backward picks tiles from fixed defaults that these options do not reach: in torch 2.11
    the backward of a 64-token-block mask at head dim 128 compiles only under max-autotune."""
    block = min(block_mask.BLOCK_SIZE)
    return {"BLOCK_M": block, "BLOCK_N": block} if block < 128 else None


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, S, D), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape (B, H, S, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_index(index: BlockIndex, q: Tensor) -> BlockIndex:
    """Checks the index against q and broadcasts its batch and head dimensions."""
    b, h, s, _ = q.shape
    if index.seq_len != s:
        raise ValueError(f"block index is for a sequence of {index.seq_len} tokens, q has {s}")
    if index.counts.device != q.device:
        raise ValueError(f"block index is on {index.counts.device}, q on {q.device}")
    ib, ih, nq = index.counts.shape
    if nq != index.num_blocks or index.indices.shape[:3] != index.counts.shape:
        raise ValueError(
            f"block index counts {tuple(index.counts.shape)} / indices {tuple(index.indices.shape)} "
            f"do not match {index.num_blocks} blocks of {index.block_size}"
        )
    _check_batch_and_heads("block index", (ib, ih), q)
    if index.counts.dtype != torch.int32 or index.indices.dtype != torch.int32:
        raise TypeError("block index counts and indices must be int32")
    return index if (ib, ih) == (b, h) else index.expand(b, h)


def _check_valid(valid: Tensor | None, index: BlockIndex, q: Tensor) -> None:
    if valid is None:
        return
    if valid.shape != (index.num_blocks,) or valid.dtype != torch.int32:
        raise ValueError(f"valid must be ({index.num_blocks},) int32, one count of real tokens per block of "
                         f"{index.block_size}, got {tuple(valid.shape)} {valid.dtype}")
    if valid.device != q.device:
        raise ValueError(f"valid is on {valid.device}, q on {q.device}")


def check_valid_counts(valid: Tensor, block_size: int, seq_len: int) -> None:
    """ValueError unless every count is in [0, the block's length]; reads back (a host sync)."""
    lengths = (seq_len - block_size * torch.arange(valid.numel(), device=valid.device)).clamp(max=block_size)
    bad = ((valid < 0) | (valid > lengths)).nonzero()
    if bad.numel():
        i = bad[0].item()
        raise ValueError(f"valid[{i}] = {valid[i].item()}: a block's count of real tokens must be in "
                         f"[0, {lengths[i].item()}]")


def halve_valid(valid: Tensor, block_size: int, seq_len: int) -> Tensor:
    """Real-token counts of the same tokens in blocks of half the size (`BlockIndex.halve_blocks`)."""
    half = block_size // 2
    halves = torch.stack([valid.clamp(max=half), (valid - half).clamp(min=0)], -1).reshape(-1)  # (2 NB,)
    return halves[: -(-seq_len // half)].contiguous()


def _check_batch_and_heads(what: str, batch_heads: tuple[int, int], q: Tensor) -> None:
    (ib, ih), (b, h) = batch_heads, q.shape[:2]
    if ib not in (1, b) or ih not in (1, h):
        raise ValueError(f"{what} is for (B, H) = ({ib}, {ih}), q has ({b}, {h})")


def _check_kernel_inputs(q: Tensor, index: BlockIndex) -> None:
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes {KERNEL_DTYPES}, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"the triton backend takes head dims up to 256, got {q.shape[-1]}")
    if not _tma_readable(q):
        raise ValueError(
            f"the triton backend reads rows with TMA, which needs head_dim * {q.element_size()} bytes to be a multiple "
            f"of 16; got head_dim {q.shape[-1]} ({q.dtype}): pad the head dim or use backend='flex' or 'reference'"
        )
    if index.block_size not in KERNEL_BLOCK_SIZES:
        raise ValueError(f"the triton backend takes block sizes {KERNEL_BLOCK_SIZES}, got {index.block_size}")
    from dsv.ops.sparse_attention import kernels

    if not q.is_cuda and not kernels.INTERPRETED:
        raise RuntimeError(
            "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1, set before dsv's kernels are imported"
        )
