"""The replay engine on hand-built graphs whose answers are worked out by hand."""
import pytest

from echosim.engine import SimulationError, replay
from echosim.graph import Node, Trace, TraceError
from echosim.report import breakdowns, chrome_trace, summary


def comp(id, us, *, deps=(), stream="compute"):
    return Node(id=id, kind="COMP", name=f"op{id}", stream=stream, deps=list(deps), duration_us=us)


def coll(id, name="all_reduce", *, deps=(), group="world", nbytes=1e6, stream="comm"):
    return Node(id=id, kind="COMM_COLL", name=name, stream=stream, deps=list(deps), group=group, bytes=nbytes)


def trace(nodes, *, ranks=(0,), world=1, groups=None):
    return Trace(world_size=world, ranks=list(ranks), groups=groups or {"world": [list(range(world))]},
                 nodes=nodes)


def fixed(us):
    """A collective model that takes `us` for everything and records what it was asked."""
    calls = []

    def model(call):
        calls.append(call)
        return us, "fixed"

    model.calls = calls
    return model


def spans_by(timeline, rank=0):
    return {s.name: (s.start_us, s.end_us) for s in timeline.spans if s.rank == rank}


def test_critical_path_follows_dependencies_across_streams():
    # compute: op0 [0,10] op2 [10,40]; side: op1 waits op0 -> [10,15], op3 waits op2 -> [40,41]
    nodes = [comp(0, 10), comp(1, 5, deps=[0], stream="side"), comp(2, 30), comp(3, 1, deps=[2], stream="side")]
    tl = replay([trace(nodes)], compute_us=None, collective_us=fixed(0))
    assert spans_by(tl) == {"op0": (0, 10), "op1": (10, 15), "op2": (10, 40), "op3": (40, 41)}
    assert tl.step_us == 41


def test_stream_order_serialises_independent_nodes():
    nodes = [comp(0, 10, stream="a"), comp(1, 7, stream="a"), comp(2, 3, stream="b")]
    tl = replay([trace(nodes)], compute_us=None, collective_us=fixed(0))
    assert spans_by(tl) == {"op0": (0, 10), "op1": (10, 17), "op2": (0, 3)}


@pytest.mark.parametrize("comm_us, step, exposed", [(50, 210, 0), (150, 260, 50)])
def test_communication_overlaps_compute_until_it_is_longer(comm_us, step, exposed):
    # all-reduce after op0 runs on its own stream beside op2 (100 us); op3 needs its result.
    nodes = [comp(0, 100), coll(1, deps=[0]), comp(2, 100), comp(3, 10, deps=[1])]
    tl = replay([trace(nodes, ranks=[0, 1], world=2)], compute_us=None, collective_us=fixed(comm_us))
    assert tl.step_us == step
    for b in breakdowns(tl):
        assert (b.compute_us, b.exposed_comm_us, b.waiting_us, b.idle_us) == (210, exposed, 0, 0)


def test_collective_starts_when_its_last_member_arrives():
    slow = trace([comp(0, 100), coll(1, deps=[0])], ranks=[0], world=2)
    fast = trace([comp(0, 30), coll(1, deps=[0])], ranks=[1], world=2)
    model = fixed(20)
    tl = replay([slow, fast], compute_us=None, collective_us=model)
    for rank in (0, 1):
        assert spans_by(tl, rank)["all_reduce"] == (100, 120)
    fast_rank = breakdowns(tl)[1]
    assert (fast_rank.compute_us, fast_rank.waiting_us, fast_rank.exposed_comm_us, fast_rank.idle_us) == (30, 70, 20, 0)
    assert [c.members for c in model.calls] == [[0, 1]]
    assert summary(tl)["critical_rank"]["rank"] == 0


def test_collectives_match_in_order_per_group_block():
    # 4 ranks, two blocks of "pair"; block {2,3} is slower, so its collective starts later.
    groups = {"pair": [[0, 1], [2, 3]]}
    a = trace([comp(0, 10), coll(1, group="pair", deps=[0]), coll(2, group="pair")], ranks=[0, 1], world=4,
              groups=groups)
    b = trace([comp(0, 50), coll(1, group="pair", deps=[0]), coll(2, group="pair")], ranks=[2, 3], world=4,
              groups=groups)
    tl = replay([a, b], compute_us=None, collective_us=fixed(5))
    starts = sorted((s.rank, s.start_us) for s in tl.spans if s.kind == "COMM_COLL")
    assert starts == [(0, 10), (0, 15), (1, 10), (1, 15), (2, 50), (2, 55), (3, 50), (3, 55)]


def test_send_waits_for_the_matching_receive():
    groups = {"pp": [[0, 1]]}
    send = Node(id=1, kind="COMM_SEND", name="send", stream="p2p", deps=[0], group="pp", peer=1, bytes=64)
    recv = Node(id=0, kind="COMM_RECV", name="recv", stream="p2p", group="pp", peer=0, bytes=64)
    sender = trace([comp(0, 10), send], ranks=[0], world=2, groups=groups)
    receiver = trace([recv, comp(1, 4, deps=[0])], ranks=[1], world=2, groups=groups)
    model = fixed(5)
    tl = replay([sender, receiver], compute_us=None, collective_us=model)
    assert spans_by(tl, 1) == {"recv": (10, 15), "op1": (15, 19)}
    assert model.calls[0].members == [0, 1] and model.calls[0].name == "send_recv"


def test_compute_model_is_used_when_no_duration_is_given():
    node = Node(id=0, kind="COMP", name="aten.mm", stream="compute", flops=2e6)
    tl = replay([trace([node])], compute_us=lambda n: n.flops / 1e6, collective_us=fixed(0))
    assert tl.step_us == 2.0


def test_missing_member_deadlocks_with_a_clear_error():
    a = trace([coll(0)], ranks=[0], world=2)
    b = trace([comp(0, 1)], ranks=[1], world=2)
    with pytest.raises(SimulationError, match=r"all_reduce #0 on group 'world'.*ranks \[0\] arrived"):
        replay([a, b], compute_us=None, collective_us=fixed(1))


def test_members_disagreeing_on_size_is_an_error():
    a = trace([coll(0, nbytes=100)], ranks=[0], world=2)
    b = trace([coll(0, nbytes=200)], ranks=[1], world=2)
    with pytest.raises(SimulationError, match="rank 1 runs all_reduce of 200"):
        replay([a, b], compute_us=None, collective_us=fixed(1))


def test_inconsistent_groups_and_missing_ranks_are_errors():
    a = trace([coll(0, group="g")], ranks=[0, 1], world=4, groups={"g": [[0, 1], [2, 3]]})
    b = trace([coll(0, group="g")], ranks=[2, 3], world=4, groups={"g": [[0, 2], [1, 3]]})
    with pytest.raises(TraceError, match="inconsistent groups"):
        replay([a, b], compute_us=None, collective_us=fixed(1))
    with pytest.raises(TraceError, match=r"no trace plays ranks \[2, 3\]"):
        replay([a], compute_us=None, collective_us=fixed(1))


def test_chrome_trace_has_one_complete_event_per_span_and_wait_events():
    slow = trace([comp(0, 100), coll(1, deps=[0])], ranks=[0], world=2)
    fast = trace([comp(0, 30), coll(1, deps=[0])], ranks=[1], world=2)
    tl = replay([slow, fast], compute_us=None, collective_us=fixed(20))
    events = chrome_trace(tl)["traceEvents"]
    complete = [(e["pid"], e["name"], e["ts"], e["dur"]) for e in events if e["ph"] == "X"]
    assert sorted(complete) == [(0, "all_reduce", 100, 20), (0, "op0", 0, 100),
                                (1, "all_reduce", 100, 20), (1, "op0", 0, 30), (1, "wait all_reduce", 30, 70)]
    names = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "thread_name"}
    assert names == {(0, "compute"), (0, "comm"), (1, "compute"), (1, "comm")}


def test_overlap_slows_compute_exactly_while_a_collective_runs():
    # op0 [0, 100) alone would end at 100; the all-reduce runs [20, 50) beside it at 1.5x:
    # 20 us of work before, 30/1.5 = 20 during, 60 after -> ends at 110.
    # op4 starts with the all-reduce and ends inside it: 10 us of work take 15.
    # op1 ran before the all-reduce and op3 after it: neither is slowed.
    nodes = [comp(0, 100), comp(1, 20, stream="side"), coll(2, deps=[1]), comp(3, 10, deps=[0]),
             comp(4, 10, deps=[1], stream="side2")]
    seen = []

    def overlap(node, isolated_us, calls):
        seen.append((node.name, isolated_us, tuple(c.name for c in calls)))
        return 1.5

    tl = replay([trace(nodes)], compute_us=None, collective_us=fixed(30), overlap=overlap)
    assert spans_by(tl) == {"op0": (0, 110), "op1": (0, 20), "all_reduce": (20, 50), "op3": (110, 120),
                            "op4": (20, 35)}
    slowed = {s.name: s.args.get("slowdown") for s in tl.spans if s.kind == "COMP"}
    assert slowed == {"op0": pytest.approx(1.1), "op1": None, "op3": None, "op4": pytest.approx(1.5)}
    assert set(seen) == {("op0", 100, ("all_reduce",)), ("op4", 10, ("all_reduce",))}
    plain = replay([trace(nodes)], compute_us=None, collective_us=fixed(30))
    assert spans_by(plain)["op0"] == (0, 100)


def hosted(node, host_us):
    node.host_us = host_us
    return node


def test_no_node_starts_before_the_host_has_issued_it():
    # the host issues op0 at 5, op1 at 5 + 40 = 45, op2 at 50: op1 waits for the host (GPU idle 15..45),
    # op2 waits for op1 (the host is ahead again)
    nodes = [hosted(comp(0, 10), 5), hosted(comp(1, 10), 40), hosted(comp(2, 10), 5)]
    tl = replay([trace(nodes)], compute_us=None, collective_us=fixed(0))
    assert spans_by(tl) == {"op0": (5, 15), "op1": (45, 55), "op2": (55, 65)}


def test_a_slow_collective_hides_the_host_gap_behind_it():
    # the host issues op0 at 10, the all-reduce at 10 and op2 at 50; op2 needs the all-reduce.
    # A free collective leaves the GPU waiting for the host (op2 at 50); a 100 us one hides the
    # host gap entirely (op2 at 120, as without a host): host and collective time overlap, they do not add.
    nodes = [hosted(comp(0, 10), 10), hosted(coll(1, deps=[0]), 0), hosted(comp(2, 10, deps=[1]), 40)]
    free = replay([trace(nodes, ranks=[0, 1], world=2)], compute_us=None, collective_us=fixed(0))
    slow = replay([trace(nodes, ranks=[0, 1], world=2)], compute_us=None, collective_us=fixed(100))
    assert spans_by(free)["op2"] == (50, 60) and spans_by(slow)["op2"] == (120, 130)


def test_a_job_issued_later_is_not_advanced_by_an_overlapping_collective():
    # op2 is issued at 60 but becomes ready at 0 on its own stream; the all-reduce [0, 30) overlaps
    # nothing that has begun, so op2 runs [60, 70) unslowed
    nodes = [hosted(coll(0), 0), comp(1, 5, stream="side"), hosted(comp(2, 10, stream="late"), 60)]
    tl = replay([trace(nodes)], compute_us=None, collective_us=fixed(30), overlap=lambda *a: 2.0)
    assert spans_by(tl)["op2"] == (60, 70)


def test_real_collectives_cost_the_host_more_than_traced_ones():
    # +25 us of host per collective: op2 is issued at 10 + 25 + 40 = 75 instead of 50
    nodes = [hosted(comp(0, 10), 10), hosted(coll(1, deps=[0]), 0), hosted(comp(2, 10, deps=[1]), 40)]
    tl = replay([trace(nodes, ranks=[0, 1], world=2)], compute_us=None, collective_us=fixed(0), comm_host_us=25)
    assert spans_by(tl)["op2"] == (75, 85)


def test_traces_without_a_measured_host_issue_each_op_in_the_host_models_time():
    # 5 us kernels issued every 20 us: the host sets the pace (3 x 20 + 5); a trace scaled to a
    # full-speed step before host times existed already has the host in its durations
    nodes = [comp(0, 5), comp(1, 5), comp(2, 5)]
    assert replay([trace(nodes)], compute_us=None, collective_us=fixed(0), host_us=lambda n: 20).step_us == 65
    scaled = trace(nodes)
    scaled.meta["in_situ_step_us"] = 15.0
    assert replay([scaled], compute_us=None, collective_us=fixed(0), host_us=lambda n: 20).step_us == 15


def test_the_host_runs_ahead_of_the_gpu_except_at_a_sync():
    # host 1 us per op, kernels of 100 us: op0 runs [1, 101]. Without a sync, op2 on the other
    # stream starts once issued (t = 3). The sync after op0 holds the host until op0 ends, and
    # op2 is issued 1 us after that
    nodes = [comp(0, 100), comp(1, 0), comp(2, 100, stream="side")]
    free = replay([trace(nodes)], compute_us=None, collective_us=fixed(0), host_us=lambda n: 1)
    assert spans_by(free)["op2"] == (3, 103)
    nodes[1].sync = True
    held = replay([trace(nodes)], compute_us=None, collective_us=fixed(0), host_us=lambda n: 1)
    assert spans_by(held)["op2"] == (102, 202)
