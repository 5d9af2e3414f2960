"""DDP's bucketing, derived from a model: the order its gradients become ready and the bucket caps."""
from __future__ import annotations

from collections.abc import Callable

import torch

FIRST_BUCKET_BYTES, BUCKET_BYTES = 2**20, 25 * 2**20  # DDP's caps when bucket_cap_mb is not given


def ready_order(model: torch.nn.Module, backward: Callable[[], None]) -> list[torch.nn.Parameter]:
    """The model's parameters (tied ones once) in the order one plain `backward()` makes their gradients ready."""
    order = []
    handles = [p.register_post_accumulate_grad_hook(order.append) for p in model.parameters()]
    backward()
    for handle in handles:
        handle.remove()
    return order


def ddp_buckets(params: list[torch.nn.Parameter], *, bucket_cap_mb: float | None = None) -> list[int]:
    """Bucket bytes as DDP's reducer rebuilds them after its first step: parameters in gradient-ready
    order, a bucket closed once it holds at least its cap. Without `bucket_cap_mb` the first bucket's
    cap is FIRST_BUCKET_BYTES, the others' BUCKET_BYTES; with it, every cap is `bucket_cap_mb` MiB."""
    first_cap, cap = (FIRST_BUCKET_BYTES, BUCKET_BYTES) if bucket_cap_mb is None else (int(bucket_cap_mb * 2**20),) * 2
    buckets, size = [], 0
    for p in params:
        size += p.numel() * p.element_size()
        if size >= (cap if buckets else first_cap):
            buckets.append(size)
            size = 0
    return buckets + [size] * (size > 0)
