"""NCCL-aware cost of collectives and send/recv over a cluster of NVLink nodes and a network.

For a group of n ranks spread over m nodes, a buffer of S bytes, and each NCCL protocol p
(base latency a_p, per-step latency L_p on NVLink or the network, bandwidth share f_p):

    B = f_p * (NVLink bandwidth if m == 1 else min(NVLink, N))           bus bandwidth
    N = the node's NICs' rate / its GPUs, / the oversubscription if the m nodes sit under more
        than one leaf switch (nodes fill leaves in order: node k under leaf k // leaf_nodes)
    ring all-gather, reduce-scatter   a + (n-1) L + (n-1)/n * S / B
    ring all-reduce                   a + 2(n-1) L + 2(n-1)/n * S / B
    tree all-reduce (m > 1)           a + 2(ceil(log2 m) L_net + (g-1) L_nvlink) + 2 S / B
                                      (double binary tree over nodes, chain of g GPUs inside)
    broadcast, reduce (pipelined)     a + (n-1) L + S / B
    all-to-all (uneven allowed)       a + L + max over ranks of the NVLink and network bytes
                                      each rank sends or receives, over that link's bandwidth
    send/recv                         a + L + S / B

Inside one node, where the cluster holds a measured table of NCCL's default times for the
collective on that many GPUs (`echosim calibrate --nccl`), the table answers (log-log
interpolation). Elsewhere the formulas do; each collective's bandwidth is scaled by the
cluster's measured `collective_bw`, keyed
"<collective>@<GPUs>" (NCCL reaches e.g. a lower bus bandwidth in all-gather than in
all-reduce on the same links, and in rings of 2 than of 4).
L is the network latency whenever the group crosses nodes (a ring step ends when its slowest
link does). Like NCCL's tuner, the model takes the fastest (algorithm, protocol): LL wins for
small buffers, Simple for large. Bandwidths in GB/s are bytes per nanosecond, so S / (1e3 B)
is in microseconds.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter

from echosim.costs import CollectiveCall
from echosim.hw import Cluster, Protocol

RING_FACTORS = {  # collective -> (steps, bytes moved per rank as a multiple of S), both as functions of n
    "all_gather": (lambda n: n - 1, lambda n: (n - 1) / n),
    "reduce_scatter": (lambda n: n - 1, lambda n: (n - 1) / n),
    "all_reduce": (lambda n: 2 * (n - 1), lambda n: 2 * (n - 1) / n),
    "barrier": (lambda n: 2 * (n - 1), lambda n: 0.0),
    "broadcast": (lambda n: n - 1, lambda n: 1.0),
    "reduce": (lambda n: n - 1, lambda n: 1.0),
}


def interpolate(table: list[list[float]], nbytes: float) -> float:
    """Time of `nbytes` from a measured [[bytes, us], ...] table: log-log between points, the
    smallest point's time below them, the last segment's bandwidth beyond them."""
    sizes = [b for b, _ in table]
    if nbytes <= sizes[0]:
        return table[0][1]
    (b0, t0), (b1, t1) = table[-2], table[-1]
    if nbytes >= b1:
        return t1 + (nbytes - b1) * (t1 - t0) / (b1 - b0)
    i = bisect.bisect_right(sizes, nbytes)
    (b0, t0), (b1, t1) = table[i - 1], table[i]
    w = math.log(nbytes / b0) / math.log(b1 / b0)
    return math.exp((1 - w) * math.log(t0) + w * math.log(t1))


class CommModel:
    """Collective times on one cluster; callable as the engine's collective model."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self._seen: dict[tuple, tuple[float, str]] = {}  # (name, bytes, members) -> answer; steps repeat calls
        self._bw_scales: dict[str, dict[int, float]] = {}  # collective -> measured group size -> multiplier
        for key, scale in cluster.collective_bw.items():
            name, size = key.split("@")
            self._bw_scales.setdefault(name, {})[int(size)] = scale

    def node_of(self, rank: int) -> int:
        return rank // self.cluster.gpus_per_node

    def __call__(self, call: CollectiveCall) -> tuple[float, str]:
        """(microseconds, "algorithm/protocol") of the fastest way NCCL could run the call."""
        if len(call.members) == 1:
            return 0.0, "local"
        if call.split_bytes is not None:
            return self._fastest(call)
        table = self.cluster.tables.get(f"{call.name}@{len(call.members)}")
        if table and self._nodes(call.members) == 1:
            return interpolate(table, call.bytes), "measured"
        key = (call.name, call.bytes, tuple(call.members))
        if key not in self._seen:
            self._seen[key] = self._fastest(call)
        return self._seen[key]

    def _fastest(self, call: CollectiveCall) -> tuple[float, str]:
        options = [(self._time(call, algo, proto), f"{algo}/{name}")
                   for name, proto in self.cluster.protocols.items()
                   for algo in self._algorithms(call)]
        return min(options)

    def _algorithms(self, call: CollectiveCall) -> list[str]:
        if call.name == "all_reduce" and self._nodes(call.members) > 1:
            return ["ring", "tree"]
        if call.name in ("all_to_all", "send_recv"):
            return ["p2p"]
        return ["ring"]

    def _nodes(self, members: list[int]) -> int:
        return len({self.node_of(r) for r in members})

    def _network_GBps(self, members: list[int]) -> float:
        """Per GPU, between nodes: the NICs' share, cut at the spine when the members span leaves."""
        leaf = self.cluster.network.leaf_nodes
        spans_leaves = leaf and len({self.node_of(r) // leaf for r in members}) > 1
        return self.cluster.net_GBps / (self.cluster.network.oversubscription if spans_leaves else 1.0)

    def _bandwidth(self, proto: Protocol, members: list[int], name: str, *, crosses_nodes: bool) -> float:
        link = self.cluster.nvlink_GBps
        if crosses_nodes:
            link = min(link, self._network_GBps(members))
        return proto.bw_fraction * self._bw_scale(name, len(members)) * link * 1e3  # bytes per microsecond

    def _bw_scale(self, name: str, n: int) -> float:
        """The cluster's measured multiplier for `name` on the nearest measured group size at or
        below n (else the smallest measured); 1 when the collective was not measured."""
        sizes = self._bw_scales.get(name)
        if not sizes:
            return 1.0
        below = [m for m in sizes if m <= n]
        return sizes[max(below) if below else min(sizes)]

    def _time(self, call: CollectiveCall, algo: str, proto: Protocol) -> float:
        n, m = len(call.members), self._nodes(call.members)
        step = proto.net_step_us if m > 1 else proto.nvlink_step_us
        bw = self._bandwidth(proto, call.members, call.name, crosses_nodes=m > 1)
        if algo == "tree":
            g = max(Counter(self.node_of(r) for r in call.members).values())
            hops = math.ceil(math.log2(m)) * proto.net_step_us + (g - 1) * proto.nvlink_step_us
            return proto.base_us + 2 * hops + 2 * call.bytes / bw
        if call.name == "send_recv":
            return proto.base_us + step + call.bytes / bw
        if call.name == "all_to_all":
            return proto.base_us + step + self._all_to_all_transfer(call, proto)
        steps, share = RING_FACTORS[call.name]
        return proto.base_us + steps(n) * step + share(n) * call.bytes / bw

    def _all_to_all_transfer(self, call: CollectiveCall, proto: Protocol) -> float:
        """Slowest rank's transfer: NVLink and network traffic, in and out, each on its own link."""
        nodes = [self.node_of(r) for r in call.members]
        splits = call.split_bytes or [[call.bytes / len(nodes)] * len(nodes) for _ in nodes]
        nvlink = self._bandwidth(proto, call.members, call.name, crosses_nodes=False)
        net = self._bandwidth(proto, call.members, call.name, crosses_nodes=True)
        worst = 0.0
        for i in range(len(nodes)):
            out_local = sum(b for j, b in enumerate(splits[i]) if j != i and nodes[j] == nodes[i])
            out_remote = sum(b for j, b in enumerate(splits[i]) if nodes[j] != nodes[i])
            in_local = sum(splits[j][i] for j in range(len(nodes)) if j != i and nodes[j] == nodes[i])
            in_remote = sum(splits[j][i] for j in range(len(nodes)) if nodes[j] != nodes[i])
            worst = max(worst, max(out_local, in_local) / nvlink, max(out_remote, in_remote) / net)
        return worst
