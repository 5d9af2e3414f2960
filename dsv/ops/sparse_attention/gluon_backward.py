"""Block-sparse attention backward in Gluon for Hopper: the dK/dV kernel.

Same contract as `kernels.launch_dkdv`: one program per (KV block, batch*head) walks the
transposed list of query blocks that selected its KV block and writes dK and dV once
(deterministic, no atomics). Structure as in gluon_forward.py:
- one producer warp loads the program's K and V once, then streams (Q, dO) tiles of
  TILE query rows through a ring of STAGES shared-memory slots;
- two consumer warpgroups, 64 key rows each, hold their dK and dV accumulators in
  registers. Per tile: S^T = K Q^T and dP^T = V dO^T issued together; P^T = exp2(S^T - lse);
  dV += P^T dO issued, dS^T = P^T (dP^T - delta) computed while it runs; dK += dS^T Q.
  Every wgmma retires inside its iteration (see gluon_forward.py on ptxas's C7514).

Rows past S: their lse is +inf (P = 0) and delta 0, so the (B*H*S, D) view's rows of the
next head that a tile may cover contribute nothing; key rows past S are not stored.
"""
from __future__ import annotations

from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from dsv.ops.block_index import BlockIndex, TransposedBlockIndex
from dsv.ops.sparse_attention.gluon_forward import BLOCK, LOG2E, ROWS, _descriptor

TILE = 64  # rows per streamed tile: query rows in dK/dV, key rows in dQ
STAGES = 4  # ring slots of the dK/dV kernel
DQ_STAGES = 4


@gluon.jit
def _dkdv_consumer(k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar, ready, free, DK, DV, n,
                   head_row, kv_block, scale, qk_scale, S, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
                   TILE: gl.constexpr, STAGES: gl.constexpr, PART: gl.constexpr):
    """One warpgroup: key rows [PART * ROWS, (PART + 1) * ROWS) of the KV block."""
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
    mbarrier.wait(ready.index(0), 0, pred=tiles > 0)
    s_t = warpgroup_mma(k, q_ring.index(0).permute((1, 0)), zero_t, use_acc=False, is_async=True)
    dp_t = warpgroup_mma(v, do_ring.index(0).permute((1, 0)), zero_t, use_acc=False, is_async=True)
    s_t, dp_t = warpgroup_mma_wait(0, deps=(s_t, dp_t))
    for t in range(0, tiles):
        # -- dV += P^T dO and dK += dS^T Q of tile t, then tile t+1's S^T and dP^T: the tensor
        #    cores see them back to back; all retire before the iteration ends
        slot = t % STAGES
        q = q_ring.index(slot)
        do = do_ring.index(slot)
        lse = lse_ring.index(slot).load(column_layout)  # rows past S: lse = +inf, p = 0
        p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0))
        p_op = gl.convert_layout(p_t.to(dtype), op_layout)
        dv = warpgroup_mma(p_op, do, dv, is_async=True)
        delta = delta_ring.index(slot).load(column_layout)
        ds_op = gl.convert_layout((p_t * (dp_t - gl.expand_dims(delta, 0))).to(dtype), op_layout)
        dk = warpgroup_mma(ds_op, q, dk, is_async=True)
        following = (t + 1) % STAGES
        mbarrier.wait(ready.index(following), ((t + 1) // STAGES) & 1, pred=t + 1 < tiles)
        s_t = warpgroup_mma(k, q_ring.index(following).permute((1, 0)), zero_t, use_acc=False, is_async=True)
        # -- dV and dK retired: their operands' registers go to dP^T (registers are the limit)
        dk, dv, p_op, ds_op = warpgroup_mma_wait(1, deps=(dk, dv, p_op, ds_op))
        mbarrier.arrive(free.index(slot))
        dp_t = warpgroup_mma(v, do_ring.index(following).permute((1, 0)), zero_t, use_acc=False, is_async=True)
        s_t, dp_t = warpgroup_mma_wait(0, deps=(s_t, dp_t))

    keys = kv_block * BLOCK + PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    offsets = gl.expand_dims((head_row + keys).to(gl.int64) * HEAD_DIM, 1) + gl.expand_dims(cols, 0)
    inside = gl.expand_dims(keys < S, 1)
    gl.store(DK + offsets, (dk * scale).to(dtype), mask=inside)
    gl.store(DV + offsets, dv.to(dtype), mask=inside)


@gluon.jit
def _dkdv_loader(q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar, ready,
                 free, LSE, DELTA, q_blocks, first, n, head_row, kv_block, S, BLOCK: gl.constexpr, TILE: gl.constexpr,
                 STAGES: gl.constexpr):
    """Producer warp: the block's K and V halves once, then per query tile its Q and dO rows
    (TMA) and their lse (+inf past S) and delta (plain loads) into the ring."""
    row_layout: gl.constexpr = gl.BlockedLayout([TILE // 32], [32], [1], [0])
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for part in gl.static_range(2):
        row = head_row + kv_block * BLOCK + part * ROWS
        tma.async_copy_global_to_shared(k_desc, [row, 0], kv_bar, k_smem.index(part))
        tma.async_copy_global_to_shared(v_desc, [row, 0], kv_bar, v_smem.index(part))
    tile_in_block: gl.constexpr = BLOCK // TILE
    for t in range(0, tile_in_block * n):
        slot = t % STAGES
        mbarrier.wait(free.index(slot), ((t // STAGES) & 1) ^ 1)  # a fresh barrier passes a wait on phase 1
        first_row = gl.load(q_blocks + first + t // tile_in_block) * BLOCK + (t % tile_in_block) * TILE
        rows = first_row + gl.arange(0, TILE, layout=row_layout)
        lse_ring.index(slot).store(gl.load(LSE + head_row + rows, mask=rows < S, other=float("inf")))
        delta_ring.index(slot).store(gl.load(DELTA + head_row + rows, mask=rows < S, other=0.0))
        row = head_row + first_row
        mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)  # also releases the stores
        tma.async_copy_global_to_shared(q_desc, [row, 0], ready.index(slot), q_ring.index(slot))
        tma.async_copy_global_to_shared(do_desc, [row, 0], ready.index(slot), do_ring.index(slot))


@gluon.jit
def _dkdv_kernel(
    q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DK, DV, q_counts, q_offsets, q_blocks, scale, qk_scale, S, NKV,
    LIST_WIDTH, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    kv_block = gl.program_id(0)
    bh = gl.program_id(1)
    column = bh * NKV + kv_block
    n = gl.load(q_counts + column)
    first = bh.to(gl.int64) * LIST_WIDTH + gl.load(q_offsets + column)
    head_row = bh * S

    k_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], v_desc.layout)
    q_ring = gl.allocate_shared_memory(dtype, [STAGES, TILE, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(dtype, [STAGES, TILE, HEAD_DIM], do_desc.layout)
    row_smem: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    lse_ring = gl.allocate_shared_memory(gl.float32, [STAGES, TILE], row_smem)
    delta_ring = gl.allocate_shared_memory(gl.float32, [STAGES, TILE], row_smem)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=2)  # both consumers release a slot

    gl.warp_specialize([
        (_dkdv_consumer, (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar, ready, free, DK, DV, n, head_row,
                          kv_block, scale, qk_scale, S, HEAD_DIM, BLOCK, TILE, STAGES, 0)),
        (_dkdv_consumer, (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar, ready, free, DK, DV, n, head_row,
                          kv_block, scale, qk_scale, S, HEAD_DIM, BLOCK, TILE, STAGES, 1)),
        (_dkdv_loader, (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, kv_bar,
                        ready, free, LSE, DELTA, q_blocks, first, n, head_row, kv_block, S, BLOCK, TILE, STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


@gluon.jit
def _dq_consumer(q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, LSE, DELTA, DQ, n, head_row, q_block, kv_list,
                 scale, qk_scale, S, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, TILE: gl.constexpr,
                 STAGES: gl.constexpr, EVEN_S: gl.constexpr, PART: gl.constexpr):
    """One warpgroup: query rows [PART * ROWS, (PART + 1) * ROWS) of the block."""
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
    rows = q_block * BLOCK + PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, t_layout))
    lse = gl.expand_dims(gl.load(LSE + head_row + rows, mask=rows < S, other=float("inf")), 1)
    delta = gl.expand_dims(gl.load(DELTA + head_row + rows, mask=rows < S, other=0.0), 1)
    columns = gl.arange(0, TILE, layout=gl.SliceLayout(0, t_layout))

    mbarrier.wait(qdo_bar, 0)
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q, k_ring.index(0).permute((1, 0)), zero_t, use_acc=False, is_async=True)  # (ROWS, TILE)
    dp = warpgroup_mma(do, v_ring.index(0).permute((1, 0)), zero_t, use_acc=False, is_async=True)  # dO V^T
    s, dp = warpgroup_mma_wait(0, deps=(s, dp))
    for t in range(0, tiles):
        # -- dQ += dS K of tile t, then tile t+1's S and dP, back to back on the tensor cores
        slot = t % STAGES
        p = gl.exp2(s * qk_scale - lse)
        if not EVEN_S:  # keys past S: the view's next-head rows must not count
            first_key = gl.load(kv_list + t // tile_in_block) * BLOCK + (t % tile_in_block) * TILE
            p = gl.where(gl.expand_dims(first_key + columns < S, 0), p, 0.0)
        ds_op = gl.convert_layout((p * (dp - delta)).to(dtype), op_layout)
        dq = warpgroup_mma(ds_op, k_ring.index(slot), dq, is_async=True)
        following = (t + 1) % STAGES
        mbarrier.wait(ready.index(following), ((t + 1) // STAGES) & 1, pred=t + 1 < tiles)
        s = warpgroup_mma(q, k_ring.index(following).permute((1, 0)), zero_t, use_acc=False, is_async=True)
        dp = warpgroup_mma(do, v_ring.index(following).permute((1, 0)), zero_t, use_acc=False, is_async=True)
        dq, ds_op = warpgroup_mma_wait(2, deps=(dq, ds_op))
        mbarrier.arrive(free.index(slot))
        s, dp = warpgroup_mma_wait(0, deps=(s, dp))

    rows = q_block * BLOCK + PART * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    offsets = gl.expand_dims((head_row + rows).to(gl.int64) * HEAD_DIM, 1) + gl.expand_dims(cols, 0)
    gl.store(DQ + offsets, (dq * scale).to(dtype), mask=gl.expand_dims(rows < S, 1))


@gluon.jit
def _dq_loader(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, kv_list, n,
               head_row, q_block, BLOCK: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr):
    """Producer warp: the block's Q and dO halves once, then (K, V) tiles of its list."""
    mbarrier.expect(qdo_bar, 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
    for part in gl.static_range(2):
        row = head_row + q_block * BLOCK + part * ROWS
        tma.async_copy_global_to_shared(q_desc, [row, 0], qdo_bar, q_smem.index(part))
        tma.async_copy_global_to_shared(do_desc, [row, 0], qdo_bar, do_smem.index(part))
    tile_in_block: gl.constexpr = BLOCK // TILE
    for t in range(0, tile_in_block * n):
        slot = t % STAGES
        mbarrier.wait(free.index(slot), ((t // STAGES) & 1) ^ 1)  # a fresh barrier passes a wait on phase 1
        row = head_row + gl.load(kv_list + t // tile_in_block) * BLOCK + (t % tile_in_block) * TILE
        mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, 0], ready.index(slot), k_ring.index(slot))
        tma.async_copy_global_to_shared(v_desc, [row, 0], ready.index(slot), v_ring.index(slot))


@gluon.jit
def _dq_kernel(
    q_desc, do_desc, k_desc, v_desc, LSE, DELTA, DQ, kv_counts, kv_indices, scale, qk_scale, S, NQ, MAXSEL,
    HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr, EVEN_S: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):
    dtype: gl.constexpr = q_desc.dtype
    q_block = gl.program_id(0)
    bh = gl.program_id(1)
    row = bh * NQ + q_block
    n = gl.maximum(gl.load(kv_counts + row), 1)  # lists are never empty; a stray 0 must not hang the program
    kv_list = kv_indices + row.to(gl.int64) * MAXSEL
    head_row = bh * S

    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], do_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, TILE, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, TILE, HEAD_DIM], v_desc.layout)
    qdo_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(qdo_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=2)  # both consumers release a slot

    gl.warp_specialize([
        (_dq_consumer, (q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, LSE, DELTA, DQ, n, head_row, q_block,
                        kv_list, scale, qk_scale, S, HEAD_DIM, BLOCK, TILE, STAGES, EVEN_S, 0)),
        (_dq_consumer, (q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, LSE, DELTA, DQ, n, head_row, q_block,
                        kv_list, scale, qk_scale, S, HEAD_DIM, BLOCK, TILE, STAGES, EVEN_S, 1)),
        (_dq_loader, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_ring, v_ring, qdo_bar, ready, free, kv_list,
                      n, head_row, q_block, BLOCK, TILE, STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def launch_dkdv(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, dk: Tensor, dv: Tensor,
                index: BlockIndex, transposed: TransposedBlockIndex, scale: float, tile: int = TILE,
                stages: int = STAGES) -> None:
    """Fills dk, dv (B, H, S, D) as `kernels.launch_dkdv` does, for what
    `gluon_forward.gluon_forward_supported` accepts."""
    b, h, s, d = q.shape
    _dkdv_kernel[(index.num_blocks, b * h)](
        _descriptor(q, tile), _descriptor(do, tile), _descriptor(k, ROWS.value), _descriptor(v, ROWS.value), lse, delta,
        dk, dv, transposed.counts, transposed.offsets, transposed.q_blocks, scale, scale * LOG2E, s, index.num_blocks,
        transposed.q_blocks.shape[-1], HEAD_DIM=d, BLOCK=BLOCK, TILE=tile, STAGES=stages, CONSUMER_REGS=240,
        LOADER_REGS=24, num_warps=4,
    )


def launch_dq(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, dq: Tensor, index: BlockIndex,
              scale: float, tile: int = TILE, stages: int = DQ_STAGES) -> None:
    """Fills dq (B, H, S, D) as `kernels.launch_dq` does, for what
    `gluon_forward.gluon_forward_supported` accepts."""
    b, h, s, d = q.shape
    nq, maxsel = index.indices.shape[-2:]
    _dq_kernel[(nq, b * h)](
        _descriptor(q, ROWS.value), _descriptor(do, ROWS.value), _descriptor(k, tile), _descriptor(v, tile), lse, delta,
        dq, index.counts, index.indices, scale, scale * LOG2E, s, nq, maxsel, HEAD_DIM=d, BLOCK=BLOCK, TILE=tile,
        STAGES=stages, EVEN_S=s % BLOCK == 0, CONSUMER_REGS=240, LOADER_REGS=24, num_warps=4,
    )
