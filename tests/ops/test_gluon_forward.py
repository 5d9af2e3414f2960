"""The Gluon (warp-specialised, Hopper) attention forward: against float64 on the GPU, and
compiled for sm90 on any machine to check what ptxas makes of it (no serialised wgmmas, no
spills, shared memory within the 227 KiB of an H100)."""
import os
import subprocess
import sys

import pytest
import torch
import triton

from dsv.ops.block_index import BlockIndex, random_block_index
from dsv.ops.sparse_attention import dense_masked_attention

is_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
# (batch, heads, seq_len, density, per_head): tails, one-block lists, uneven heads, dense
CASES = {
    "tail": (2, 2, 1000, 0.5, None),
    "one-block-lists": (1, 2, 2048, 0.0, (0.01, 0.01)),
    "uneven-heads": (1, 3, 4096, 0.0, (0.02, 1.0, 0.3)),
    "dense-tail-of-1": (1, 1, 1025, 1.0, None),
}


def _forward(q, k, v, index, stages=3):
    from dsv.ops.sparse_attention import gluon_forward

    o, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    gluon_forward.launch_forward(q, k, v, o, lse, index, q.shape[-1] ** -0.5, stages)
    return o, lse


@pytest.mark.gpu
@pytest.mark.skipif(not is_hopper, reason="needs a Hopper GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gpu_gluon_forward_matches_fp64(case, stages, dtype):
    batch, heads, seq_len, density, per_head = case
    generator = torch.Generator().manual_seed(seq_len)
    index = random_block_index(batch, heads, seq_len, 128, density, generator=generator,
                               per_head_density=per_head, device="cuda")
    q, k, v = (torch.randn(batch, heads, seq_len, 128, generator=generator).to("cuda", dtype) for _ in range(3))
    o, lse = _forward(q, k, v, index, stages)
    scale = 128**-0.5
    exact = dense_masked_attention(q.double(), k.double(), v.double(), index, scale)
    same_precision = dense_masked_attention(q, k, v, index, scale)
    error, torch_error = ((t.double() - exact).abs().max().item() for t in (o, same_precision))
    assert error <= 2 * torch_error + 2e-3, f"out: {error:.3g} > 2 * {torch_error:.3g} + 2e-3"
    _, triton_lse = _triton_forward(q, k, v, index, scale)
    torch.testing.assert_close(lse, triton_lse, atol=1e-4, rtol=1e-5)


def _triton_forward(q, k, v, index, scale):
    from dsv.ops.sparse_attention import kernels

    o, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    kernels.launch_forward(q, k, v, o, lse, index, scale)
    return o, lse


@pytest.mark.gpu
@pytest.mark.skipif(not is_hopper, reason="needs a Hopper GPU")
def test_gpu_gluon_forward_gives_nan_rows_for_an_empty_list_instead_of_hanging():
    index = random_block_index(1, 1, 512, 128, 1.0, device="cuda")
    counts = index.counts.clone()
    counts[0, 0, 1] = 0  # outside the contract: the Triton kernel gives NaN rows too
    index = BlockIndex(counts=counts, indices=index.indices, block_size=128, seq_len=512)
    q, k, v = (torch.randn(1, 1, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o, lse = _forward(q, k, v, index)
    assert o[0, 0, 128:256].isnan().all() and not o[0, 0, :128].isnan().any() and not o[0, 0, 256:].isnan().any()
    assert (lse[0, 0, 128:256] == float("-inf")).all()


def test_forward_dispatch_uses_triton_off_hopper():
    from dsv.ops.sparse_attention import kernels

    assert kernels.forward_impl(torch.zeros(1, 1, 64, 128), 128) == "triton"


PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# Compiles the kernel for sm90 and prints its shared memory and ptxas's report. It runs in a
# fresh interpreter: Triton's CPU interpreter, which the CPU tests switch on, cannot compile Gluon.
BUILD_FOR_SM90 = """
import os, subprocess, sys, tempfile, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from dsv.ops.sparse_attention import gluon_forward

stages, even = int(sys.argv[1]), sys.argv[2] == "True"
def descriptor(rows):
    return f"tensordesc<bf16[{rows},128],{gl.NVMMASharedLayout.get_default_for([rows, 128], gl.bfloat16)!r}>"
block = gluon_forward.BLOCK
signature = {"q_desc": descriptor(gluon_forward.ROWS.value), "k_desc": descriptor(block), "v_desc": descriptor(block),
             "O": "*bf16", "LSE": "*fp32", "kv_counts": "*i32", "kv_indices": "*i32", "qk_scale": "fp32", "S": "i32",
             "NQ": "i32", "MAXSEL": "i32"}
constants = {"HEAD_DIM": 128, "BLOCK": block, "STAGES": stages, "EVEN_S": even, "CONSUMER_REGS": 240, "LOADER_REGS": 24}
source = GluonASTSource(gluon_forward._forward_kernel, {**signature, **{name: "constexpr" for name in constants}},
                        constexprs=constants)
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("shared", compiled.metadata.shared)
with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
    ptx.write(compiled.asm["ptx"])
    ptx.flush()
    report = subprocess.run([sys.argv[3], "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull], capture_output=True,
                            text=True, check=True)
print(report.stdout + report.stderr)
"""


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton ships no ptxas here")
@pytest.mark.parametrize("stages, even", [(3, True), (2, False)])
def test_sm90_build_has_no_serialised_wgmma_or_spills(stages, even):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    built = subprocess.run([sys.executable, "-c", BUILD_FOR_SM90, str(stages), str(even), PTXAS], env=env,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    report = built.stdout
    shared = int(report.split("shared ", 1)[1].split()[0])
    assert shared <= 227 * 1024, report
    assert "C7514" not in report, report  # "wgmma.mma_async instructions are serialized"
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report
