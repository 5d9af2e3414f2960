"""Tracing under the fake process group: the DiT at world size 8 with FSDP2, and a user step."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from dsv.models.dit import DIT_PRESETS, matmul_params_per_token, param_count
from echosim.hw import load_cluster
from echosim.kernels import op_class
from echosim.report import breakdowns
from echosim.simulate import predict
from echosim.trace import trace_roles
from echosim.trace.dit import DiTWorkload

WORLD = 8


def trace_dit(density):
    workload = DiTWorkload(preset="tiny", frames=8, height=32, width=32, density=density)
    [trace] = trace_roles(workload.make_step, mesh_shape=workload.mesh_shape(WORLD), roles=workload.roles(WORLD))
    return trace


@pytest.fixture(scope="module")
def dense():
    return trace_dit(1.0)


def collectives(trace, name):
    return [n for n in trace.nodes if n.name == name]


def test_one_trace_stands_for_all_fsdp_ranks(dense):
    assert dense.ranks == list(range(WORLD)) and dense.groups == {"dp": [list(range(WORLD))]}


def test_fsdp_gathers_each_block_in_forward_and_backward_and_reduces_once(dense):
    cfg = DIT_PRESETS["tiny"]()
    d, head_dim = cfg.hidden, cfg.head_dim
    block = 18 * d * d + 15 * d + 2 * head_dim  # adaLN 6d^2+6d, qkv 3d^2+3d, out d^2+d, MLP 8d^2+5d, qk-norm
    assert block == sum(p.numel() for p in _meta_block_params())
    root = param_count(cfg) - cfg.depth * block
    gathers = [n.bytes for n in collectives(dense, "all_gather")]
    reduces = [n.bytes for n in collectives(dense, "reduce_scatter")]
    # bf16 all-gathers: root then 4 blocks forward, 4 blocks again in backward (resharded after forward)
    assert gathers == [2 * root] + [2 * block] * 4 + [2 * block] * 4
    # fp32 reduce-scatters, one per block in backward, then the root
    assert reduces == [4 * block] * 4 + [4 * root]
    # before the first reduce-scatter: 5 forward gathers, the last block's and (prefetched) the one before
    first_reduce = collectives(dense, "reduce_scatter")[0].id
    assert sum(n.id < first_reduce for n in collectives(dense, "all_gather")) == 5 + 2
    assert {n.stream for n in collectives(dense, "all_gather")} == {"ag"}
    assert {n.stream for n in collectives(dense, "reduce_scatter")} == {"rs"}


def _meta_block_params():
    from dsv.models.dit import VideoDiT
    with torch.device("meta"):
        return VideoDiT(DIT_PRESETS["tiny"]()).blocks[0].parameters()


def attention_flops(trace):
    return sum(n.flops for n in trace.nodes if op_class(n.name) == "attention")


def test_flops_match_the_model_formulas(dense):
    cfg = DIT_PRESETS["tiny"]()
    tokens = 8 * (32 // 4) * (32 // 4)  # grid (8, 8, 8)
    # forward 2 matmuls (QK^T, PV) = 4*S^2*hidden; torch counts backward as 2.5x forward
    assert attention_flops(dense) == cfg.depth * 3.5 * 4 * tokens**2 * cfg.hidden
    gemm = sum(n.flops for n in dense.nodes if op_class(n.name) == "gemm")
    reference = 6 * matmul_params_per_token(cfg) * tokens  # token-wise linears; adaLN/embedders add ~1%
    assert gemm == pytest.approx(reference, rel=0.02)


def test_sparse_attention_costs_its_density(dense):
    sparse = trace_dit(0.25)
    assert attention_flops(sparse) == 0.25 * attention_flops(dense)
    assert [n.bytes for n in sparse.nodes if n.is_comm] == [n.bytes for n in dense.nodes if n.is_comm]


def test_simulated_step_of_the_traced_dit(dense):
    timeline = predict([dense], load_cluster("dgx_h100"))
    parts = breakdowns(timeline)
    assert len({(b.compute_us, b.exposed_comm_us, b.waiting_us) for b in parts}) == 1  # identical ranks
    b = parts[0]
    assert b.compute_us + b.exposed_comm_us + b.waiting_us + b.idle_us == pytest.approx(timeline.step_us)
    serial = sum(s.end_us - s.start_us for s in timeline.spans if s.rank == 0 and s.stream == "compute")
    assert serial <= timeline.step_us and b.waiting_us == 0


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
    timeline = predict(traces, load_cluster("dgx_h100"))
    assert len([s for s in timeline.spans if s.name == "all_to_all"]) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_modelled_sparse_attention_on_cuda_is_dsv_kernel_on_its_random_lists():
    from dsv.ops.sparse_attention import gathered_attention
    from echosim.trace.flops import _random_index, modelled_sparse_attention

    q, k, v = (torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = modelled_sparse_attention(q, k, v, 0.25)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = gathered_attention(q64, k64, v64, _random_index(q, 0.25), 64 ** -0.5)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad.double()))
    assert _random_index(q, 0.25).counts.float().mean().item() == 2  # round(0.25 * 8) blocks per query block
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-2, rtol=2e-2)


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
    from echosim.engine import simulate
    replay = simulate([trace], compute_us=None, collective_us=lambda call: (0.0, "free")).step_us
    assert replay == pytest.approx(meta["in_situ_step_us"], rel=0.05)
    no_host = simulate([_without_host(trace)], compute_us=None, collective_us=lambda call: (0.0, "free")).step_us
    assert no_host < 0.5 * replay  # the kernels, even scaled, do not make the step


def _without_host(trace):
    from dataclasses import replace
    return replace(trace, nodes=[replace(n, host_us=None) for n in trace.nodes])


def test_in_situ_fit_makes_the_free_replay_last_the_full_speed_step():
    from echosim.engine import simulate

    def make_step(mesh):
        a = torch.randn(192, 192)
        return lambda: (a @ a).relu().sum()

    [trace] = trace_roles(make_step, mesh_shape={"dp": 1}, roles=[[0]], fake_tensors=False, measure=True,
                          in_situ_steps=3)
    meta = trace.meta
    assert meta["in_situ_scale"] == pytest.approx(meta["in_situ_step_us"] / meta["replay_step_us"])
    replay = simulate([trace], compute_us=None, collective_us=lambda call: (0.0, "free")).step_us
    assert replay == pytest.approx(meta["in_situ_step_us"])


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
