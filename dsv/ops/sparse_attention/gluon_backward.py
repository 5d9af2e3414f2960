"""Block-sparse attention backward in Gluon for Hopper: the dK/dV and dQ kernels.

Same contracts as `kernels.launch_dkdv` and `kernels.launch_dq`: dK/dV walk the transposed
lists (the query blocks that selected a KV block), dQ the forward lists; every output row is
written once (deterministic, no atomics). Structure as in gluon_forward.py: one producer
warp, two consumer warpgroups of 64 rows, a program over one 128-block or two 64-blocks.
- dK/dV: the producer loads the program's K and V once, then streams (Q, dO) tiles of TILE
  query rows with their lse and delta. Per tile: S^T = K Q^T and dP^T = V dO^T;
  P^T = exp2(S^T - lse); dV += P^T dO issued, dS^T = P^T (dP^T - delta) computed while it
  runs, dK += dS^T Q; then the next tile's S^T queued behind them, its dP^T once they retire
  (with both, ptxas runs out of registers and serialises the wgmmas: C7512).
- dQ: Q and dO loaded once, (K, V) tiles of TILE key rows streamed. Per tile: dQ += dS K,
  then the next tile's S = Q K^T and dP = dO V^T queued behind it.
Every wgmma retires inside its iteration (see gluon_forward.py on ptxas's C7514).

Rows past S: their lse is +inf (P = 0) and delta 0, so the (B*H*S, D) view's rows of the
next head that a tile may cover contribute nothing; keys past S are masked in dQ and their
rows are not stored in dK/dV.
"""
from __future__ import annotations

from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from dsv.ops.block_index import BlockIndex, TransposedBlockIndex
from dsv.ops.sparse_attention.gluon_forward import LOG2E, ROWS, _block_lists, _descriptor, _store_rows

TILE = 64  # rows per streamed tile: query rows in dK/dV, key rows in dQ
# ring slots per block size (a 64-block program keeps two rings in the same shared memory)
DKDV_STAGES = {128: 4, 64: 2}
DQ_STAGES = {128: 4, 64: 2}


@gluon.jit
def _ring_barriers(SLOTS: gl.constexpr, CONSUMERS: gl.constexpr):
    """A "ready" (one TMA arrival) and a "free" (one arrival per consumer) mbarrier per ring slot."""
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=CONSUMERS)
    return ready, free


@gluon.jit
def _dkdv_consumer(k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar, ready, free, DK, DV, n,
                   head_row, pair, scale, qk_scale, S, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
                   TILE: gl.constexpr, STAGES: gl.constexpr, PART: gl.constexpr, RING: gl.constexpr):
    """One warpgroup: key rows [(2 pair + PART) ROWS, (2 pair + PART + 1) ROWS), walking the
    query tiles of ring slots [RING, RING + STAGES)."""
    t_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TILE, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = k_smem.dtype
    k = k_smem.index(PART)
    v = v_smem.index(PART)
    zero_t = gl.zeros([ROWS, TILE], gl.float32, t_layout)
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    column_layout: gl.constexpr = gl.SliceLayout(0, t_layout)

    tile_in_block: gl.constexpr = BLOCK // TILE
    tiles = tile_in_block * n

    # -- tile 0's S^T = K Q^T and dP^T = V dO^T (issued on stale shared memory, and unused, if
    #    no query block selected this KV block)
    mbarrier.wait(kv_bar, 0)
    mbarrier.wait(ready.index(RING), 0, pred=tiles > 0)
    s_t = warpgroup_mma(k, q_ring.index(RING).permute((1, 0)), zero_t, use_acc=False, is_async=True)
    dp_t = warpgroup_mma(v, do_ring.index(RING).permute((1, 0)), zero_t, use_acc=False, is_async=True)
    s_t, dp_t = warpgroup_mma_wait(0, deps=(s_t, dp_t))
    for t in range(0, tiles):
        # -- dV += P^T dO and dK += dS^T Q of tile t, then tile t+1's S^T and dP^T: the tensor
        #    cores see them back to back; all retire before the iteration ends
        slot = t % STAGES
        q = q_ring.index(RING + slot)
        do = do_ring.index(RING + slot)
        lse = lse_ring.index(RING + slot).load(column_layout)  # rows past S: lse = +inf, p = 0
        p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0))
        p_op = gl.convert_layout(p_t.to(dtype), op_layout)
        dv = warpgroup_mma(p_op, do, dv, is_async=True)
        delta = delta_ring.index(RING + slot).load(column_layout)
        ds_op = gl.convert_layout((p_t * (dp_t - gl.expand_dims(delta, 0))).to(dtype), op_layout)
        dk = warpgroup_mma(ds_op, q, dk, is_async=True)
        following = (t + 1) % STAGES
        mbarrier.wait(ready.index(RING + following), ((t + 1) // STAGES) & 1, pred=t + 1 < tiles)
        s_t = warpgroup_mma(k, q_ring.index(RING + following).permute((1, 0)), zero_t, use_acc=False, is_async=True)
        # -- dV and dK retired: their operands' registers go to dP^T (registers are the limit)
        dk, dv, p_op, ds_op = warpgroup_mma_wait(1, deps=(dk, dv, p_op, ds_op))
        mbarrier.arrive(free.index(RING + slot))
        dp_t = warpgroup_mma(v, do_ring.index(RING + following).permute((1, 0)), zero_t, use_acc=False, is_async=True)
        s_t, dp_t = warpgroup_mma_wait(0, deps=(s_t, dp_t))

    _store_rows(DK, dk * scale, (2 * pair + PART) * ROWS, head_row, S, HEAD_DIM)
    _store_rows(DV, dv, (2 * pair + PART) * ROWS, head_row, S, HEAD_DIM)


@gluon.jit
def _fill_query_tile(q_desc, do_desc, q_ring, do_ring, lse_ring, delta_ring, ready, free, LSE, DELTA, slot, t,
                     first_row, head_row, S, pred, TILE: gl.constexpr, STAGES: gl.constexpr):
    """If `pred`: waits until ring slot `slot` is free, then fills it with query tile t: lse
    (+inf past S) and delta by plain stores, Q and dO rows by TMA."""
    if pred:  # a branch, not per-op predicates: the plain stores must not touch a slot in use
        row_layout: gl.constexpr = gl.BlockedLayout([TILE // 32], [32], [1], [0])
        mbarrier.wait(free.index(slot), ((t // STAGES) & 1) ^ 1)  # a fresh barrier passes a wait on phase 1
        rows = first_row + gl.arange(0, TILE, layout=row_layout)
        lse_ring.index(slot).store(gl.load(LSE + head_row + rows, mask=rows < S, other=float("inf")))
        delta_ring.index(slot).store(gl.load(DELTA + head_row + rows, mask=rows < S, other=0.0))
        mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)  # releases the stores
        tma.async_copy_global_to_shared(q_desc, [head_row + first_row, 0], ready.index(slot), q_ring.index(slot))
        tma.async_copy_global_to_shared(do_desc, [head_row + first_row, 0], ready.index(slot), do_ring.index(slot))


@gluon.jit
def _dkdv_loader(q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar, ready,
                 free, LSE, DELTA, q_blocks, first0, n0, first1, n1, head_row, pair, S, BLOCK: gl.constexpr,
                 TILE: gl.constexpr, STAGES: gl.constexpr, PAIRED: gl.constexpr):
    """Producer warp: the two consumers' K and V rows once, then the query tiles of the
    transposed list: one list into one ring both consumers read, or (PAIRED) each consumer's
    list into its own ring."""
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for part in gl.static_range(2):
        row = head_row + (2 * pair + part) * ROWS
        tma.async_copy_global_to_shared(k_desc, [row, 0], kv_bar, k_smem.index(part))
        tma.async_copy_global_to_shared(v_desc, [row, 0], kv_bar, v_smem.index(part))
    if PAIRED:  # TILE == BLOCK: a query block is one tile
        for t in range(gl.maximum(n0, n1)):
            first_row = gl.load(q_blocks + first0 + t, mask=t < n0, other=0) * BLOCK
            _fill_query_tile(q_desc, do_desc, q_ring, do_ring, lse_ring, delta_ring, ready, free, LSE, DELTA,
                             t % STAGES, t, first_row, head_row, S, t < n0, TILE, STAGES)
            first_row = gl.load(q_blocks + first1 + t, mask=t < n1, other=0) * BLOCK
            _fill_query_tile(q_desc, do_desc, q_ring, do_ring, lse_ring, delta_ring, ready, free, LSE, DELTA,
                             STAGES + t % STAGES, t, first_row, head_row, S, t < n1, TILE, STAGES)
    else:
        tile_in_block: gl.constexpr = BLOCK // TILE
        for t in range(0, tile_in_block * n0):
            first_row = gl.load(q_blocks + first0 + t // tile_in_block) * BLOCK + (t % tile_in_block) * TILE
            _fill_query_tile(q_desc, do_desc, q_ring, do_ring, lse_ring, delta_ring, ready, free, LSE, DELTA,
                             t % STAGES, t, first_row, head_row, S, True, TILE, STAGES)


@gluon.jit
def _dkdv_kernel(
    q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DK, DV, q_counts, q_offsets, q_blocks, scale, qk_scale, S, NKV,
    LIST_WIDTH, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):
    """A program takes 2 * ROWS key rows: one 128-block, or (PAIRED) two 64-blocks."""
    PAIRED: gl.constexpr = BLOCK == ROWS
    RINGS: gl.constexpr = 2 if PAIRED else 1
    dtype: gl.constexpr = q_desc.dtype
    pair = gl.program_id(0)
    bh = gl.program_id(1)
    column = bh * NKV + (2 * pair if PAIRED else pair)
    n0 = gl.load(q_counts + column)
    first0 = bh.to(gl.int64) * LIST_WIDTH + gl.load(q_offsets + column)
    if PAIRED:
        n1 = gl.load(q_counts + column + 1)
        first1 = bh.to(gl.int64) * LIST_WIDTH + gl.load(q_offsets + column + 1)
    else:
        n1 = n0
        first1 = first0
    head_row = bh * S

    k_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], v_desc.layout)
    q_ring = gl.allocate_shared_memory(dtype, [RINGS * STAGES, TILE, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(dtype, [RINGS * STAGES, TILE, HEAD_DIM], do_desc.layout)
    row_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    lse_ring = gl.allocate_shared_memory(gl.float32, [RINGS * STAGES, TILE], row_smem)
    delta_ring = gl.allocate_shared_memory(gl.float32, [RINGS * STAGES, TILE], row_smem)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    ready, free = _ring_barriers(RINGS * STAGES, 3 - RINGS)  # a ring has one consumer, or both

    gl.warp_specialize([
        (_dkdv_consumer, (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar, ready, free, DK, DV, n0,
                          head_row, pair, scale, qk_scale, S, HEAD_DIM, BLOCK, TILE, STAGES, 0, 0)),
        (_dkdv_consumer, (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar, ready, free, DK, DV, n1,
                          head_row, pair, scale, qk_scale, S, HEAD_DIM, BLOCK, TILE, STAGES, 1, (RINGS - 1) * STAGES)),
        (_dkdv_loader, (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar,
                        ready, free, LSE, DELTA, q_blocks, first0, n0, first1, n1, head_row, pair, S, BLOCK, TILE,
                        STAGES, PAIRED)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


@gluon.jit
def _dq_consumer(q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, LSE, DELTA, DQ, n, head_row, pair, kv_list,
                 scale, qk_scale, S, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, TILE: gl.constexpr,
                 STAGES: gl.constexpr, EVEN_S: gl.constexpr, PART: gl.constexpr, RING: gl.constexpr):
    """One warpgroup: query rows [(2 pair + PART) ROWS, (2 pair + PART + 1) ROWS), walking the
    key tiles of ring slots [RING, RING + STAGES)."""
    t_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TILE, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    tile_in_block: gl.constexpr = BLOCK // TILE
    tiles = tile_in_block * n
    q = q_smem.index(PART)
    do = do_smem.index(PART)
    zero_t = gl.zeros([ROWS, TILE], gl.float32, t_layout)
    dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    # -- this warpgroup's rows: lse = +inf past S makes their probabilities 0
    rows = (2 * pair + PART) * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, t_layout))
    lse = gl.expand_dims(gl.load(LSE + head_row + rows, mask=rows < S, other=float("inf")), 1)
    delta = gl.expand_dims(gl.load(DELTA + head_row + rows, mask=rows < S, other=0.0), 1)
    columns = gl.arange(0, TILE, layout=gl.SliceLayout(0, t_layout))

    mbarrier.wait(qdo_bar, 0)
    mbarrier.wait(ready.index(RING), 0)
    s = warpgroup_mma(q, k_ring.index(RING).permute((1, 0)), zero_t, use_acc=False, is_async=True)  # (ROWS, TILE)
    dp = warpgroup_mma(do, v_ring.index(RING).permute((1, 0)), zero_t, use_acc=False, is_async=True)  # dO V^T
    s, dp = warpgroup_mma_wait(0, deps=(s, dp))
    for t in range(0, tiles):
        # -- dQ += dS K of tile t, then tile t+1's S and dP, back to back on the tensor cores
        slot = t % STAGES
        p = gl.exp2(s * qk_scale - lse)
        if not EVEN_S:  # keys past S: the view's next-head rows must not count
            first_key = gl.load(kv_list + t // tile_in_block) * BLOCK + (t % tile_in_block) * TILE
            p = gl.where(gl.expand_dims(first_key + columns < S, 0), p, 0.0)
        ds_op = gl.convert_layout((p * (dp - delta)).to(dtype), op_layout)
        dq = warpgroup_mma(ds_op, k_ring.index(RING + slot), dq, is_async=True)
        following = (t + 1) % STAGES
        mbarrier.wait(ready.index(RING + following), ((t + 1) // STAGES) & 1, pred=t + 1 < tiles)
        s = warpgroup_mma(q, k_ring.index(RING + following).permute((1, 0)), zero_t, use_acc=False, is_async=True)
        dp = warpgroup_mma(do, v_ring.index(RING + following).permute((1, 0)), zero_t, use_acc=False, is_async=True)
        dq, ds_op = warpgroup_mma_wait(2, deps=(dq, ds_op))
        mbarrier.arrive(free.index(RING + slot))
        s, dp = warpgroup_mma_wait(0, deps=(s, dp))

    _store_rows(DQ, dq * scale, (2 * pair + PART) * ROWS, head_row, S, HEAD_DIM)


@gluon.jit
def _fill_key_tile(k_desc, v_desc, k_ring, v_ring, ready, free, slot, t, row, pred, STAGES: gl.constexpr):
    """Waits until ring slot `slot` is free, then TMA-copies key tile t's K and V rows into it."""
    mbarrier.wait(free.index(slot), ((t // STAGES) & 1) ^ 1, pred=pred)  # a fresh barrier passes a wait on phase 1
    mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [row, 0], ready.index(slot), k_ring.index(slot), pred=pred)
    tma.async_copy_global_to_shared(v_desc, [row, 0], ready.index(slot), v_ring.index(slot), pred=pred)


@gluon.jit
def _dq_loader(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, list0, n0, list1,
               n1, head_row, pair, BLOCK: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr, PAIRED: gl.constexpr):
    """Producer warp: the two consumers' Q and dO rows once, then the listed blocks' (K, V)
    tiles: one list into one ring both consumers read, or (PAIRED) each list into its own."""
    mbarrier.expect(qdo_bar, 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
    for part in gl.static_range(2):
        row = head_row + (2 * pair + part) * ROWS
        tma.async_copy_global_to_shared(q_desc, [row, 0], qdo_bar, q_smem.index(part))
        tma.async_copy_global_to_shared(do_desc, [row, 0], qdo_bar, do_smem.index(part))
    if PAIRED:  # TILE == BLOCK: a key block is one tile
        for t in range(gl.maximum(n0, n1)):
            row = head_row + gl.load(list0 + t, mask=t < n0, other=0) * BLOCK
            _fill_key_tile(k_desc, v_desc, k_ring, v_ring, ready, free, t % STAGES, t, row, t < n0, STAGES)
            row = head_row + gl.load(list1 + t, mask=t < n1, other=0) * BLOCK
            _fill_key_tile(k_desc, v_desc, k_ring, v_ring, ready, free, STAGES + t % STAGES, t, row, t < n1, STAGES)
    else:
        tile_in_block: gl.constexpr = BLOCK // TILE
        for t in range(0, tile_in_block * n0):
            row = head_row + gl.load(list0 + t // tile_in_block) * BLOCK + (t % tile_in_block) * TILE
            _fill_key_tile(k_desc, v_desc, k_ring, v_ring, ready, free, t % STAGES, t, row, True, STAGES)


@gluon.jit
def _dq_kernel(
    q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DQ, kv_counts, kv_indices, scale, qk_scale, S, NQ, MAXSEL,
    HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr, EVEN_S: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):
    """A program takes 2 * ROWS query rows: one 128-block, or (PAIRED) two 64-blocks."""
    PAIRED: gl.constexpr = BLOCK == ROWS
    RINGS: gl.constexpr = 2 if PAIRED else 1
    dtype: gl.constexpr = q_desc.dtype
    pair = gl.program_id(0)
    bh = gl.program_id(1)
    count0, list0, count1, list1 = _block_lists(kv_counts, kv_indices, bh, pair, NQ, MAXSEL, PAIRED)
    # an empty list walks its first (padding) entry: the forward saved lse = +inf for its rows,
    # so P = 0 and dq = 0 (and the ring keeps at least one tile)
    n0 = gl.maximum(count0, 1)
    n1 = gl.maximum(count1, 1)
    head_row = bh * S

    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], do_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [RINGS * STAGES, TILE, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [RINGS * STAGES, TILE, HEAD_DIM], v_desc.layout)
    qdo_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(qdo_bar, count=1)
    ready, free = _ring_barriers(RINGS * STAGES, 3 - RINGS)  # a ring has one consumer, or both

    gl.warp_specialize([
        (_dq_consumer, (q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, LSE, DELTA, DQ, n0, head_row, pair,
                        list0, scale, qk_scale, S, HEAD_DIM, BLOCK, TILE, STAGES, EVEN_S, 0, 0)),
        (_dq_consumer, (q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, LSE, DELTA, DQ, n1, head_row, pair,
                        list1, scale, qk_scale, S, HEAD_DIM, BLOCK, TILE, STAGES, EVEN_S, 1, (RINGS - 1) * STAGES)),
        (_dq_loader, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, list0, n0,
                      list1, n1, head_row, pair, BLOCK, TILE, STAGES, PAIRED)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def launch_dkdv(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, dk: Tensor, dv: Tensor,
                index: BlockIndex, transposed: TransposedBlockIndex, scale: float, stages: int | None = None) -> None:
    """Fills dk, dv (B, H, S, D) as `kernels.launch_dkdv` does, for what
    `gluon_forward.gluon_forward_supported` accepts."""
    b, h, s, d = q.shape
    block = index.block_size
    _dkdv_kernel[(index.num_blocks * block // 128, b * h)](
        _descriptor(q, TILE), _descriptor(do, TILE), _descriptor(k, ROWS.value), _descriptor(v, ROWS.value), lse, delta,
        dk, dv, transposed.counts, transposed.offsets, transposed.q_blocks, scale, scale * LOG2E, s, index.num_blocks,
        transposed.q_blocks.shape[-1], HEAD_DIM=d, BLOCK=block, TILE=TILE, STAGES=stages or DKDV_STAGES[block],
        CONSUMER_REGS=240, LOADER_REGS=24, num_warps=4,
    )


def launch_dq(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, dq: Tensor, index: BlockIndex,
              scale: float, stages: int | None = None) -> None:
    """Fills dq (B, H, S, D) as `kernels.launch_dq` does, for what
    `gluon_forward.gluon_forward_supported` accepts."""
    b, h, s, d = q.shape
    block = index.block_size
    nq, maxsel = index.indices.shape[-2:]
    _dq_kernel[(nq * block // 128, b * h)](
        _descriptor(q, ROWS.value), _descriptor(do, ROWS.value), _descriptor(k, TILE), _descriptor(v, TILE), lse, delta,
        dq, index.counts, index.indices, scale, scale * LOG2E, s, nq, maxsel, HEAD_DIM=d, BLOCK=block, TILE=TILE,
        STAGES=stages or DQ_STAGES[block], EVEN_S=s % block == 0, CONSUMER_REGS=240, LOADER_REGS=24, num_warps=4,
    )
