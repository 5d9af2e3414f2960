"""What ordinary PyTorch steps need to run in the fake world, with or without fake tensors.

    with user_steps() as ddp_modules:   # around building the step and running it
        step = build_step(make_step, mesh)
        with ddp_bookkeeping(ddp_modules, fake_tensors=True):   # the DDP modules it built
            step()

- `model.to(device)` (and `.half()`, `.cuda()`) under FakeTensorMode: nn.Module swaps fake
  parameters for their converted copies, and torch.utils.swap_tensors refuses tensors that
  something holds a weak reference to. The fake-tensor converter holds one to every fake
  tensor it made (a memo from meta tensors to fakes); the swap forgets those entries first.
- torch DDP: it checks at construction that every rank's parameters have the same shapes, by a
  collective that reads the shapes back as data. Every rank of a fake world builds the same
  model, so the check is skipped. In its second step (static_graph: third), DDP's reducer
  rebuilds its buckets in the order the first backward made gradients ready and broadcasts
  the bucket indices from CPU int32 tensors it reads, as it reads its map of used parameters.
  Under FakeTensorMode those tensors, and the ops on them, are real (ddp_bookkeeping: a few
  integers); all else stays fake. Traces are recorded once the rebuild is behind (ddp_settled).
- Initialisers that branch on values (torch.nn.init.trunc_normal_ resamples until no value is
  out of bounds; transformers' ViT uses it) cannot run on fake tensors, whose values do not
  exist: under FakeTensorMode they leave the tensor as it is, as they already do on meta tensors.
- torch.compile: compiled kernels never pass through the dispatcher, where echosim records
  (under FakeTensorMode they cannot run at all), so a factory that compiles is refused with a
  one-line error (build_step).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from unittest import mock

import torch
import torch.nn.parallel.distributed as ddp
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torchkit.cli import UsageError

BOOKKEEPING = "_echosim_ddp_bookkeeping"  # attribute of the real tensors _RealBookkeeping made
DDP_REBUILD_STEPS = 3  # steps at most past warm-up until DDP rebuilds its buckets (step 2's forward; static_graph: 3)


def _forget_fake(t: torch.Tensor) -> None:
    """Drop the fake-tensor converter's memo entries that hold a weak reference to `t`."""
    if isinstance(t, FakeTensor):
        memo = t.fake_mode.fake_tensor_converter.tensor_memo
        for key in [key for key, fake in memo.items() if fake is t]:
            del memo[key]


def _fake_safe_trunc_normal(original):
    def trunc_normal(tensor, *args, **kwargs):
        return tensor if isinstance(tensor, FakeTensor) else original(tensor, *args, **kwargs)
    return trunc_normal


def _swap_tensors(original):
    def swap(t1, t2):
        _forget_fake(t1)
        _forget_fake(t2)
        return original(t1, t2)
    return swap


class _RealBookkeeping(TorchDispatchMode):
    """Under FakeTensorMode: new CPU int32 tensors (DDP's bucket indices and map of used
    parameters) are real, and so is every op whose tensors are all such; the rest stays fake."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        made = (func in (torch.ops.aten.empty.memory_format, torch.ops.aten.zeros.default)
                and kwargs.get("dtype") == torch.int32 and torch.device(kwargs.get("device") or "cpu").type == "cpu")
        if not (made or tensors and all(getattr(t, BOOKKEEPING, False) for t in tensors)):
            return func(*args, **kwargs)
        with unset_fake_temporarily():
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                setattr(t, BOOKKEEPING, True)
        return out


def ddp_bookkeeping(ddp_modules, *, fake_tensors: bool):
    """Around the steps of DDP modules under FakeTensorMode: their reducers' bookkeeping is real."""
    return _RealBookkeeping() if ddp_modules and fake_tensors else nullcontext()


@contextmanager
def user_steps() -> Iterator[weakref.WeakSet]:
    """Patch what the module docstring lists while inside; yields the set of DDP modules built."""
    built: weakref.WeakSet = weakref.WeakSet()
    ddp_init = ddp.DistributedDataParallel.__init__

    def init(module, *args, **kwargs):
        with _RealBookkeeping():  # the map of used parameters (find_unused_parameters, static_graph)
            ddp_init(module, *args, **kwargs)
        built.add(module)

    with ExitStack() as stack:
        stack.enter_context(mock.patch("torch.utils.swap_tensors", _swap_tensors(torch.utils.swap_tensors)))
        stack.enter_context(mock.patch.object(ddp, "_verify_param_shape_across_processes", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(torch.nn.init, "_no_grad_trunc_normal_",
                                              _fake_safe_trunc_normal(torch.nn.init._no_grad_trunc_normal_)))
        stack.enter_context(mock.patch.object(ddp.DistributedDataParallel, "__init__", init))
        yield built


def build_step(make_step, mesh: DeviceMesh):
    """`make_step(mesh)`, refusing torch.compile (see the module docstring)."""
    def refuse(*args, **kwargs):
        raise UsageError(f"the step factory {getattr(make_step, '__qualname__', make_step)} calls torch.compile; "
                         f"echosim records eager ops at the dispatcher, which compiled kernels bypass: trace the "
                         f"uncompiled model (drop torch.compile)")

    with mock.patch("torch.compile", refuse):
        return make_step(mesh)


def ddp_settled(module: ddp.DistributedDataParallel) -> bool:
    """Whether DDP's steps are steady: its buckets rebuilt, or never to be (it finds unused parameters)."""
    return module._has_rebuilt_buckets or (module.find_unused_parameters and not module.static_graph)
