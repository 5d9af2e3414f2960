"""torch.distributed's single-tensor all-gather and reduce-scatter under this torch's name.

torch 2.13 renamed them all_gather_single / reduce_scatter_single and warns on the old names;
2.11, on the GPU image, has only all_gather_into_tensor / reduce_scatter_tensor. The name is
looked up per call, so wrappers installed on torch.distributed (echosim's tracing fills) see it.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def all_gather_into(output: Tensor, input: Tensor, **kwargs):
    """All-gather `input` of every rank into `output`, rank order along dim 0."""
    return getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(output, input, **kwargs)


def reduce_scatter_into(output: Tensor, input: Tensor, **kwargs):
    """Reduce `input` over the ranks and keep this rank's slice of dim 0 in `output`."""
    return getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(output, input, **kwargs)
