"""Trace files: round trip, and clear errors for malformed or inconsistent input."""
import json

import pytest

from echosim.graph import Node, Trace, TraceError, load_trace, trace_from_json


def good_trace():
    return Trace(world_size=4, ranks=[0, 1, 2, 3], groups={"dp": [[0, 1, 2, 3]], "pp": [[0, 1], [2, 3]]}, nodes=[
        Node(id=0, kind="COMP", name="aten.mm", stream="compute", shapes=[[4, 8], [8, 16]], dtype="float32",
             flops=1024, bytes=768),
        Node(id=1, kind="COMP", name="aten.relu", stream="compute", deps=[0], duration_us=0.0),
        Node(id=2, kind="COMM_COLL", name="all_to_all", stream="a2a", deps=[1], group="dp", bytes=40,
             split_bytes=[10, 10, 10, 10]),
        Node(id=3, kind="COMM_SEND", name="send", stream="p2p", group="pp", peer=1, bytes=8),
    ], meta={"workload": "hand"})


def test_round_trip_through_json_file(tmp_path):
    path = tmp_path / "t.json"
    good_trace().save(path)
    assert load_trace(path) == good_trace()


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema": "echosim.trace/1", "nodes": [')
    with pytest.raises(TraceError, match=r"broken.json: malformed JSON"):
        load_trace(path)


def edited(**changes):
    data = json.loads(json.dumps(good_trace().to_json()))
    for index, fields in changes.get("nodes", {}).items():
        data["nodes"][index].update(fields)
    data.update({k: v for k, v in changes.items() if k != "nodes"})
    return data


@pytest.mark.parametrize("data, message", [
    (edited(schema="chakra"), "not an echosim trace"),
    ({"schema": "echosim.trace/1", "world_size": 2}, "missing field 'ranks'"),
    (edited(nodes={0: {"kind": "GEMM"}}), "node 0 .aten.mm.: unknown kind 'GEMM'"),
    (edited(nodes={2: {"name": "allgather"}}), "unknown collective 'allgather'"),
    (edited(nodes={0: {"deps": [3]}}), r"depends on \[3\], which are not earlier nodes"),
    (edited(nodes={1: {"id": 0}}), "duplicate node id 0"),
    (edited(nodes={0: {"flops": 0, "bytes": 0}}), "needs duration_us, or flops/bytes"),
    (edited(nodes={2: {"group": "tp"}}), r"unknown group 'tp'; trace defines \['dp', 'pp'\]"),
    (edited(nodes={3: {"peer": 2}}), r"peer 2 is not a position in group block \[0, 1\]"),
    (edited(nodes={2: {"split_bytes": [20, 20]}}), "split_bytes has 2 entries for a group of 4"),
    (edited(nodes={0: {"flop": 3}}), r"unknown fields \['flop'\]"),
    (edited(groups={"dp": [[0, 1, 2, 3]], "pp": [[0, 1], [1, 2]]}), "overlap"),
    (edited(groups={"dp": [[0, 1]], "pp": [[0, 1], [2, 3]]}), r"ranks \[2, 3\] are in no block of group 'dp'"),
    (edited(ranks=[4]), "within world size 4"),
])
def test_bad_traces_give_clear_errors(data, message):
    with pytest.raises(TraceError, match=message):
        trace_from_json(data, source="t.json")
