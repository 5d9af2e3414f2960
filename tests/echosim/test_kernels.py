"""Kernel-time model: database hits, roofline by op class, against hand computations."""
import pytest

from echosim.graph import Node
from echosim.hw import GpuProfile, load_gpu
from echosim.kernels import KernelModel, db_key, op_class

GPU = GpuProfile(name="toy", measured=False, peak_tflops={"bfloat16": 100.0, "float32": 10.0}, hbm_GBps=1000,
                 efficiency={"gemm": 0.5, "attention": 0.25, "memory": 0.8}, launch_us=2.0,
                 kernels={"aten.mm|64x128,128x256|bfloat16": 7.5})


def node(name, *, flops=0.0, nbytes=0.0, dtype="bfloat16", shapes=()):
    return Node(id=0, kind="COMP", name=name, stream="compute", flops=flops, bytes=nbytes, dtype=dtype,
                shapes=[list(s) for s in shapes])


@pytest.mark.parametrize("n, expected", [
    # 1e9 flops / (100 TFLOP/s * 0.5) = 20 us; 1e6 B / (1000 GB/s * 0.8) = 1.25 us
    (node("aten.mm", flops=1e9, nbytes=1e6), 2 + 20),
    (node("aten._scaled_dot_product_flash_attention", flops=1e9, nbytes=1e6), 2 + 40),
    (node("aten.mm", flops=1e9, nbytes=1e6, dtype="float32"), 2 + 200),
    (node("aten.mm", flops=1e9, nbytes=1e6, dtype="int64"), 2 + 200),  # unknown dtype: float32 peak
    (node("aten.add.Tensor", flops=0, nbytes=8e6), 2 + 10),  # memory-bound
    (node("aten.mm", shapes=[(64, 128), (128, 256)], flops=4194304, nbytes=1), 7.5),  # database hit
])
def test_roofline_and_database(n, expected):
    assert KernelModel(GPU)(n) == pytest.approx(expected)


def test_op_classes_and_keys():
    assert [op_class(n) for n in ("aten.bmm", "flex_attention_backward", "aten.gelu")] == ["gemm", "attention",
                                                                                           "memory"]
    assert db_key("aten.mm", [[2, 3], [3]], "float32") == "aten.mm|2x3,3|float32"


def test_shipped_h100_profile_is_an_unmeasured_seed():
    gpu = load_gpu("h100")
    assert gpu.measured is False and gpu.hbm_GBps == 3350 and gpu.peak_tflops["bfloat16"] == 989.4
    # a 8192^3 bf16 GEMM at datasheet peak: 2 * 8192^3 / 989.4e12 s = 1111.3 us
    gemm = node("aten.mm", flops=2 * 8192**3, nbytes=3 * 8192**2 * 2)
    assert KernelModel(gpu)(gemm) == pytest.approx(2 * 8192**3 / 989.4e6)


def test_shipped_h200_profile_is_measured_and_plausible():
    gpu = load_gpu("h200")
    assert gpu.measured is True and "H200" in gpu.notes
    assert all(0.4 < e < 1.0 for e in gpu.efficiency.values()) and 0 < gpu.launch_us < 20
    # the 8192^3 GEMM of the calibration sweep: measured, and about what 76% of peak gives
    gemm = node("aten.mm", flops=2 * 8192**3, nbytes=3 * 8192**2 * 2)
    gemm.shapes, gemm.dtype = [[8192, 8192], [8192, 8192]], "bfloat16"
    assert KernelModel(gpu)(gemm) == gpu.kernels["aten.mm|8192x8192,8192x8192|bfloat16"]
    assert 1111 < KernelModel(gpu)(gemm) < 1111 / 0.6
