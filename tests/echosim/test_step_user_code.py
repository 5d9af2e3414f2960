"""Ordinary user code in a step factory: `model.to(...)` under fake tensors, and torch.compile
refused in one line before anything compiles."""
import time

import pytest
import torch

from echosim.trace import trace_roles
from torchkit.cli import UsageError


def converted_step(mesh):
    """A model built, then moved and cast the ordinary way (under FakeTensorMode when traced)."""
    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 24))
    model.to(mesh.device_type).to(torch.bfloat16)
    ids = torch.randint(0, 32, (4, 8), device=mesh.device_type)
    return lambda: model(ids).sum().backward()


def test_model_to_device_and_dtype_works_under_fake_tensors():
    [trace] = trace_roles(converted_step, mesh_shape={"dp": 2}, roles=[[0, 1]])
    [forward] = [n for n in trace.nodes if n.name == "aten.addmm"]
    assert (forward.dtype, forward.shapes) == ("bfloat16", [[24], [32, 16], [16, 24]])
    assert forward.flops == 2 * 32 * 16 * 24
    assert torch.utils.swap_tensors.__module__ == "torch.utils"  # the patch is gone after tracing


def compiled_step(mesh):
    model = torch.compile(torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)
    return lambda: model(x).sum().backward()


def module_compiled_step(mesh):
    model = torch.nn.Linear(8, 8)
    model.compile()
    x = torch.randn(2, 8)
    return lambda: model(x).sum().backward()


@pytest.mark.parametrize("factory", [compiled_step, module_compiled_step])
def test_a_compiling_factory_is_refused_before_it_compiles(factory):
    began = time.perf_counter()
    with pytest.raises(UsageError, match=f"step factory {factory.__name__} calls torch.compile.*"
                                         r"trace the uncompiled model \(drop torch.compile\)$"):
        trace_roles(factory, mesh_shape={"dp": 2}, roles=[[0, 1]])
    assert time.perf_counter() - began < 5  # compiling even this Linear's step takes ~10 s on this CPU
    assert torch.compile.__module__ == "torch"  # and torch.compile is itself again
