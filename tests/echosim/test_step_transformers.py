"""A tiny transformers GPT-2, built with `.to(device)`, traced under torch DDP and FSDP2 on fake
meshes of 2 and 4 ranks: the collectives and their bytes, derived from the model, exactly."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from echosim.trace import trace_roles  # noqa: E402
from tests.echosim import steps_transformers as steps  # noqa: E402
from tests.echosim.ddp_buckets import ddp_buckets, ready_order  # noqa: E402

WORLDS = [2, 4]


def trace(factory, world: int):
    [out] = trace_roles(factory, mesh_shape={"dp": world}, roles=[list(range(world))])
    return out


def comms(trace) -> list[tuple[str, float]]:
    return [(n.name, n.bytes) for n in trace.nodes if n.is_comm]


# -- DDP: one all-reduce per bucket, the buckets as DDP's reducer fills them
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("bucket_cap_mb", [None, 0.1])  # one bucket (the model is < 1 MiB); four of 0.1 MiB
def test_gpt2_under_ddp_all_reduces_every_gradient_byte_bucket_by_bucket(world, bucket_cap_mb):
    traced = trace(lambda mesh: steps.ddp_step(mesh, bucket_cap_mb=bucket_cap_mb), world)
    model = steps.tiny_gpt2("cpu")
    ids = steps.tokens("cpu")
    buckets = ddp_buckets(ready_order(model, lambda: model(ids, labels=ids).loss.backward()),
                          bucket_cap_mb=bucket_cap_mb)
    assert len(buckets) == (1 if bucket_cap_mb is None else 4)
    assert comms(traced) == [("all_reduce", b) for b in buckets]
    assert sum(buckets) == 4 * sum(p.numel() for p in model.parameters())  # fp32 gradients, the tied embedding once
    assert traced.groups == {"dp": [list(range(world))]}


@pytest.mark.parametrize("hook, itemsize", [("allreduce_hook", 4), ("fp16_compress_hook", 2)])
def test_gpt2_ddp_comm_hook_sets_the_bytes_on_the_wire(hook, itemsize):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    traced = trace(lambda mesh: steps.ddp_step(mesh, comm_hook=getattr(default_hooks, hook)), 2)
    params = sum(p.numel() for p in steps.tiny_gpt2("cpu").parameters())
    assert comms(traced) == [("all_reduce", itemsize * params)]


# -- FSDP2: all-gathers of each wrapped module's parameters, reduce-scatters of its gradients
def padded_numel(p: torch.Tensor, world: int) -> int:
    """Elements of `p` as FSDP2 shards it: dim 0 padded to a multiple of the world size."""
    return math.ceil(p.shape[0] / world) * world * (p.numel() // p.shape[0])


def fsdp_units(model) -> list[list[torch.nn.Parameter]]:
    """The parameters each fully_shard call manages: the root's (embeddings, final norm), then each block's."""
    blocks = [list(block.parameters()) for block in model.transformer.h]
    in_blocks = {id(p) for ps in blocks for p in ps}
    return [[p for p in model.parameters() if id(p) not in in_blocks], *blocks]


def fsdp_collectives(world: int, param_itemsize: int, reduce_itemsize: int = 4) -> list[tuple[str, float]]:
    """FSDP2's step: forward all-gathers root, block 0, ..., block L-1 (the root stays gathered after
    forward), backward all-gathers the blocks again in reverse and reduce-scatters their
    gradients as they finish, the root's last. Bytes are the full (padded) buffers: gathered
    output, unreduced input (each rank keeps 1 / world of it)."""
    root, *blocks = [sum(padded_numel(p, world) for p in unit) for unit in fsdp_units(steps.tiny_gpt2("cpu"))]
    gathers = [("all_gather", param_itemsize * n) for n in [root, *blocks, *blocks[::-1]]]
    return gathers + [("reduce_scatter", reduce_itemsize * n) for n in [*blocks[::-1], root]]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("param_dtype, itemsize", [(None, 4), (torch.bfloat16, 2)])
def test_gpt2_under_fsdp2_gathers_params_and_scatters_grads_per_module(world, param_dtype, itemsize):
    traced = trace(lambda mesh: steps.fsdp_step(mesh, param_dtype=param_dtype), world)
    expected = fsdp_collectives(world, itemsize)
    assert comms(traced) == expected
    params = sum(p.numel() for p in steps.tiny_gpt2("cpu").parameters())
    assert sum(b for name, b in expected if name == "reduce_scatter") == 4 * params  # no padding at these sizes
    assert {n.group for n in traced.nodes if n.is_comm} == {"dp"}


# -- FSDP2 with activation checkpointing: each block's forward again in the backward
def first_backward_gather(trace) -> int:
    gathers = [n.id for n in trace.nodes if n.name == "all_gather"]
    return gathers[steps.CONFIG.n_layer + 1]  # after the root's and every block's forward gather


def recomputed_flops() -> float:
    """FLOPs of every block's Conv1D matmuls (addmm) in one forward: 2 x tokens x weight size."""
    model = steps.tiny_gpt2("cpu")
    tokens = steps.BATCH * steps.SEQ
    return sum(2 * tokens * m.weight.numel() for block in model.transformer.h for m in block.modules()
               if isinstance(m, Conv1D))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("checkpointing", ["wrapper", "transformers"])
def test_fsdp2_activation_checkpointing_repeats_block_forwards_in_the_backward(world, checkpointing):
    plain = trace(steps.fsdp_step, world)
    recomputed = trace(lambda mesh: steps.fsdp_step(mesh, checkpointing=checkpointing), world)
    assert comms(recomputed) == comms(plain) == fsdp_collectives(world, 4)
    conv1d = sum(isinstance(m, Conv1D) for m in steps.tiny_gpt2("cpu").transformer.h.modules())

    def backward_addmms(t):
        return [n for n in t.nodes[first_backward_gather(t):] if n.name == "aten.addmm"]

    assert len(backward_addmms(plain)) == 0 and len(backward_addmms(recomputed)) == conv1d
    assert sum(n.flops for n in backward_addmms(recomputed)) == recomputed_flops()
    # the rest of the recompute: each block's attention forward once more (its FLOPs depend on
    # whether the model passes is_causal or, under its own checkpointing, a mask)
    def attention(t, backward):
        return [n for n in t.nodes if "attention" in n.name and n.name.endswith("backward") == backward]

    def other_flops(t):
        return sum(n.flops for n in t.nodes if "attention" not in n.name)

    assert other_flops(recomputed) - other_flops(plain) == recomputed_flops()
    assert len(attention(recomputed, False)) == 2 * len(attention(plain, False)) == 2 * steps.CONFIG.n_layer
    assert len(attention(recomputed, True)) == len(attention(plain, True))
