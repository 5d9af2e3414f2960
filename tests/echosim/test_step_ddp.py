"""torch DDP traced in the fake world: its reducer's bucketed all-reduces (bucket by bucket, as the
reducer fills them), their place in the backward, and comm hooks that change their bytes."""
import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from echosim.hw import load_cluster
from echosim.simulator import build
from echosim.trace import trace_roles
from tests.echosim.ddp_buckets import FIRST_BUCKET_BYTES, ddp_buckets, ready_order

NEEDS_NCCL = pytest.mark.skipif(not torch.distributed.is_nccl_available(),
                                reason="DDP takes its bf16 hook only from a CUDA build with NCCL")
LAYERS, WIDTH = 4, 512  # 4 x 1 MiB of fp32 weights: more than DDP's small first bucket


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def backward(model: torch.nn.Module):
    x = torch.randn(8, WIDTH)
    return lambda: model(x).square().mean().backward()


def mlp_step(mesh, *, comm_hook=None, **ddp_options):
    model = DistributedDataParallel(mlp(), process_group=mesh.get_group(), **ddp_options)
    if comm_hook is not None:
        model.register_comm_hook(None, comm_hook)
    return backward(model)


def expected_buckets(**caps) -> list[int]:
    model = mlp()
    return ddp_buckets(ready_order(model, backward(model)), **caps)


def all_reduces(trace) -> list:
    return [n for n in trace.nodes if n.name == "all_reduce"]


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_all_reduces_its_buckets_small_first_bucket_then_the_cap(world):
    [trace] = trace_roles(mlp_step, mesh_shape={"dp": world}, roles=[list(range(world))])
    expected = expected_buckets()
    assert len(expected) == 2 and expected[0] < FIRST_BUCKET_BYTES + 2 * WIDTH * 4  # one layer, then the rest
    assert [n.bytes for n in all_reduces(trace)] == expected
    assert sum(expected) == sum(p.nbytes for p in mlp().parameters())
    assert {n.group for n in all_reduces(trace)} == {"dp"} and trace.groups == {"dp": [list(range(world))]}
    assert not any(n.name == "broadcast" for n in trace.nodes)  # the bucket rebuild (step 2) is behind


def test_ddp_bucket_cap_mb_caps_every_bucket():
    cap_mb = 1.5
    [trace] = trace_roles(lambda mesh: mlp_step(mesh, bucket_cap_mb=cap_mb), mesh_shape={"dp": 2}, roles=[[0, 1]])
    expected = expected_buckets(bucket_cap_mb=cap_mb)
    assert [n.bytes for n in all_reduces(trace)] == expected and len(expected) == 2


def test_ddp_all_reduces_overlap_the_rest_of_the_backward():
    [trace] = trace_roles(mlp_step, mesh_shape={"dp": 2}, roles=[[0, 1]])
    first, last = all_reduces(trace)
    fed_by = trace.nodes[max(first.deps)]  # the last gradient copied in, scaled by 1 / world on the way
    assert fed_by.name == "aten.mul" and fed_by.shapes[0] == [WIDTH, WIDTH]
    assert first.stream != "compute"
    later_matmuls = [n for n in trace.nodes[first.id:] if n.name == "aten.mm"]
    assert len(later_matmuls) == 2 * (LAYERS - 1) - 1  # the first layer needs no input gradient
    waits = {n.name for n in trace.nodes if set(n.deps) & {first.id, last.id}}
    assert waits == {"aten.copy_"}  # only the copies of reduced buckets into .grad, after the backward
    timeline = build(load_cluster("dgx_h200")).predict([trace])
    spans = [s for s in timeline.spans if s.rank == 0]
    reduce = next(s for s in spans if s.name == "all_reduce")
    assert reduce.end_us < [s for s in spans if s.name == "aten.mm"][-1].start_us  # done while backward runs on
    copies_out = [n for n in trace.nodes[last.id:] if n.name == "aten.copy_"]  # buckets back into .grad
    assert len(copies_out) == 2 * LAYERS and all(set(n.deps) & {first.id, last.id} for n in copies_out)


HOOKS = [(default_hooks.allreduce_hook, 4), (default_hooks.fp16_compress_hook, 2),
         pytest.param(default_hooks.bf16_compress_hook, 2, marks=NEEDS_NCCL)]  # hook, bytes per gradient element


@pytest.mark.parametrize("hook, bytes_per_element", HOOKS)
def test_ddp_comm_hooks_set_what_the_all_reduces_carry(hook, bytes_per_element):
    [plain] = trace_roles(mlp_step, mesh_shape={"dp": 2}, roles=[[0, 1]])
    [hooked] = trace_roles(lambda mesh: mlp_step(mesh, comm_hook=hook), mesh_shape={"dp": 2}, roles=[[0, 1]])
    assert [n.bytes for n in all_reduces(hooked)] == [n.bytes * bytes_per_element / 4 for n in all_reduces(plain)]


@pytest.mark.parametrize("options", [{}, {"gradient_as_bucket_view": True}, {"static_graph": True},
                                     {"find_unused_parameters": True}])
def test_ddp_traces_alike_with_real_and_fake_tensors_once_steady(options):
    fake, real = (trace_roles(lambda mesh: mlp_step(mesh, **options), mesh_shape={"dp": 2}, roles=[[0, 1]],
                              fake_tensors=f)[0] for f in (True, False))
    assert [(n.name, n.bytes, n.deps) for n in fake.nodes] == [(n.name, n.bytes, n.deps) for n in real.nodes]
    assert not any(n.name == "broadcast" for n in fake.nodes)  # recorded after the bucket rebuild, if any
    grads = sum(p.nbytes for p in mlp().parameters())
    used_map = 4 * len(list(mlp().parameters())) if options.get("find_unused_parameters") else 0  # int32 flags
    assert sum(n.bytes for n in all_reduces(fake)) == grads + used_map
