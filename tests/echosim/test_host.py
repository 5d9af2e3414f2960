"""The host's pace: blocked time from profiler events, and fitting a trace to its full-speed step."""
import pytest

from echosim.engine import replay
from echosim.graph import Node, Trace
from echosim.trace.fitting import alone, fit_to_in_situ
from echosim.trace.host import blocked_us, gpu_busy_us, profile_host


def api(name, dur, ts=0.0):
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "ts": ts, "dur": dur}


def test_blocked_time_is_synchronisation_and_launches_far_beyond_their_median():
    events = [api("cudaLaunchKernel", 4)] * 9 + [api("cudaLaunchKernel", 520),  # waited for a queue slot
                                                  api("cudaStreamSynchronize", 300), api("cudaMemsetAsync", 3),
                                                  {"ph": "X", "cat": "kernel", "name": "k", "ts": 0, "dur": 900}]
    # median launch 4 us, floored to 5: the slow launch waited 520 - 4 x 5 = 500 us
    assert blocked_us(events) == pytest.approx(500 + 300)


def test_gpu_busy_time_is_the_union_of_gpu_intervals():
    events = [{"ph": "X", "cat": "kernel", "ts": 0, "dur": 10}, {"ph": "X", "cat": "gpu_memcpy", "ts": 5, "dur": 10},
              {"ph": "X", "cat": "kernel", "ts": 30, "dur": 5}, api("cudaLaunchKernel", 100)]
    assert gpu_busy_us(events) == (20.0, 35.0)


def test_profile_host_on_the_cpu_times_the_step():
    profile = profile_host(lambda: sum(range(10_000)))
    assert profile.wall_us > 0 and profile.blocked_us == 0 and profile.host_us == profile.wall_us


def three_ops():
    return Trace(world_size=1, ranks=[0], groups={},
                 nodes=[Node(id=i, kind="COMP", name=f"op{i}", stream="compute", duration_us=10.0, host_us=1.0)
                        for i in range(3)])


def alone_us(trace):
    return replay([alone(trace)], compute_us=None, collective_us=None).step_us


def test_fit_spreads_the_unrecorded_host_time_and_scales_kernels_for_the_rest():
    # host 90 us: each op gets its 1 us plus (90 - 3) / 3 -> issued at 30, 60, 90; op2 runs [90, 100].
    # A 110 us full-speed step leaves 20 us to the kernels: factor 2 on op2's 10 us.
    trace = three_ops()
    fit_to_in_situ(trace, 110.0, host_us=90.0, gpu_busy_us=30.0)
    assert [n.host_us for n in trace.nodes] == pytest.approx([30, 30, 30])
    assert trace.meta["in_situ_scale"] == pytest.approx(2.0, rel=1e-6) and trace.meta["host_scale"] == 1.0
    assert alone_us(trace) == pytest.approx(110.0)


def test_fit_scales_the_host_down_when_it_alone_outlasts_the_step():
    # even with kernels at half time the host makes it 95 us; kernels at the GPU's busy time
    # (24 of 30 us profiled: 0.8), the host-bound replay 3 x 30 g + 8 = 80 means g = 0.8
    trace = three_ops()
    fit_to_in_situ(trace, 80.0, host_us=90.0, gpu_busy_us=24.0)
    assert trace.meta["in_situ_scale"] == pytest.approx(0.8)
    assert trace.meta["host_scale"] == pytest.approx(0.8, rel=1e-6)
    assert alone_us(trace) == pytest.approx(80.0)


def test_fit_without_a_host_measure_scales_kernels_alone_and_drops_host_times():
    trace = three_ops()
    fit_to_in_situ(trace, 45.0)
    assert all(n.host_us is None for n in trace.nodes)
    assert trace.meta["in_situ_scale"] == pytest.approx(1.5) and alone_us(trace) == pytest.approx(45.0)
