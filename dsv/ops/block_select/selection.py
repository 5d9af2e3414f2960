"""Selection rules: from block masses to the KV blocks each query block attends to.

Per (batch, head, query block) the KV blocks are ranked by estimated mass (the query's
own block first when `keep_diagonal`), and the first `count` are kept, where count is
  top-k:    k, or a per-head budget (fraction of the blocks, or a count);
  top-p:    the fewest blocks whose mass reaches p (a float, or one per head);
then clamped to [min_blocks, max_blocks].
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from dsv.ops.block_index import BlockIndex
from dsv.ops.block_select.mass import estimate_block_mass


def _per_head_rule(top_k, top_p, budget, heads: int, n: int, device) -> tuple[bool, Tensor]:
    """(is_top_p, (H,) float32 mass fractions or int32 block counts before clamping)."""
    if top_p is not None:
        if top_k is not None or budget is not None:
            raise ValueError("give either top_p or a count (top_k / budget), not both")
        return True, torch.as_tensor(top_p, dtype=torch.float32, device=device).expand(heads).contiguous()
    if budget is not None:
        budget = torch.as_tensor(budget, device=device).expand(heads)
        counts = torch.ceil(budget * n) if budget.is_floating_point() else budget
    elif top_k is not None:
        counts = torch.full((heads,), int(top_k), device=device)
    else:
        raise ValueError("give one of top_k, top_p or budget")
    return False, counts.to(torch.int32).contiguous()


def _select_rows_torch(mass: Tensor, per_head: Tensor, *, top_p: bool, lower: int, upper: int, keep_diagonal: bool):
    """Reference selection by sorting: (counts (B, H, NQ) int32, indices (B, H, NQ, width) int32)."""
    b, h, nq, n = mass.shape
    ranking = mass
    if keep_diagonal:
        ranking = mass + 2.0 * torch.eye(nq, n, device=mass.device)  # masses are <= 1: own block first
    order = torch.argsort(ranking, dim=-1, descending=True)  # (B, H, NQ, NKV)
    if top_p:
        covered = mass.gather(-1, order).cumsum(-1)
        counts = (covered < per_head.view(1, h, 1, 1)).sum(-1) + 1  # fewest blocks reaching p
    else:
        counts = per_head.view(1, h, 1).long().expand(b, h, nq)
    counts = counts.clamp(min=lower, max=upper)  # (B, H, NQ)
    width = int(counts.max().item())
    # -- the first `count` ranked blocks, re-sorted ascending, padding (id n) last then zeroed
    kept = torch.arange(width, device=mass.device) < counts[..., None]
    ids = torch.where(kept, order[..., :width], n).sort(dim=-1).values
    return counts.to(torch.int32), torch.where(ids == n, 0, ids).to(torch.int32)


def select_from_mass(
    mass: Tensor,
    *,
    block_size: int,
    seq_len: int,
    top_k: int | None = None,
    top_p: float | Tensor | None = None,
    budget: Tensor | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    keep_diagonal: bool = True,
    use_triton: bool | None = None,
) -> BlockIndex:
    """Apply the selection rules to block masses (B, H, NQ, NKV) -> BlockIndex.

    budget: (H,) per-head kept-block fractions (floating dtype, rounded up) or counts
        (integer dtype); overrides top_k. top_p: float or (H,) mass fractions.
    use_triton: default True on CUDA (sort-free kernel); False sorts in PyTorch.
        Ties in mass may be broken differently by the two paths.
    """
    b, h, nq, n = mass.shape
    mass = mass.float()
    is_top_p, per_head = _per_head_rule(top_k, top_p, budget, h, n, mass.device)
    upper = n if max_blocks is None else min(max_blocks, n)
    lower = min(max(min_blocks, 1), upper)
    if use_triton is None:
        use_triton = mass.is_cuda
    if use_triton:
        from dsv.ops.block_select.select_kernel import select_rows_triton  # triton is Linux-only: import on use

        width = upper if is_top_p else int(per_head.clamp(lower, upper).max().item())
        counts, indices = select_rows_triton(
            mass, per_head, top_p=is_top_p, min_blocks=lower, max_blocks=upper, width=width, keep_diagonal=keep_diagonal
        )
        if is_top_p:
            indices = indices[..., : int(counts.max().item())].contiguous()
    else:
        counts, indices = _select_rows_torch(
            mass, per_head, top_p=is_top_p, lower=lower, upper=upper, keep_diagonal=keep_diagonal
        )
    return BlockIndex(counts=counts, indices=indices.contiguous(), block_size=block_size, seq_len=seq_len)


def select_blocks(
    q_lr: Tensor,
    k_lr: Tensor,
    *,
    block_size: int,
    top_k: int | None = None,
    top_p: float | Tensor | None = None,
    budget: Tensor | None = None,
    min_blocks: int = 1,
    max_blocks: int | None = None,
    keep_diagonal: bool = True,
    scale: float | None = None,
    mode: str = "fast",
    use_triton: bool | None = None,
    valid: Tensor | None = None,
) -> BlockIndex:
    """Estimate block masses from q~, k~ (B, H, S, R) and select KV blocks per query block;
    valid (NB,) int32 the real tokens per block of a partial grid (padding keys carry no mass)."""
    mass = estimate_block_mass(q_lr, k_lr, block_size=block_size, scale=scale, mode=mode, use_triton=use_triton,
                               valid=valid)
    return select_from_mass(
        mass, block_size=block_size, seq_len=q_lr.shape[2], top_k=top_k, top_p=top_p, budget=budget,
        min_blocks=min_blocks, max_blocks=max_blocks, keep_diagonal=keep_diagonal, use_triton=use_triton,
    )


def block_select(q_lr: Tensor, k_lr: Tensor, **kwargs) -> BlockMask:
    """The public API: `select_blocks(q_lr, k_lr, **kwargs).to_block_mask()`."""
    return select_blocks(q_lr, k_lr, **kwargs).to_block_mask()
