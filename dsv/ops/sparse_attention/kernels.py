"""Triton kernels of block-sparse attention (FlashAttention-2 style), forward and backward.

One program per (query block, batch*head) walks that query block's list of KV blocks
(forward, dQ); one program per (KV block, batch*head) walks the transposed list of query
blocks that selected it (dK, dV). Every output tile is written by exactly one program:
deterministic, no atomics, no fp32 scratch copies of gradients.

The walked side (K and V in the forward and dQ, Q and dO in dK/dV) is read through TMA
tensor descriptors over a (B*H, S, D) view: a tile is one bulk copy addressed by
(head, first row), and the hardware zero-fills rows past S and columns past D.

Scores are kept in base 2: the raw q.k enters the exponent through one FMA with
`qk_scale = scale * log2(e)`, and the saved log-sum-exp `lse` is base 2 too, so
p = exp2(qk * qk_scale - lse).

q, k, v, o and their gradients are contiguous (B, H, S, D) with 16-byte aligned rows; lse and
delta are (B, H, S) fp32. Rows past S in the last block are loaded as 0 and never stored; keys
past S are masked to -inf in the forward (in the backward their k = v = 0 make their
contribution vanish). A query block with an empty list gets output 0 and lse = +inf; its dQ
loop runs no iteration and no transposed list holds it, so its gradients are 0 too.

Padding tokens of a partial token grid (dsv/ops/layout.py): with MASK_PADDING, `valid` holds
the real tokens of each block, which are its first ones. Key columns >= valid[kv_block] get
-inf in the forward and probability 0 in the backward (one load per KV block); query rows
>= valid[q_block] get output 0 and lse = +inf, so every probability the backward recomputes
for them is 0 and they send no gradient to K and V whatever their dO. A row that meets no real
key (a list of fully padded blocks) keeps a running max of -inf: the exponent is taken
against 0 instead, and the row ends like an empty list.
`forward` and `backward` run the Gluon kernels of gluon_forward.py and gluon_backward.py
instead where `kernel_impl` says so (Hopper, head dim 128); the launchers here are Triton's.
This module is imported lazily, so tests can set TRITON_INTERPRET=1 before it is.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from dsv.ops.block_index import BlockIndex, TransposedBlockIndex

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter holds scalars as numpy arrays of shape (1,) and turns a loaded
    loop bound into an int with int(array), which numpy >= 2.4 refuses; use .item()."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _fix_interpreter_loop_bounds()


def _configs(options: list[tuple[int, int, int]]) -> list[triton.Config]:
    """(walked tile rows, num_warps, num_stages) options; the interpreter gets only the first."""
    options = options[:1] if INTERPRETED else options
    return [triton.Config({"TILE": t}, num_warps=w, num_stages=s, pre_hook=_set_boxes) for t, w, s in options]


def _set_boxes(nargs: dict) -> None:
    """Before a launch: the walked-side descriptors copy boxes of one tile (1, TILE, padded D)."""
    rows = min(nargs["TILE"], nargs["BLOCK"])
    for arg in nargs.values():
        if isinstance(arg, TensorDescriptor):
            arg.block_shape = [1, rows, nargs["HEAD_DIM_P"]]


def _prune(configs, named_args, **kwargs):
    """Keeps the configs measured to win at this block size: 8 warps (two warpgroups) over a
    128-row block, 4 warps (one) over smaller blocks; tiles no larger than the block (below 64
    rows the kernels clamp the tile to the block)."""
    block = kwargs["BLOCK"]
    warps = 8 if block >= 128 else 4
    return [c for c in configs if c.kwargs["TILE"] <= max(block, 64) and c.num_warps == warps] or configs[:1]


# (walked tile rows, num_warps, num_stages), measured on an H200 at S = 32k, D = 128, densities
# 0.1 and 1 (benchmarks/results/attention_*_2026-11-22.md). Block 128: 8 warps over the whole
# block win; 4-warp programs over half a block, 16 warps or 32-row tiles are 10-300% slower.
# Block 64: 4 warps are 1.5-2x faster than 8. Kept small: each config is a compile.
FWD_OPTIONS = [(128, 8, 3), (128, 8, 2), (64, 8, 3), (64, 4, 3), (64, 4, 2)]
DKDV_OPTIONS = [(64, 8, 2), (64, 8, 3), (64, 4, 2), (32, 4, 3)]
DQ_OPTIONS = [(128, 8, 2), (64, 8, 3), (64, 8, 2), (64, 4, 3), (32, 4, 3)]
TUNING_KEY = ["HEAD_DIM_P", "BLOCK", "EVEN_S", "MASK_PADDING"]
AUTOTUNE = dict(key=TUNING_KEY, prune_configs_by={"early_config_prune": _prune})


@triton.jit
def _load_tile(ptr, rows, cols, S, HEAD_DIM: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr):
    """(len(rows), len(cols)) tile of a contiguous (S, HEAD_DIM) matrix; zeros outside."""
    ptrs = ptr + rows[:, None] * HEAD_DIM + cols[None, :]
    if EVEN_S and EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(rows[:, None] < S) & (cols[None, :] < HEAD_DIM), other=0.0)
    return tile


@triton.jit
def _store_tile(ptr, tile, rows, cols, S, HEAD_DIM: tl.constexpr, EVEN_S: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = ptr + rows[:, None] * HEAD_DIM + cols[None, :]
    if EVEN_S and EVEN_D:
        tl.store(ptrs, tile)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < S) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _load_box(desc, bh, first_row, ROWS: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    """(ROWS, HEAD_DIM_P) tile of head bh from a (B*H, S, D) descriptor; zeros past S and D."""
    return desc.load([bh, first_row, 0]).reshape(ROWS, HEAD_DIM_P)


@triton.autotune(configs=_configs(FWD_OPTIONS), **AUTOTUNE)
@triton.jit
def _forward_kernel(
    Q, KD, VD, O, LSE, kv_counts, kv_indices, VALID, qk_scale, S, NQ, MAXSEL,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
    EVEN_S: tl.constexpr, EVEN_D: tl.constexpr, MASK_PADDING: tl.constexpr,
):
    T: tl.constexpr = TILE if TILE < BLOCK else BLOCK
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_DIM
    rows = q_block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_P)
    q = _load_tile(Q + base, rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (BLOCK, D)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM_P], dtype=tl.float32)
    row = bh * NQ + q_block
    num_selected = tl.load(kv_counts + row)
    for i in range(num_selected):
        kv_block = tl.load(kv_indices + row * MAXSEL + i)
        if MASK_PADDING:
            kv_valid = tl.load(VALID + kv_block)
        for j in tl.static_range(BLOCK // T):
            first_key = kv_block * BLOCK + j * T
            k = _load_box(KD, bh, first_key, T, HEAD_DIM_P)  # (T, D)
            v = _load_box(VD, bh, first_key, T, HEAD_DIM_P)
            # -- raw scores; keys past S (masked tail) and padding keys get -inf
            qk = tl.dot(q, tl.trans(k))  # (BLOCK, T)
            if not EVEN_S:
                qk = tl.where(first_key + tl.arange(0, T)[None, :] < S, qk, float("-inf"))
            if MASK_PADDING:
                qk = tl.where(j * T + tl.arange(0, T)[None, :] < kv_valid, qk, float("-inf"))
            # -- running max in base 2; the scale folds into one FMA per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_ref = m_new
            if MASK_PADDING:  # rows that have met no real key yet: exponents against 0, not -inf
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

    # -- normalise and save the base-2 log-sum-exp for the backward pass; an empty list leaves
    #    acc = 0, l = 0: output 0, and lse = +inf makes every probability recomputed from it 0
    nonempty = num_selected > 0
    if MASK_PADDING:  # -- padding query rows and rows without a real key end as an empty list
        nonempty = nonempty & (tl.arange(0, BLOCK) < tl.load(VALID + q_block)) & (l_i > 0)
        acc = tl.where(nonempty[:, None], acc, 0.0)
    l_i = tl.where(nonempty, l_i, 1.0)
    acc = acc / l_i[:, None]
    _store_tile(O + base, acc.to(O.dtype.element_ty), rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
    tl.store(LSE + bh * S + rows, tl.where(nonempty, m_i + tl.math.log2(l_i), float("inf")), mask=rows < S)


@triton.jit
def _delta_kernel(O, DO, DELTA, S, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dO * O), the softmax backward's correction term, in fp32."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_P)
    o = _load_tile(O + bh * S * HEAD_DIM, rows, cols, S, HEAD_DIM, False, False).to(tl.float32)
    do = _load_tile(DO + bh * S * HEAD_DIM, rows, cols, S, HEAD_DIM, False, False).to(tl.float32)
    tl.store(DELTA + bh * S + rows, tl.sum(o * do, 1), mask=rows < S)


@triton.autotune(configs=_configs(DKDV_OPTIONS), **AUTOTUNE)
@triton.jit
def _dkdv_kernel(
    QD, K, V, DOD, LSE, DELTA, DK, DV, q_counts, q_offsets, q_blocks, VALID, scale, qk_scale, S, NKV, LIST_WIDTH,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
    EVEN_S: tl.constexpr, EVEN_D: tl.constexpr, MASK_PADDING: tl.constexpr,
):
    T: tl.constexpr = TILE if TILE < BLOCK else BLOCK
    kv_block = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_DIM
    keys = kv_block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_P)
    k = _load_tile(K + base, keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (BLOCK, D)
    v = _load_tile(V + base, keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
    dk = tl.zeros([BLOCK, HEAD_DIM_P], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM_P], dtype=tl.float32)
    if MASK_PADDING:  # padding keys of this block: probability 0 against every query
        key_real = tl.arange(0, BLOCK) < tl.load(VALID + kv_block)

    column = bh * NKV + kv_block
    num_selecting = tl.load(q_counts + column)
    first = bh * LIST_WIDTH + tl.load(q_offsets + column)
    for i in range(num_selecting):
        q_block = tl.load(q_blocks + first + i)
        for j in tl.static_range(BLOCK // T):
            first_row = q_block * BLOCK + j * T
            rows = first_row + tl.arange(0, T)
            q = _load_box(QD, bh, first_row, T, HEAD_DIM_P)  # (T, D)
            do = _load_box(DOD, bh, first_row, T, HEAD_DIM_P)
            # rows past S: lse = +inf makes their probabilities 0
            lse = tl.load(LSE + bh * S + rows, mask=rows < S, other=float("inf"))
            delta = tl.load(DELTA + bh * S + rows, mask=rows < S, other=0.0)
            # -- recompute the probabilities, transposed: (BLOCK, T)
            p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
            if MASK_PADDING:
                p_t = tl.where(key_real[:, None], p_t, 0.0)
            # -- dV += P^T dO;  dS^T = P^T * (V dO^T - delta);  dK += dS^T Q
            dv = tl.dot(p_t.to(do.dtype), do, dv)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk)

    _store_tile(DK + base, (dk * scale).to(DK.dtype.element_ty), keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
    _store_tile(DV + base, dv.to(DV.dtype.element_ty), keys, cols, S, HEAD_DIM, EVEN_S, EVEN_D)


@triton.autotune(configs=_configs(DQ_OPTIONS), **AUTOTUNE)
@triton.jit
def _dq_kernel(
    Q, KD, VD, DO, LSE, DELTA, DQ, kv_counts, kv_indices, VALID, scale, qk_scale, S, NQ, MAXSEL,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
    EVEN_S: tl.constexpr, EVEN_D: tl.constexpr, MASK_PADDING: tl.constexpr,
):
    T: tl.constexpr = TILE if TILE < BLOCK else BLOCK
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * HEAD_DIM
    rows = q_block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM_P)
    q = _load_tile(Q + base, rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)  # (BLOCK, D)
    do = _load_tile(DO + base, rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)
    lse = tl.load(LSE + bh * S + rows, mask=rows < S, other=float("inf"))
    delta = tl.load(DELTA + bh * S + rows, mask=rows < S, other=0.0)
    dq = tl.zeros([BLOCK, HEAD_DIM_P], dtype=tl.float32)

    row = bh * NQ + q_block
    num_selected = tl.load(kv_counts + row)
    for i in range(num_selected):
        kv_block = tl.load(kv_indices + row * MAXSEL + i)
        if MASK_PADDING:
            kv_valid = tl.load(VALID + kv_block)
        for j in tl.static_range(BLOCK // T):
            first_key = kv_block * BLOCK + j * T
            k = _load_box(KD, bh, first_key, T, HEAD_DIM_P)  # (T, D)
            v = _load_box(VD, bh, first_key, T, HEAD_DIM_P)
            # -- recompute P; dS = P * (dO V^T - delta);  dQ += dS K  (keys past S: k = 0)
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK, T)
            if MASK_PADDING:
                p = tl.where(j * T + tl.arange(0, T)[None, :] < kv_valid, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)

    _store_tile(DQ + base, (dq * scale).to(DQ.dtype.element_ty), rows, cols, S, HEAD_DIM, EVEN_S, EVEN_D)


def _padded(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _shape_args(q: Tensor, index: BlockIndex, valid: Tensor | None) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_P=_padded(head_dim), BLOCK=index.block_size,
        EVEN_S=q.shape[-2] % index.block_size == 0, EVEN_D=head_dim == _padded(head_dim),
        MASK_PADDING=valid is not None,
    )


def _descriptor(t: Tensor) -> TensorDescriptor:
    """TMA descriptor over the (B*H, S, D) view of a contiguous (B, H, S, D) tensor; its box
    (1, tile rows, padded D) is set per config before launch."""
    flat = t.view(-1, t.shape[-2], t.shape[-1])
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [1, 1, _padded(t.shape[-1])])


def _launch(tuner, num_blocks: int, batch_heads: int, args: dict, shape: dict, config: triton.Config | None) -> None:
    """Runs `tuner` (autotuned) or, given `config`, its kernel with exactly that config."""
    grid = (num_blocks, batch_heads)
    if config is None:
        tuner[grid](**args, **shape)
    else:
        _set_boxes({**args, **shape, **config.kwargs})
        tuner.fn[grid](**args, **shape, **config.all_kwargs())


def launch_forward(q, k, v, o, lse, index: BlockIndex, scale: float, config: triton.Config | None = None,
                   valid: Tensor | None = None) -> None:
    """Fills o (B, H, S, D) and the base-2 log-sum-exp lse (B, H, S) fp32; valid (NB,) int32
    real tokens per block, or None (no padding)."""
    b, h, s, _ = q.shape
    nq, maxsel = index.indices.shape[-2:]
    args = dict(Q=q, KD=_descriptor(k), VD=_descriptor(v), O=o, LSE=lse, kv_counts=index.counts,
                kv_indices=index.indices, VALID=_valid_arg(valid, index), qk_scale=scale * LOG2E, S=s, NQ=nq,
                MAXSEL=maxsel)
    _launch(_forward_kernel, nq, b * h, args, _shape_args(q, index, valid), config)


def launch_delta(o: Tensor, do: Tensor, delta: Tensor) -> None:
    """Fills delta (B, H, S) fp32 with rowsum(dO * O)."""
    b, h, s, d = o.shape
    _delta_kernel[(triton.cdiv(s, 64), b * h)](o, do, delta, s, d, _padded(d), 64)


def launch_dkdv(q, k, v, do, lse, delta, dk, dv, index: BlockIndex, transposed: TransposedBlockIndex, scale: float,
                config: triton.Config | None = None, valid: Tensor | None = None) -> None:
    """Fills dk, dv (B, H, S, D), walking the transposed lists."""
    b, h, s, _ = q.shape
    args = dict(QD=_descriptor(q), K=k, V=v, DOD=_descriptor(do), LSE=lse, DELTA=delta, DK=dk, DV=dv,
                q_counts=transposed.counts, q_offsets=transposed.offsets, q_blocks=transposed.q_blocks,
                VALID=_valid_arg(valid, index), scale=scale, qk_scale=scale * LOG2E, S=s, NKV=index.num_blocks,
                LIST_WIDTH=transposed.q_blocks.shape[-1])
    _launch(_dkdv_kernel, index.num_blocks, b * h, args, _shape_args(q, index, valid), config)


def launch_dq(q, k, v, do, lse, delta, dq, index: BlockIndex, scale: float, config: triton.Config | None = None,
              valid: Tensor | None = None) -> None:
    """Fills dq (B, H, S, D), walking the forward lists."""
    b, h, s, _ = q.shape
    nq, maxsel = index.indices.shape[-2:]
    args = dict(Q=q, KD=_descriptor(k), VD=_descriptor(v), DO=do, LSE=lse, DELTA=delta, DQ=dq,
                kv_counts=index.counts, kv_indices=index.indices, VALID=_valid_arg(valid, index), scale=scale,
                qk_scale=scale * LOG2E, S=s, NQ=nq, MAXSEL=maxsel)
    _launch(_dq_kernel, nq, b * h, args, _shape_args(q, index, valid), config)


def _valid_arg(valid: Tensor | None, index: BlockIndex) -> Tensor:
    """The VALID pointer; without padding the kernels never read it (any int32 tensor will do)."""
    return index.counts if valid is None else valid


def kernel_impl(q: Tensor, block_size: int, *, padded: bool = False) -> str:
    """"gluon" (the warp-specialised Hopper kernels of gluon_forward.py and gluon_backward.py,
    1.05-1.4x faster each than this module's where they apply: head dim 128, 16-bit inputs,
    blocks of 128 or an even number of 64-blocks, no padding tokens) or "triton" (this module's
    kernels, which alone mask the padding tokens of partial blocks: `padded`)."""
    if q.is_cuda and not INTERPRETED and not padded:
        from dsv.ops.sparse_attention.gluon_forward import gluon_forward_supported

        if gluon_forward_supported(q, block_size):
            return "gluon"
    return "triton"


def forward(q: Tensor, k: Tensor, v: Tensor, index: BlockIndex, scale: float,
            valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns o (B, H, S, D) and the base-2 log-sum-exp (B, H, S) fp32; valid (NB,) int32 real
    tokens per block or None."""
    b, h, s, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    if kernel_impl(q, index.block_size, padded=valid is not None) == "gluon":
        from dsv.ops.sparse_attention import gluon_forward

        gluon_forward.launch_forward(q, k, v, o, lse, index, scale)
    else:
        launch_forward(q, k, v, o, lse, index, scale, valid=valid)
    return o, lse


def backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, index: BlockIndex, scale: float,
    transposed: TransposedBlockIndex | None = None, valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv for contiguous (B, H, S, D) inputs; dK/dV walk the transposed lists
    (`index.transpose()`, built here unless given)."""
    delta = torch.empty_like(lse)
    launch_delta(o, do, delta)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    transposed = index.transpose() if transposed is None else transposed
    if kernel_impl(q, index.block_size, padded=valid is not None) == "gluon":
        from dsv.ops.sparse_attention import gluon_backward

        gluon_backward.launch_dkdv(q, k, v, do, lse, delta, dk, dv, index, transposed, scale)
        gluon_backward.launch_dq(q, k, v, do, lse, delta, dq, index, scale)
    else:
        launch_dkdv(q, k, v, do, lse, delta, dk, dv, index, transposed, scale, valid=valid)
        launch_dq(q, k, v, do, lse, delta, dq, index, scale, valid=valid)
    return dq, dk, dv
