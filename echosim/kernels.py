"""Kernel times: a measured database first, a calibrated roofline for everything else.

    time = launch + max(flops / (peak[dtype] * efficiency[class]), bytes / (HBM * efficiency["memory"]))

The op class (gemm, attention, memory) picks the efficiency that `echosim calibrate`
measured for that class; the database is keyed by op name, shapes and dtype.
"""
from __future__ import annotations

from echosim.graph import Node
from echosim.hw import GpuProfile

GEMM_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._scaled_mm", "aten.convolution",
            "aten.convolution_backward", "aten._convolution", "aten.linear"}
ATTENTION_OPS = {"aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_flash_attention_backward",
                 "aten._scaled_dot_product_efficient_attention",
                 "aten._scaled_dot_product_efficient_attention_backward",
                 "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_cudnn_attention_backward",
                 "aten._flash_attention_forward", "aten._flash_attention_backward",
                 "aten._efficient_attention_forward", "aten._efficient_attention_backward",
                 "aten._scaled_dot_product_flash_attention_for_cpu",
                 "aten._scaled_dot_product_flash_attention_for_cpu_backward",
                 "flex_attention", "flex_attention_backward"}


def op_class(name: str) -> str:
    """gemm, attention or memory (everything else is bound by memory traffic)."""
    if name in GEMM_OPS:
        return "gemm"
    if name in ATTENTION_OPS or "attention" in name:
        return "attention"
    return "memory"


def db_key(name: str, shapes: list[list[int]], dtype: str) -> str:
    """Kernel-database key, e.g. "aten.mm|64x128,128x256|bfloat16"."""
    return f"{name}|{','.join('x'.join(map(str, s)) for s in shapes)}|{dtype}"


class KernelModel:
    """Compute-node durations for one GPU; callable as the engine's compute model."""

    def __init__(self, gpu: GpuProfile):
        self.gpu = gpu

    def __call__(self, node: Node) -> float:
        measured = self.gpu.kernels.get(db_key(node.name, node.shapes, node.dtype))
        return measured if measured is not None else self.roofline_us(node)

    def roofline_us(self, node: Node) -> float:
        eff = self.gpu.efficiency
        peak = self.gpu.peak_tflops.get(node.dtype, self.gpu.peak_tflops["float32"])
        compute = node.flops / (peak * 1e6 * eff[op_class(node.name)]) if node.flops else 0.0
        memory = node.bytes / (self.gpu.hbm_GBps * 1e3 * eff["memory"])
        return self.gpu.launch_us + max(compute, memory)
