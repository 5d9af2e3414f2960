"""The host's time to issue each op of a trace recorded without a GPU (fake tensors).

    host = HostCost(load_gpu("h200"))
    host(node)   # microseconds: python_us + launch[kind] + host_ops * launch["dispatch"]

Eager PyTorch issues every op from the host, and when kernels are short the GPU waits for it.
What the host does per op splits in two:
- the model's own Python, autograd and hooks, between ops: the recorder measures it while
  tracing (`python_us`, echosim.trace.recorder), on the tracing machine's CPU;
- the op's dispatch and kernel launch, which fake tensors do not do: a cost per op kind,
  measured by `echosim calibrate --host-ops` on the GPU's host with the GPU kept busy (so the
  host never waits): `kernel` (one kernel, element-wise or reduction), `gemm` (cuBLAS),
  `attention` (SDPA), `foreach` and `foreach_tensor` (a multi-tensor op: fixed + per tensor),
  `dispatch` (an op that launches nothing: a view, an allocation).
A profile without the table (a datasheet seed) costs no launches, and the output says so.
"""
from __future__ import annotations

from echosim.graph import Node
from echosim.hw import HOST_KINDS, GpuProfile
from echosim.kernels import op_class


def host_kind(node: Node) -> str:
    """The launch-cost kind of a compute node."""
    if node.name.startswith("aten._foreach_") or node.name.startswith("aten._fused_"):
        return "foreach"
    cls = op_class(node.name)
    return cls if cls in ("gemm", "attention") else "kernel"


class HostCost:
    """Host microseconds per node of an unmeasured trace; callable as the engine's host model."""

    def __init__(self, gpu: GpuProfile):
        self.launch = {kind: gpu.host_launch_us.get(kind, 0.0) for kind in HOST_KINDS}

    def __call__(self, node: Node) -> float:
        own = 0.0
        if not node.is_comm:
            kind = host_kind(node)
            own = self.launch[kind]
            if kind == "foreach":  # shapes: the tensors of its lists
                own += self.launch["foreach_tensor"] * len(node.shapes)
        return (node.python_us or 0.0) + own + node.host_ops * self.launch["dispatch"]
