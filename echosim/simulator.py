"""One simulator per cluster: the cost models and host costs the engine replays traces with.

    simulator = build(load_cluster("dgx_h200"))
    timeline = simulator.predict(traces, as_classes=True)

Kernel times come from the cluster's GPU profile, collectives from its links, the host's cost
per op from the GPU profile's launch costs and the trace's measured Python (echosim.host_cost),
per collective from the cluster. Every command that predicts a
step (`simulate`, `sweep`, `validate`) and dsv's planner get their models here, so equal jobs
give equal times wherever they are asked.
"""
from __future__ import annotations

from dataclasses import dataclass

from echosim.comm import CommModel
from echosim.costs import OverlapModel
from echosim.engine import Timeline, replay
from echosim.graph import Trace
from echosim.host_cost import HostCost
from echosim.hw import Cluster, GpuProfile, load_gpu
from echosim.kernels import KernelModel


@dataclass(frozen=True, kw_only=True)
class Simulator:
    """A cluster's cost models, ready to replay traces on it."""

    cluster: Cluster
    gpu: GpuProfile  # the cluster's GPU profile
    compute_us: KernelModel
    collective_us: CommModel
    overlap: OverlapModel | None  # compute slowdown beside collectives; None: none
    comm_host_us: float  # host time of a real collective beyond a traced one (the cluster's collective_host_us)
    host_us: HostCost  # host time per node of traces without a measured host (the GPU profile's launch costs)

    def predict(self, traces: list[Trace], *, as_classes: bool = False) -> Timeline:
        """Replay the traces on the cluster; `as_classes` replays one rank per trace (echosim.engine.replay)."""
        return replay(traces, compute_us=self.compute_us, collective_us=self.collective_us, as_classes=as_classes,
                      overlap=self.overlap, comm_host_us=self.comm_host_us, host_us=self.host_us)


def build(cluster: Cluster, *, overlap: OverlapModel | None = None) -> Simulator:
    """The simulator of `cluster`, with `overlap` slowing compute beside communication."""
    gpu = load_gpu(cluster.gpu)
    return Simulator(cluster=cluster, gpu=gpu, compute_us=KernelModel(gpu), collective_us=CommModel(cluster),
                     overlap=overlap, comm_host_us=cluster.collective_host_us, host_us=HostCost(gpu))
