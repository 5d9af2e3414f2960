"""Tracing under the fake process group: user steps, measured steps, fills and FLOP formulas
(dsv's DiT as a workload: tests/sim)."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from echosim.hw import load_cluster
from echosim.simulator import build
from echosim.trace import trace_roles

def user_step(mesh):
    """A hand-written step on a (dp=2, tp=4) mesh: all-reduce over tp, uneven all-to-all over dp."""
    tp, dp = mesh.get_group("tp"), mesh.get_group("dp")
    x = torch.randn(16, 32)
    w = torch.randn(32, 32)

    def step():
        y = x @ w
        dist.all_reduce(y, group=tp)
        funcol.wait_tensor(funcol.all_to_all_single(y[:6].contiguous(), [1, 5], [2, 4], dp))

    return step


def test_user_step_records_groups_sizes_and_splits():
    traces = trace_roles(user_step, mesh_shape={"dp": 2, "tp": 4}, roles=[[0, 1, 2, 3], [4, 5, 6, 7]])
    first = traces[0]
    assert first.groups == {"tp": [[0, 1, 2, 3], [4, 5, 6, 7]], "dp": [[0, 4], [1, 5], [2, 6], [3, 7]]}
    mm, reduce, a2a = first.nodes
    assert (mm.name, mm.flops, mm.shapes) == ("aten.mm", 2 * 16 * 32 * 32, [[16, 32], [32, 32]])
    assert (reduce.name, reduce.group, reduce.bytes, reduce.deps) == ("all_reduce", "tp", 16 * 32 * 4, [0])
    assert (a2a.name, a2a.group, a2a.bytes, a2a.split_bytes) == ("all_to_all", "dp", 6 * 128, [256, 512])
    assert traces[1].ranks == [4, 5, 6, 7] and traces[1].meta["traced_rank"] == 4
    timeline = build(load_cluster("dgx_h100")).predict(traces)
    assert len([s for s in timeline.spans if s.name == "all_to_all"]) == 8


def test_measured_trace_times_every_compute_node_by_its_profiled_range():
    def make_step(mesh):
        a, b = torch.randn(256, 256), torch.randn(256, 256)

        def step():
            c = (a @ b).relu()
            torch.zeros(3).add_(1.0)  # no flops, tiny bytes: still a node
            return c.sum()

        return step

    [trace] = trace_roles(make_step, mesh_shape={"dp": 1}, roles=[[0]], fake_tensors=False, measure=True)
    comp = [n for n in trace.nodes if n.kind == "COMP"]
    assert [n.name for n in comp][:2] == ["aten.mm", "aten.relu"]
    assert all(n.duration_us is not None and n.duration_us > 0 for n in comp)
    assert comp[0].duration_us > comp[1].duration_us  # a 256^3 matmul outlasts a 64K-element relu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measured_cuda_node_is_its_kernel_time():
    from echosim.hw.calibrate_kernels import time_us

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def make_step(mesh):
        return lambda: [a @ a for _ in range(20)]  # back to back: the GPU stays busy and clocked up

    [trace] = trace_roles(make_step, mesh_shape={"dp": 1}, roles=[[0]], device="cuda", fake_tensors=False,
                          measure=True)
    durations = sorted(n.duration_us for n in trace.nodes if n.name == "aten.mm")
    assert len(durations) == 20 and durations[10] == pytest.approx(time_us(lambda: a @ a), rel=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_bound_step_is_fitted_as_host_pace_not_slower_kernels():
    x = torch.randn(64, device="cuda")

    def make_step(mesh):
        return lambda: [x.add_(1e-3) for _ in range(2000)]  # ~2 us kernels, each issued by Python

    [trace] = trace_roles(make_step, mesh_shape={"dp": 1}, roles=[[0]], device="cuda", fake_tensors=False,
                          measure=True, in_situ_steps=3)
    meta = trace.meta
    assert meta["gpu_busy_us"] < 0.5 * meta["in_situ_step_us"]  # the GPU idles: host-bound
    assert meta["host_us"] > 0.7 * meta["in_situ_step_us"]  # and the host's measured pace says so
    from echosim.engine import replay
    step = replay([trace], compute_us=None, collective_us=lambda call: (0.0, "free")).step_us
    assert step == pytest.approx(meta["in_situ_step_us"], rel=0.05)
    no_host = replay([_without_host(trace)], compute_us=None, collective_us=lambda call: (0.0, "free")).step_us
    assert no_host < 0.5 * step  # the kernels, even scaled, do not make the step


def _without_host(trace):
    from dataclasses import replace
    return replace(trace, nodes=[replace(n, host_us=None) for n in trace.nodes])


def test_in_situ_fit_makes_the_free_replay_last_the_full_speed_step():
    from echosim.engine import replay

    def make_step(mesh):
        a = torch.randn(192, 192)
        return lambda: (a @ a).relu().sum()

    [trace] = trace_roles(make_step, mesh_shape={"dp": 1}, roles=[[0]], fake_tensors=False, measure=True,
                          in_situ_steps=3)
    meta = trace.meta
    assert meta["in_situ_scale"] == pytest.approx(meta["in_situ_step_us"] / meta["replay_step_us"])
    step = replay([trace], compute_us=None, collective_us=lambda call: (0.0, "free")).step_us
    assert step == pytest.approx(meta["in_situ_step_us"])


@pytest.mark.parametrize("mode", ["functions", "dispatcher"])
def test_plausible_collectives_fill_fake_outputs_with_real_looking_data(mode):
    from echosim.trace import fake_world
    from echosim.trace.fills import PlausibleCollectives, plausible_collectives

    with fake_world(rank=1, mesh_shape={"dp": 4}) as mesh:
        with plausible_collectives() if mode == "functions" else PlausibleCollectives():
            group = mesh.get_group()
            shard, full = 3 * torch.randn(4000), torch.randn(12)
            gathered, scattered, exchanged = torch.zeros(16000), torch.zeros(3), torch.zeros(12)
            dist.all_gather_into_tensor(gathered, shard, group=group)
            dist.reduce_scatter_tensor(scattered, full, group=group)
            dist.all_to_all_single(exchanged, full, group=group)
        assert gathered.std().item() == pytest.approx(3.0, rel=0.1) and not torch.equal(gathered[:4000], shard)
        assert torch.equal(scattered, full[:3]) and torch.equal(exchanged, full)
    assert dist.all_gather_into_tensor.__name__ == "all_gather_into_tensor"  # restored on exit


def test_fills_of_fake_collectives_are_not_recorded():
    from echosim.trace.fills import plausible_collectives

    def make_step(mesh):
        shard, gathered = torch.randn(8), torch.zeros(16)
        return lambda: (dist.all_gather_into_tensor(gathered, shard, group=mesh.get_group()), gathered.sum())

    with plausible_collectives():
        [trace] = trace_roles(make_step, mesh_shape={"dp": 2}, roles=[[0, 1]], fake_tensors=False)
    assert [n.name for n in trace.nodes] == ["all_gather", "aten.sum"]


def test_full_speed_steps_leave_out_the_fills_that_stall_compute(monkeypatch):
    """A fill on the compute stream (here the CPU) is time the real step spends in the collective,
    which the collective model predicts: timed steps subtract it."""
    import time

    from echosim.trace import fake_world, fills
    from echosim.trace.timing import time_steps_us

    def slow_fill(received, sent):  # 50 ms, far above the fake collective's own cost
        time.sleep(0.05)
        received.copy_(sent)

    monkeypatch.setitem(fills.FILLS, "all_to_all_single", slow_fill)
    with fake_world(rank=0, mesh_shape={"cp": 2}) as mesh:
        sent, received = torch.randn(1024), torch.zeros(1024)

        def step():
            dist.all_to_all_single(received, sent, group=mesh.get_group())

        with fills.plausible_collectives():
            began = time.perf_counter()
            step()
            assert time.perf_counter() - began >= 0.05 and torch.equal(received, sent)
            assert time_steps_us(step, 3)[0] < 20e3


def test_a_registered_flop_formula_counts_for_its_op(monkeypatch):
    from echosim.trace import flops

    monkeypatch.setitem(flops._FLOPS, torch.ops.aten.relu, None)  # restored (removed) after the test
    flops.register_flops(torch.ops.aten.relu, lambda x: 7.0 * x.numel())

    def make_step(mesh):
        a = torch.randn(4, 8)
        return lambda: a.relu()

    [trace] = trace_roles(make_step, mesh_shape={"dp": 1}, roles=[[0]])
    [relu] = trace.nodes
    assert (relu.name, relu.flops) == ("aten.relu", 7.0 * 32)


def test_the_modelled_sparse_attention_runs_the_kernel_registered_for_its_device(monkeypatch):
    import torch.nn.functional as F

    from echosim.trace import flops

    calls = []

    def forward(q, k, v, density):
        calls.append(("forward", density))
        return 2 * v, q.new_zeros(q.shape[:-1], dtype=torch.float32)

    def backward(grad, q, k, v, out, lse, density):
        calls.append(("backward", density))
        return grad.clone(), 2 * grad, 3 * grad

    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    monkeypatch.delitem(flops._KERNELS, "cpu", raising=False)
    assert torch.equal(flops.modelled_sparse_attention(q, k, v, 0.5), F.scaled_dot_product_attention(q, k, v))
    monkeypatch.setitem(flops._KERNELS, "cpu", flops.SparseKernel(forward=forward, backward=backward))
    out = flops.modelled_sparse_attention(q, k, v, 0.5)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.equal(out, 2 * v) and torch.equal(dq, grad) and torch.equal(dk, 2 * grad) and torch.equal(dv, 3 * grad)
    assert calls == [("forward", 0.5), ("backward", 0.5)]
