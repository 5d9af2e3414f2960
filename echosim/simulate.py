"""Predict a step: traces + cluster -> replayed timeline (the CLI's `simulate`, as a function)."""
from __future__ import annotations

from echosim.comm import CommModel
from echosim.engine import OverlapModel, Timeline, simulate
from echosim.graph import Trace
from echosim.hw import Cluster, load_gpu
from echosim.kernels import KernelModel


def predict(traces: list[Trace], cluster: Cluster, *, as_classes: bool = False,
            overlap: OverlapModel | None = None) -> Timeline:
    """Replay the traces on the cluster: kernel times from its GPU profile, collectives from its links;
    `as_classes` replays one rank per trace, `overlap` slows compute beside communication."""
    gpu = load_gpu(cluster.gpu)
    return simulate(traces, compute_us=KernelModel(gpu), collective_us=CommModel(cluster), as_classes=as_classes,
                    overlap=overlap, comm_host_us=cluster.collective_host_us, host_us_per_op=gpu.host_us_per_op)
