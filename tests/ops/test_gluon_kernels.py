"""The Gluon (warp-specialised, Hopper) attention kernels, forward, dK/dV and dQ: against
float64 on the GPU, and compiled for sm90 on any machine to check what ptxas makes of them
(no serialised wgmmas, no spills, shared memory within the 227 KiB of an H100)."""
import os
import subprocess
import sys

import pytest
import torch
import triton

from dsv.ops.block_index import BlockIndex, random_block_index
from tests.ops.helpers import assert_close_to_fp64

is_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
# (batch, heads, seq_len, density, per_head): tails, one-block lists, uneven heads, dense
CASES = {
    "tail": (2, 2, 1000, 0.5, None),
    "one-block-lists": (1, 2, 2048, 0.0, (0.01, 0.01)),
    "uneven-heads": (1, 3, 4096, 0.0, (0.02, 1.0, 0.3)),
    "dense-tail-of-1": (1, 1, 1025, 1.0, None),
}
SCALE = 128**-0.5


def _forward(q, k, v, index, stages=None):
    """o and lse of the Gluon forward (its default ring depth unless `stages`)."""
    from dsv.ops.sparse_attention import gluon_forward

    o, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    gluon_forward.launch_forward(q, k, v, o, lse, index, SCALE, stages or gluon_forward.STAGES)
    return o, lse


def _gradients(q, k, v, do, index, stages=None):
    """dq, dk, dv of the Gluon backward kernels, from the Triton forward's o and lse."""
    from dsv.ops.sparse_attention import gluon_backward, kernels

    o, lse = _triton_forward(q, k, v, index)
    delta = torch.empty_like(lse)
    kernels.launch_delta(o, do, delta)
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))  # every row must be written
    gluon_backward.launch_dkdv(q, k, v, do, lse, delta, dk, dv, index, index.transpose(), SCALE, stages=stages)
    gluon_backward.launch_dq(q, k, v, do, lse, delta, dq, index, SCALE, stages=stages)
    return dq, dk, dv


def _triton_forward(q, k, v, index):
    from dsv.ops.sparse_attention import kernels

    o, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    kernels.launch_forward(q, k, v, o, lse, index, SCALE)
    return o, lse


def _problem(case, block, dtype):
    from dsv.ops.sparse_attention.gluon_forward import gluon_forward_supported

    batch, heads, seq_len, density, per_head = case
    generator = torch.Generator().manual_seed(seq_len)
    index = random_block_index(batch, heads, seq_len, block, density, generator=generator,
                               per_head_density=per_head, device="cuda")
    q, k, v, do = (torch.randn(batch, heads, seq_len, 128, generator=generator).to("cuda", dtype) for _ in range(4))
    if not gluon_forward_supported(q, block):
        pytest.skip(f"{index.num_blocks} blocks of {block}: a program takes two 64-blocks, so their number must be even")
    return index, q, k, v, do


@pytest.mark.gpu
@pytest.mark.skipif(not is_hopper, reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("block", [128, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stages", [None, 2])  # each kernel's default ring depth, and 2
def test_gpu_gluon_kernels_match_fp64(case, block, stages, dtype):
    index, q, k, v, do = _problem(case, block, dtype)
    o, lse = _forward(q, k, v, index, stages)
    assert_close_to_fp64([o, *_gradients(q, k, v, do, index, stages)], index, q, k, v, do, atol=2e-3)
    _, triton_lse = _triton_forward(q, k, v, index)
    torch.testing.assert_close(lse, triton_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not is_hopper, reason="needs a Hopper GPU")
@pytest.mark.parametrize("block", [128, 64])
def test_gpu_gluon_dkdv_writes_zeros_for_kv_blocks_no_query_selected(block):
    index = random_block_index(1, 2, 1000, block, 1.0, device="cuda")
    index = BlockIndex(counts=torch.ones_like(index.counts), indices=torch.zeros_like(index.indices), block_size=block,
                       seq_len=1000)  # every query block lists KV block 0 alone
    q, k, v, do = (torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    dq, dk, dv = _gradients(q, k, v, do, index)
    assert (dk[..., block:, :] == 0).all() and (dv[..., block:, :] == 0).all()
    assert_close_to_fp64([_forward(q, k, v, index)[0], dq, dk, dv], index, q, k, v, do, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not is_hopper, reason="needs a Hopper GPU")
@pytest.mark.parametrize("block", [128, 64])
def test_gpu_gluon_kernels_give_zero_rows_and_gradients_for_an_empty_list(block):
    """As the Triton kernels and FlexAttention: output 0, lse +inf, dq 0, nothing NaN in dk, dv
    (block 64: the empty list is the second of a program's pair)."""
    index = random_block_index(1, 1, 512, block, 1.0, device="cuda")
    counts = index.counts.clone()
    counts[0, 0, 1] = 0
    index = BlockIndex(counts=counts, indices=index.indices, block_size=block, seq_len=512)
    empty = slice(block, 2 * block)
    q, k, v, do = (torch.randn(1, 1, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    o, lse = _forward(q, k, v, index)
    dq, dk, dv = _gradients(q, k, v, do, index)
    assert (o[0, 0, empty] == 0).all() and (dq[0, 0, empty] == 0).all()
    assert (lse[0, 0, empty] == float("inf")).all()
    torch.testing.assert_close(lse, _triton_forward(q, k, v, index)[1], atol=1e-4, rtol=1e-5)
    assert_close_to_fp64([o, dq, dk, dv], index, q, k, v, do, atol=2e-3)


def test_dispatch_uses_triton_off_hopper():
    from dsv.ops.sparse_attention import kernels

    assert kernels.kernel_impl(torch.zeros(1, 1, 64, 128), 128) == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not is_hopper, reason="needs a Hopper GPU")
def test_gpu_dispatch_takes_gluon_where_it_applies():
    from dsv.ops.sparse_attention import kernels

    def impl(seq_len, head_dim, block, dtype=torch.bfloat16):
        return kernels.kernel_impl(torch.zeros(1, 1, seq_len, head_dim, device="cuda", dtype=dtype), block)

    assert impl(1000, 128, 128) == impl(1024, 128, 64) == "gluon"
    assert impl(1025, 128, 64) == "triton"  # 17 blocks of 64: programs take them in pairs
    assert impl(1024, 64, 128) == impl(1024, 128, 128, torch.float32) == "triton"


PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# Compiles one kernel for sm90 and prints its shared memory and ptxas's report. It runs in a
# fresh interpreter: Triton's CPU interpreter, which the CPU tests switch on, cannot compile Gluon.
BUILD_FOR_SM90 = """
import os, subprocess, sys, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from dsv.ops.sparse_attention import gluon_backward, gluon_forward

kernel, block, stages, even, ptxas = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "True", sys.argv[5]
def descriptor(rows):
    return f"tensordesc<bf16[{rows},128],{gl.NVMMASharedLayout.get_default_for([rows, 128], gl.bfloat16)!r}>"
half, tile = gluon_forward.ROWS.value, gluon_backward.TILE
scalars = {"qk_scale": "fp32", "S": "i32"}
if kernel == "forward":
    fn, signature = gluon_forward._forward_kernel, {
        "q_desc": descriptor(half), "k_desc": descriptor(block), "v_desc": descriptor(block), "O": "*bf16", "LSE": "*fp32",
        "kv_counts": "*i32", "kv_indices": "*i32", **scalars, "NQ": "i32", "MAXSEL": "i32"}
elif kernel == "dkdv":
    fn, signature = gluon_backward._dkdv_kernel, {
        "q_desc": descriptor(tile), "do_desc": descriptor(tile), "k_desc": descriptor(half), "v_desc": descriptor(half),
        "LSE": "*fp32", "DELTA": "*fp32", "DK": "*bf16", "DV": "*bf16", "q_counts": "*i32", "q_offsets": "*i32",
        "q_blocks": "*i32", "scale": "fp32", **scalars, "NKV": "i32", "LIST_WIDTH": "i32"}
else:
    fn, signature = gluon_backward._dq_kernel, {
        "q_desc": descriptor(half), "do_desc": descriptor(half), "k_desc": descriptor(tile), "v_desc": descriptor(tile),
        "LSE": "*fp32", "DELTA": "*fp32", "DQ": "*bf16", "kv_counts": "*i32", "kv_indices": "*i32", "scale": "fp32",
        **scalars, "NQ": "i32", "MAXSEL": "i32"}
constants = {"HEAD_DIM": 128, "BLOCK": block, "STAGES": stages, "CONSUMER_REGS": 240, "LOADER_REGS": 24}
constants.update({"TILE": tile} if kernel != "forward" else {})
constants.update({"EVEN_S": even} if kernel != "dkdv" else {})
source = GluonASTSource(fn, {**signature, **{name: "constexpr" for name in constants}}, constexprs=constants)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("shared", compiled.metadata.shared)
with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
    ptx.write(compiled.asm["ptx"])
    ptx.flush()
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull], capture_output=True, text=True,
                            check=True)
print(report.stdout + report.stderr)
"""


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton ships no ptxas here")
@pytest.mark.parametrize("kernel, block, stages, even", [
    ("forward", 128, 3, True), ("forward", 128, 2, False), ("forward", 64, 3, False),
    ("dkdv", 128, 4, True), ("dkdv", 64, 2, True), ("dq", 128, 4, False), ("dq", 64, 2, False), ("dq", 64, 2, True),
])
def test_sm90_build_has_no_serialised_wgmma_or_spills(kernel, block, stages, even):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    built = subprocess.run([sys.executable, "-c", BUILD_FOR_SM90, kernel, str(block), str(stages), str(even), PTXAS],
                           env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    report = built.stdout
    shared = int(report.split("shared ", 1)[1].split()[0])
    assert shared <= 227 * 1024, report
    assert "serialized" not in report, report  # ptxas's C7510-C7515: wgmma.mma_async instructions are serialized
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
