"""Block-sparse attention forward in Gluon (Triton's explicit-layout dialect) for Hopper.

Same contract as `kernels.launch_forward`: each query block walks its list of KV blocks and
writes o and the base-2 log-sum-exp. What the Triton kernel leaves to its compiler is
explicit here (FlashAttention-3's structure):
- Warp specialisation: one producer warp streams K and V tiles with TMA through a ring of
  STAGES shared-memory slots (a "ready" and a "free" mbarrier per slot); two consumer
  warpgroups of 64 query rows do the matmuls and the softmax. A program takes one 128-block
  (both consumers read one ring) or two 64-blocks ("paired": each consumer its own list and
  ring, so block 64 needs an even number of blocks).
- Intra-warpgroup overlap: each iteration issues S_{j+1} = Q K_{j+1}^T and P_j V_j as
  asynchronous wgmmas together, then runs block j+1's softmax while P_j V_j computes. Every
  wgmma retires inside its iteration: an in-flight register crossing the loop's back edge
  makes ptxas serialise all wgmmas (its C7514 advisory; a CPU test compiles for sm90 and
  checks that no such advisory appears).

Rows are addressed in a (B*H*S, D) view: a tile that runs past S reads the next head's
rows (or zeros past the tensor), which the key mask (-inf scores) and the row mask of the
stores make harmless.
"""
from __future__ import annotations

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from dsv.ops.block_index import BlockIndex

LOG2E = 1.4426950408889634
GLUON_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
ROWS = gl.constexpr(64)  # query rows per consumer warpgroup (a wgmma's M)
STAGES = 3  # K/V ring slots; 2 and 3 measured within noise of each other (H100, S = 32k, 64k)


def gluon_forward_supported(q: Tensor, block_size: int) -> bool:
    """Hopper (sm90), 16-bit inputs, head dim 128, blocks of 128 tokens, or of 64 with an even
    number of them (a program takes two). At head dim 64 the Triton kernels are as fast."""
    blocks = -(-q.shape[-2] // block_size)
    return (
        q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0) and q.dtype in GLUON_DTYPES
        and q.shape[-1] == 128 and (block_size == 128 or (block_size == 64 and blocks % 2 == 0))
    )


@gluon.jit
def _softmax(s, m_i, l_i, first_key, qk_scale, S, BLOCK: gl.constexpr, EVEN_S: gl.constexpr):
    """Online softmax of one (ROWS, BLOCK) tile of raw scores in base 2: returns the
    probabilities, the rescale factor of the running sums, and the new max and sum."""
    if not EVEN_S:
        keys = first_key + gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s.type.layout))
        s = gl.where(gl.expand_dims(keys < S, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _store_rows(ptr, tile, first_row, head_row, S, HEAD_DIM: gl.constexpr):
    """Stores a (ROWS, HEAD_DIM) fp32 register tile, in ptr's dtype, as rows [first_row,
    first_row + ROWS) of head `head_row` in the (B*H*S, D) view, those inside the sequence only."""
    rows = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, tile.type.layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, tile.type.layout))
    offsets = gl.expand_dims((head_row + rows).to(gl.int64) * HEAD_DIM, 1) + gl.expand_dims(cols, 0)
    gl.store(ptr + offsets, tile.to(ptr.dtype.element_ty), mask=gl.expand_dims(rows < S, 1))


@gluon.jit
def _block_lists(kv_counts, kv_indices, bh, pair, NQ, MAXSEL, PAIRED: gl.constexpr):
    """Counts and list pointers of the two consumers' query blocks: both the program's one
    block, or (PAIRED) blocks 2 pair and 2 pair + 1."""
    first_block = bh * NQ + (2 * pair if PAIRED else pair)
    count0 = gl.load(kv_counts + first_block)
    list0 = kv_indices + first_block.to(gl.int64) * MAXSEL
    if PAIRED:
        count1 = gl.load(kv_counts + first_block + 1)
        list1 = list0 + MAXSEL
    else:
        count1 = count0
        list1 = list0
    return count0, list0, count1, list1


@gluon.jit
def _consumer(q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_free, v_free, O, LSE, kv_list, n, nonempty,
              head_row, pair, qk_scale, S, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr,
              EVEN_S: gl.constexpr, PART: gl.constexpr, RING: gl.constexpr):
    """One warpgroup: query rows [(2 pair + PART) ROWS, (2 pair + PART + 1) ROWS), walking
    `kv_list` through ring slots [RING, RING + STAGES)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    q = q_smem.index(PART)
    zero_s = gl.zeros([ROWS, BLOCK], gl.float32, s_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)

    # -- S_0 and P_0
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(RING), 0)
    s = warpgroup_mma(q, k_ring.index(RING).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_free.index(RING))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, gl.load(kv_list) * BLOCK, qk_scale, S, BLOCK, EVEN_S)

    for j in range(0, n - 1):
        slot = (j + 1) % STAGES
        mbarrier.wait(k_ready.index(RING + slot), ((j + 1) // STAGES) & 1)
        s = warpgroup_mma(q, k_ring.index(RING + slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(RING + j % STAGES), (j // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_ring.index(RING + j % STAGES), acc, is_async=True)
        # -- S_{j+1} retired (P_j V_j may still run): release its K slot, softmax of block j+1
        s = warpgroup_mma_wait(1, deps=(s,))
        mbarrier.arrive(k_free.index(RING + slot))
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, gl.load(kv_list + j + 1) * BLOCK, qk_scale, S, BLOCK, EVEN_S)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(v_free.index(RING + j % STAGES))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc_layout)), 1)

    last = n - 1
    mbarrier.wait(v_ready.index(RING + last % STAGES), (last // STAGES) & 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = warpgroup_mma(p_op, v_ring.index(RING + last % STAGES), acc, is_async=True)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))

    # -- normalise; store the rows inside the sequence and their base-2 log-sum-exp
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, acc_layout)), 1)
    acc = gl.where(nonempty, acc, 0.0)
    first_row = (2 * pair + PART) * ROWS
    _store_rows(O, acc, first_row, head_row, S, HEAD_DIM)
    lse_rows = first_row + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + head_row + lse_rows, gl.where(nonempty, m_i + gl.log2(l_i), float("inf")), mask=lse_rows < S)


@gluon.jit
def _fill_kv(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_free, v_free, slot, j, row, pred,
             STAGES: gl.constexpr):
    """Waits until ring slot `slot` is free, then TMA-copies block j's K and V rows into it."""
    free_phase = ((j // STAGES) & 1) ^ 1  # a fresh barrier passes a wait on phase 1
    mbarrier.wait(k_free.index(slot), free_phase, pred=pred)
    mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [row, 0], k_ready.index(slot), k_ring.index(slot), pred=pred)
    mbarrier.wait(v_free.index(slot), free_phase, pred=pred)
    mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(v_desc, [row, 0], v_ready.index(slot), v_ring.index(slot), pred=pred)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_free, v_free, list0, n0, list1,
            n1, head_row, pair, BLOCK: gl.constexpr, STAGES: gl.constexpr, PAIRED: gl.constexpr):
    """Producer warp: the two consumers' query rows once, then the listed blocks' K and V: one
    list into one ring that both consumers read, or (PAIRED) each consumer's list into its own."""
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    for part in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [head_row + (2 * pair + part) * ROWS, 0], q_bar, q_smem.index(part))
    if PAIRED:
        for j in range(gl.maximum(n0, n1)):
            slot = j % STAGES
            row0 = head_row + gl.load(list0 + j, mask=j < n0, other=0) * BLOCK
            _fill_kv(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_free, v_free, slot, j, row0, j < n0,
                     STAGES)
            row1 = head_row + gl.load(list1 + j, mask=j < n1, other=0) * BLOCK
            _fill_kv(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_free, v_free, STAGES + slot, j, row1, j < n1,
                     STAGES)
    else:
        for j in range(n0):
            row = head_row + gl.load(list0 + j) * BLOCK
            _fill_kv(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, k_free, v_free, j % STAGES, j, row, True, STAGES)


@gluon.jit
def _forward_kernel(
    q_desc, k_desc, v_desc, O, LSE, kv_counts, kv_indices, qk_scale, S, NQ, MAXSEL,
    HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, STAGES: gl.constexpr, EVEN_S: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):
    """A program takes 2 * ROWS query rows: one 128-block, or (PAIRED) two 64-blocks."""
    PAIRED: gl.constexpr = BLOCK == ROWS
    RINGS: gl.constexpr = 2 if PAIRED else 1
    dtype: gl.constexpr = q_desc.dtype
    pair = gl.program_id(0)
    bh = gl.program_id(1)
    head_row = bh * S  # this head's first row in the (B*H*S, D) view
    count0, list0, count1, list1 = _block_lists(kv_counts, kv_indices, bh, pair, NQ, MAXSEL, PAIRED)
    # an empty list walks its first (padding) entry, then gives output 0 and lse = +inf (the
    # backward's probabilities of its rows are then 0), as the Triton kernel does
    n0 = gl.maximum(count0, 1)
    n1 = gl.maximum(count1, 1)

    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [RINGS * STAGES, BLOCK, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [RINGS * STAGES, BLOCK, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [RINGS * STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [RINGS * STAGES, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [RINGS * STAGES, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [RINGS * STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(RINGS * STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=3 - RINGS)  # every consumer of the ring releases a slot
        mbarrier.init(v_free.index(i), count=3 - RINGS)

    gl.warp_specialize([
        (_consumer, (q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_free, v_free, O, LSE, list0, n0, count0 > 0,
                     head_row, pair, qk_scale, S, HEAD_DIM, BLOCK, STAGES, EVEN_S, 0, 0)),
        (_consumer, (q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_free, v_free, O, LSE, list1, n1, count1 > 0,
                     head_row, pair, qk_scale, S, HEAD_DIM, BLOCK, STAGES, EVEN_S, 1, (RINGS - 1) * STAGES)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_free, v_free, list0, n0,
                   list1, n1, head_row, pair, BLOCK, STAGES, PAIRED)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def _descriptor(t: Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor over the (B*H*S, D) view, one (rows, D) tile per copy."""
    flat = t.view(-1, t.shape[-1])
    layout = gl.NVMMASharedLayout.get_default_for([rows, t.shape[-1]], GLUON_DTYPES[t.dtype])
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, t.shape[-1]], layout)


def launch_forward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, index: BlockIndex, scale: float,
                   stages: int = STAGES) -> None:
    """Fills o (B, H, S, D) and the base-2 log-sum-exp lse (B, H, S) fp32, as
    `kernels.launch_forward` does, for what `gluon_forward_supported` accepts; q, k, v
    contiguous and 16-byte aligned; an empty list gives output 0 and lse = +inf."""
    b, h, s, d = q.shape
    block = index.block_size
    nq, maxsel = index.indices.shape[-2:]
    _forward_kernel[(nq * block // 128, b * h)](
        _descriptor(q, ROWS.value), _descriptor(k, block), _descriptor(v, block), o, lse, index.counts, index.indices,
        scale * LOG2E, s, nq, maxsel, HEAD_DIM=d, BLOCK=block, STAGES=stages, EVEN_S=s % block == 0,
        CONSUMER_REGS=240, LOADER_REGS=24, num_warps=4,
    )
