"""Pipeline schedules on uniform synthetic stages, where the bubble has a closed form."""
import pytest

from echosim.engine import replay
from echosim.graph import Node, validate
from echosim.pipeline import UniformStage, compose_pipeline, in_flight, interleaved_order, schedule_order
from echosim.report import breakdowns

FORWARD_US, BACKWARD_US = 3.0, 7.0


def uniform_pipeline(schedule, p, m, *, comm_us=0.0, classes_of=1):
    """p stages of one forward and one backward kernel; each stage class holds `classes_of` ranks."""
    stage = UniformStage(forward_nodes=[Node(id=0, kind="COMP", name="fwd", stream="compute", duration_us=FORWARD_US)],
                         backward_nodes=[Node(id=0, kind="COMP", name="bwd", stream="compute",
                                              duration_us=BACKWARD_US)],
                         activation_bytes=1024.0)
    world = p * classes_of
    stage_ranks = [[s * classes_of + i for i in range(classes_of)] for s in range(p)]
    pp = [[s * classes_of + i for s in range(p)] for i in range(classes_of)]
    traces = compose_pipeline([stage] * p, schedule=schedule, microbatches=m, world_size=world,
                              stage_ranks=stage_ranks, groups={"pp": pp})
    return traces, (lambda call: (comm_us, "fixed"))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 1), (2, 8), (4, 4), (4, 16), (8, 3)])
def test_bubble_fraction_is_p_minus_1_over_m_plus_p_minus_1(schedule, p, m):
    traces, comm = uniform_pipeline(schedule, p, m)
    for trace in traces:
        validate(trace)
    timeline = replay(traces, compute_us=None, collective_us=comm)
    assert timeline.step_us == pytest.approx((m + p - 1) * (FORWARD_US + BACKWARD_US))
    for b in breakdowns(timeline):
        assert b.compute_us == pytest.approx(m * (FORWARD_US + BACKWARD_US))
        bubble = (timeline.step_us - b.compute_us) / timeline.step_us
        assert bubble == pytest.approx((p - 1) / (m + p - 1))


def test_sends_and_receives_come_from_the_schedule():
    p, m = 4, 6
    traces, _ = uniform_pipeline("1f1b", p, m)
    for s, trace in enumerate(traces):
        sends = [(n.stream, n.peer) for n in trace.nodes if n.kind == "COMM_SEND"]
        recvs = [(n.stream, n.peer) for n in trace.nodes if n.kind == "COMM_RECV"]
        assert sorted(sends) == sorted([("send_fwd", s + 1)] * m * (s < p - 1) + [("send_bwd", s - 1)] * m * (s > 0))
        assert sorted(recvs) == sorted([("recv_fwd", s - 1)] * m * (s > 0) + [("recv_bwd", s + 1)] * m * (s < p - 1))
        computes = [n.name for n in trace.nodes if n.kind == "COMP"]
        warmup = min(p - s - 1, m)
        assert computes[:warmup + 2] == ["fwd"] * (warmup + 1) + ["bwd"]  # 1F1B: warm-up, then alternate


def test_1f1b_holds_fewer_activations_than_gpipe():
    orders = schedule_order("1f1b", 4, 8)
    for s, order in enumerate(orders):
        live = peak = 0
        for phase, _ in order:
            live += 1 if phase == "F" else -1
            peak = max(peak, live)
        assert peak == in_flight("1f1b", 4, 8, s) == 4 - s
    assert in_flight("gpipe", 4, 8, 0) == 8


def test_transfers_lengthen_the_step_by_one_hop_per_stage_boundary():
    p, m, hop = 4, 4, 2.0
    traces, comm = uniform_pipeline("gpipe", p, m, comm_us=hop)
    step = replay(traces, compute_us=None, collective_us=comm).step_us
    # the critical path crosses p-1 boundaries going forward and p-1 coming back
    assert step == pytest.approx((m + p - 1) * (FORWARD_US + BACKWARD_US) + 2 * (p - 1) * hop)


def test_replaying_classes_matches_replaying_every_rank():
    traces, comm = uniform_pipeline("1f1b", 4, 6, comm_us=1.5, classes_of=3)
    every = replay(traces, compute_us=None, collective_us=comm)
    classes = replay(traces, compute_us=None, collective_us=comm, as_classes=True)
    assert classes.ranks == [0, 3, 6, 9] and every.ranks == list(range(12))
    assert classes.step_us == every.step_us
    assert len(classes.spans) * 3 == len(every.spans)


def uniform_chunks(p, m, v):
    """p ranks of v chunks, each chunk 1/v of a uniform stage's forward and backward."""
    def chunk():
        return UniformStage(forward_nodes=[Node(id=0, kind="COMP", name="fwd", stream="compute",
                                                duration_us=FORWARD_US / v)],
                            backward_nodes=[Node(id=0, kind="COMP", name="bwd", stream="compute",
                                                 duration_us=BACKWARD_US / v)],
                            activation_bytes=1024.0)
    return compose_pipeline([[chunk() for _ in range(v)] for _ in range(p)], schedule="1f1b", microbatches=m,
                            world_size=p, stage_ranks=[[s] for s in range(p)], groups={"pp": [list(range(p))]})


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (2, 6, 4)])
def test_interleaving_shrinks_the_bubble_to_p_minus_1_over_vm_plus_p_minus_1(p, m, v):
    traces = uniform_chunks(p, m, v)
    timeline = replay(traces, compute_us=None, collective_us=lambda call: (0.0, "free"))
    assert timeline.step_us == pytest.approx((m + (p - 1) / v) * (FORWARD_US + BACKWARD_US))
    bubble = 1 - m * (FORWARD_US + BACKWARD_US) / timeline.step_us
    assert bubble == pytest.approx((p - 1) / (v * m + p - 1))


def test_interleaved_order_runs_every_chunk_of_every_microbatch_once_forward_before_backward():
    p, m, v = 4, 8, 2
    for s, order in enumerate(interleaved_order(p, m, v)):
        forwards = [(mb, c) for phase, mb, c in order if phase == "F"]
        backwards = [(mb, c) for phase, mb, c in order if phase == "B"]
        assert sorted(forwards) == sorted(backwards) == [(mb, c) for mb in range(m) for c in range(v)]
        assert all(order.index(("F", mb, c)) < order.index(("B", mb, c)) for mb, c in forwards)
        live = peak = 0
        for phase, _, _ in order:
            live += 1 if phase == "F" else -1
            peak = max(peak, live)
        assert peak / v == in_flight("1f1b", p, m, s, chunks=v)  # chunk-microbatches, in stage units
    with pytest.raises(ValueError, match="multiple of the stages"):
        interleaved_order(4, 6, 2)
