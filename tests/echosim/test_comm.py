"""Collective cost formulas against hand computations, and the shipped cluster files."""
import pytest

from echosim.comm import CommModel
from echosim.costs import CollectiveCall
from echosim.hw import Cluster, Network, Protocol, load_cluster

SIMPLE = Protocol(base_us=10, nvlink_step_us=1, net_step_us=5, bw_fraction=1.0)
LL = Protocol(base_us=2, nvlink_step_us=0.5, net_step_us=1, bw_fraction=0.25)


def model(*, gpus_per_node=4, protocols=None):
    # NVLink 100 GB/s = 1e5 B/us; NIC 200 Gb/s = 25 GB/s = 2.5e4 B/us
    return CommModel(Cluster(name="toy", gpu="h100", gpus_per_node=gpus_per_node, nvlink_GBps=100, nic_Gbps=200,
                             protocols=protocols or {"Simple": SIMPLE}))


def call(name, members, nbytes, splits=None):
    return CollectiveCall(name=name, members=list(members), bytes=nbytes, split_bytes=splits)


@pytest.mark.parametrize("name, members, nbytes, expected, how", [
    ("all_gather", range(4), 4e6, 10 + 3 * 1 + 0.75 * 4e6 / 1e5, "ring/Simple"),  # 43
    ("reduce_scatter", range(4), 4e6, 43, "ring/Simple"),
    ("all_reduce", range(4), 4e6, 10 + 6 * 1 + 1.5 * 4e6 / 1e5, "ring/Simple"),  # 76
    ("broadcast", range(4), 4e6, 10 + 3 * 1 + 4e6 / 1e5, "ring/Simple"),  # 53
    ("reduce_scatter", range(8), 8e6, 10 + 7 * 5 + 7 / 8 * 8e6 / 2.5e4, "ring/Simple"),  # 325, network-bound
    ("all_reduce", range(8), 8e6, 10 + 14 * 5 + 14 / 8 * 8e6 / 2.5e4, "ring/Simple"),  # 640 < tree's 666
    ("all_reduce", range(8), 8e3, 10 + 2 * (1 * 5 + 3 * 1) + 2 * 8e3 / 2.5e4, "tree/Simple"),  # 26.64 < ring's 80.56
    ("send_recv", [1, 2], 1e5, 10 + 1 + 1e5 / 1e5, "p2p/Simple"),  # 12, same node
    ("send_recv", [3, 4], 1e5, 10 + 5 + 1e5 / 2.5e4, "p2p/Simple"),  # 19, across nodes
    ("all_gather", [5], 1e9, 0.0, "local"),
])
def test_formulas_match_hand_computation(name, members, nbytes, expected, how):
    us, chosen = model()(call(name, members, nbytes))
    assert us == pytest.approx(expected, rel=1e-12)
    assert chosen == how


def test_uneven_all_to_all_is_bound_by_the_busiest_link():
    # 2 GPUs per node: ranks 0,1 on node 0 and 2,3 on node 1; row i = bytes rank i sends to each rank.
    splits = [[0, 1e5, 2e5, 3e5],
              [4e5, 0, 0, 1e5],
              [1e5, 1e5, 0, 1e5],
              [0, 0, 6e5, 0]]
    # rank 0 receives 1e5 (net) from rank 2 and 4e5 (NVLink) from rank 1; sends 5e5 over the network.
    # rank 2 receives 6e5 over NVLink from rank 3 -> 6 us; sends 2e5 over the network -> 8 us.
    # network worst: rank 0 out 5e5 / 2.5e4 = 20 us; NVLink worst: 6e5 / 1e5 = 6 us.
    us, how = model(gpus_per_node=2)(call("all_to_all", range(4), 6e5, splits))
    assert us == pytest.approx(10 + 5 + 20)
    assert how == "p2p/Simple"


def test_even_all_to_all_inside_a_node():
    # 4 ranks, S = 4e5 each: 3e5 leaves every rank over NVLink -> 3 us
    us, _ = model()(call("all_to_all", range(4), 4e5))
    assert us == pytest.approx(10 + 1 + 3)


@pytest.mark.parametrize("nbytes, expected, how", [
    (1e3, 2 + 3 * 0.5 + 0.75 * 1e3 / 2.5e4, "ring/LL"),  # 3.53 < Simple's 13.0075
    (4e6, 43, "ring/Simple"),  # LL: 2 + 1.5 + 120 = 123.5
])
def test_fastest_protocol_is_chosen(nbytes, expected, how):
    us, chosen = model(protocols={"LL": LL, "Simple": SIMPLE})(call("all_gather", range(4), nbytes))
    assert (us, chosen) == (pytest.approx(expected), how)


def test_shipped_clusters_load_and_predict_plausible_all_reduce():
    cluster = load_cluster("dgx_h100")
    assert cluster.gpus_per_node == 8 and set(cluster.protocols) == {"LL", "LL128", "Simple"}
    # 1 GiB all-reduce on 8 GPUs is bandwidth-bound: 2*7/8 * 2^30 B / 450 GB/s = 4.175 ms plus latencies
    us, how = CommModel(cluster)(call("all_reduce", range(8), 2**30))
    assert how == "ring/Simple"
    assert us == pytest.approx(8.4 + 14 * 3.4 + 1.75 * 2**30 / 450e3)


def test_cluster_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not one of the shipped"):
        load_cluster("dgx_a100_nonexistent")
    path = tmp_path / "mine.json"
    path.write_text('{"name": "x", "gpu": "h100", "gpus_per_node": 8, "nic_Gbps": 100, "protocols": {}}')
    with pytest.raises(ValueError, match=r"missing fields \['nvlink_GBps'\]"):
        load_cluster(path)


def test_measured_collective_bandwidth_scales_by_nearest_group_size():
    cluster = Cluster(name="toy", gpu="h100", gpus_per_node=8, nvlink_GBps=100, nic_Gbps=200,
                      protocols={"Simple": SIMPLE}, collective_bw={"all_gather@2": 0.5, "all_gather@4": 0.8})
    comm = CommModel(cluster)
    transfer = 0.75 * 4e6 / 1e5  # ring all-gather of 4 MB over 4 ranks at full bandwidth: 30 us
    assert comm(call("all_gather", range(4), 4e6))[0] == pytest.approx(10 + 3 + transfer / 0.8)
    assert comm(call("all_gather", range(8), 8e6))[0] == pytest.approx(10 + 7 + 7 / 8 * 8e6 / 1e5 / 0.8)  # 4's
    assert comm(call("all_gather", range(2), 4e6))[0] == pytest.approx(10 + 1 + 0.5 * 4e6 / 1e5 / 0.5)
    assert comm(call("all_reduce", range(4), 4e6))[0] == pytest.approx(76)  # not measured: unscaled


def test_measured_tables_answer_inside_a_node_and_interpolate_in_log_log():
    from echosim.hw.calibrate_nccl import tables

    samples = [{"collective": "all_gather", "n": 4, "bytes": b, "us": t} for b, t in ((1e3, 10.0), (1e6, 40.0),
                                                                                      (1e9, 4000.0))]
    samples += [{"collective": "send_recv", "n": n, "bytes": 1e6, "us": t} for n, t in ((4, 99.0), (2, 20.0))]
    cluster = Cluster(name="toy", gpu="h100", gpus_per_node=4, nvlink_GBps=100, nic_Gbps=200,
                      protocols={"Simple": SIMPLE}, tables=tables(samples))
    assert cluster.tables["send_recv@2"] == [[1e6, 20.0]]  # the 2-GPU sweep's own pair wins
    comm = CommModel(cluster)
    assert comm(call("all_gather", range(4), 1e6)) == (pytest.approx(40.0), "measured")
    assert comm(call("all_gather", range(4), 10 ** 4.5))[0] == pytest.approx(10 * 4 ** 0.5)  # halfway in log
    assert comm(call("all_gather", range(4), 10.0))[0] == 10.0  # latency floor below the table
    assert comm(call("all_gather", range(4), 2e9))[0] == pytest.approx(4000 + 1e9 * 3960 / (1e9 - 1e6))
    assert comm(call("all_gather", [2, 3, 4, 5], 1e6))[1] == "ring/Simple"  # spans two nodes: the formulas
    assert comm(call("all_gather", range(2), 1e6))[1] == "ring/Simple"  # no table for 2 GPUs


def test_tables_drop_stalled_points():
    from echosim.hw.calibrate_nccl import tables

    def table(points):
        samples = [{"collective": "all_reduce", "n": 2, "bytes": b, "us": t} for b, t in points]
        return tables(samples)["all_reduce@2"]

    # a spike far above the log-log line through its neighbours takes that line's value
    line = 10.0 * (40.0 / 10.0) ** 0.5
    assert table([(1e6, 10.0), (2e6, 300.0), (4e6, 40.0)]) == [[1e6, 10.0], [2e6, pytest.approx(line)], [4e6, 40.0]]
    # a mild bump (within SPIKE of the line) stays, except where a larger buffer ran faster
    assert table([(1e6, 30.0), (2e6, 41.0), (4e6, 40.0), (8e6, 80.0)]) == [[1e6, 30.0], [2e6, 40.0], [4e6, 40.0],
                                                                          [8e6, 80.0]]


def tiered(*, leaf_nodes=0, oversubscription=1.0, nics_per_node=0, nic_Gbps=200):
    return CommModel(Cluster(name="toy", gpu="h100", gpus_per_node=4, nvlink_GBps=100, nic_Gbps=nic_Gbps,
                             nics_per_node=nics_per_node, protocols={"Simple": SIMPLE},
                             network=Network(leaf_nodes=leaf_nodes, oversubscription=oversubscription)))


def test_a_nodes_nics_are_shared_by_its_gpus():
    # 2 NICs of 400 Gb/s for 4 GPUs: 2 * 50 GB/s / 4 = 25 GB/s per GPU, as one 200 Gb/s NIC per GPU gives
    shared = tiered(nics_per_node=2, nic_Gbps=400)(call("reduce_scatter", range(8), 8e6))
    assert shared == (pytest.approx(10 + 7 * 5 + 7 / 8 * 8e6 / 2.5e4), "ring/Simple")  # 325, as above
    assert tiered(nics_per_node=1, nic_Gbps=400)(call("send_recv", [3, 4], 1e5))[0] == pytest.approx(
        10 + 5 + 1e5 / 1.25e4)  # one 50 GB/s NIC for 4 GPUs: 12.5 GB/s each


@pytest.mark.parametrize("members, nbytes, expected", [
    (range(8), 8e6, 10 + 7 * 5 + 7 / 8 * 8e6 / 2.5e4),  # nodes 0-1, one leaf: the NICs' 25 GB/s
    (range(16), 16e6, 10 + 15 * 5 + 15 / 16 * 16e6 / 1.25e4),  # nodes 0-3, two leaves: 2:1 at the spine
    ([0, 8], 1e5, 10 + 1e5 / 1.25e4 + 5),  # a send from leaf 0 to leaf 1
    ([0, 4], 1e5, 10 + 1e5 / 2.5e4 + 5),  # within leaf 0
    ([0, 1], 1e5, 10 + 1e5 / 1e5 + 1),  # within a node: NVLink
])
def test_a_collective_across_leaf_switches_sees_the_oversubscribed_spine(members, nbytes, expected):
    name = "send_recv" if len(members) == 2 else "reduce_scatter"
    us, _ = tiered(leaf_nodes=2, oversubscription=2.0)(call(name, members, nbytes))  # 2 nodes (8 GPUs) per leaf
    assert us == pytest.approx(expected, rel=1e-12)
    flat, _ = tiered()(call(name, members, nbytes))  # one non-blocking tier: never cut
    assert flat <= us


def test_shipped_seed_networks_leave_the_measured_numbers_alone():
    # the seeds' SuperPOD (32 nodes per leaf, 1:1) cuts nothing: 1,024 GPUs = 128 nodes over 4 leaves
    dgx = load_cluster("dgx_h100")
    assert (dgx.network.leaf_nodes, dgx.network.oversubscription, dgx.net_GBps) == (32, 1.0, 50.0)
    flat = Cluster(**{**dgx.__dict__, "network": Network()})
    spread = call("all_reduce", range(0, 1024, 8), 2**28)
    assert CommModel(dgx)(spread) == CommModel(flat)(spread)
