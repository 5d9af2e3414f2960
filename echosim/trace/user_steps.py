"""What ordinary PyTorch steps need to run in the fake world, with or without fake tensors.

    with user_steps() as ddp_modules:   # around building the step and running it
        step = build_step(make_step, mesh)
        ...
    if ddp_modules: ...                 # the DistributedDataParallel modules it built

- `model.to(device)` (and `.half()`, `.cuda()`) under FakeTensorMode: nn.Module swaps fake
  parameters for their converted copies, and torch.utils.swap_tensors refuses tensors that
  something holds a weak reference to. The fake-tensor converter holds one to every fake
  tensor it made (a memo from meta tensors to fakes); the swap forgets those entries first.
- torch DDP: it checks at construction that every rank's parameters have the same shapes, by a
  collective that reads the shapes back as data. Every rank of a fake world builds the same
  model, so the check is skipped. In its second step, DDP's reducer rebuilds its buckets in
  the order the first backward made gradients ready and broadcasts the bucket indices from
  CPU int32 tensors it reads; under FakeTensorMode those tensors are real (they hold a few
  integers), everything else stays fake.
- torch.compile: compiled kernels never pass through the dispatcher, where echosim records
  (under FakeTensorMode they cannot run at all), so a factory that compiles is refused with a
  one-line error (build_step).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.parallel.distributed as ddp
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from torchkit.cli import UsageError

DDP_STEADY_STEP = 3  # DDP rebuilds its buckets in the forward of step 2: step 3 is the first steady one


def _forget_fake(t: torch.Tensor) -> None:
    """Drop the fake-tensor converter's memo entries that hold a weak reference to `t`."""
    if isinstance(t, FakeTensor):
        memo = t.fake_mode.fake_tensor_converter.tensor_memo
        for key in [key for key, fake in memo.items() if fake is t]:
            del memo[key]


def _swap_tensors(original):
    def swap(t1, t2):
        _forget_fake(t1)
        _forget_fake(t2)
        return original(t1, t2)
    return swap


class _RealCpuInts(TorchDispatchMode):
    """New CPU int32 tensors are real tensors, also under FakeTensorMode (DDP's bucket indices)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten.empty.memory_format and kwargs.get("dtype") == torch.int32
                and torch.device(kwargs.get("device") or "cpu").type == "cpu"):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _rebuild_buckets(original):
    def rebuild(reducer):
        with _RealCpuInts():
            return original(reducer)
    return rebuild


@contextmanager
def user_steps() -> Iterator[weakref.WeakSet]:
    """Patch what the module docstring lists while inside; yields the set of DDP modules built."""
    built: weakref.WeakSet = weakref.WeakSet()
    ddp_init = ddp.DistributedDataParallel.__init__

    def init(module, *args, **kwargs):
        ddp_init(module, *args, **kwargs)
        built.add(module)

    with ExitStack() as stack:
        stack.enter_context(mock.patch("torch.utils.swap_tensors", _swap_tensors(torch.utils.swap_tensors)))
        stack.enter_context(mock.patch.object(ddp, "_verify_param_shape_across_processes", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(ddp.DistributedDataParallel, "__init__", init))
        stack.enter_context(mock.patch.object(dist.Reducer, "_rebuild_buckets",
                                              _rebuild_buckets(dist.Reducer._rebuild_buckets)))
        yield built


def build_step(make_step, mesh: DeviceMesh):
    """`make_step(mesh)`, refusing torch.compile (see the module docstring)."""
    def refuse(*args, **kwargs):
        raise UsageError(f"the step factory {getattr(make_step, '__qualname__', make_step)} calls torch.compile; "
                         f"echosim records eager ops at the dispatcher, which compiled kernels bypass: trace the "
                         f"uncompiled model (drop torch.compile)")

    with mock.patch("torch.compile", refuse):
        return make_step(mesh)
