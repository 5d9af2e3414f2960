"""Predict a step: traces + cluster -> replayed timeline (the CLI's `simulate`, as a function)."""
from __future__ import annotations

from echosim.comm import CommModel
from echosim.engine import Timeline, simulate
from echosim.graph import Trace
from echosim.hw import Cluster, load_gpu
from echosim.kernels import KernelModel


def predict(traces: list[Trace], cluster: Cluster) -> Timeline:
    """Replay the traces on the cluster: kernel times from its GPU profile, collectives from its links."""
    return simulate(traces, compute_us=KernelModel(load_gpu(cluster.gpu)), collective_us=CommModel(cluster))
