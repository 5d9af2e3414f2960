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


def _per_head(value: float | int | Tensor, heads: int, device: torch.device) -> Tensor:
    """A scalar or an (H,) tensor -> (1, H, 1) tensor on device."""
    tensor = torch.as_tensor(value, device=device)
    return tensor.expand(heads).reshape(1, heads, 1) if tensor.dim() == 0 else tensor.reshape(1, heads, 1)


def _counts(mass: Tensor, ranking: Tensor, *, top_k, top_p, budget) -> tuple[Tensor, Tensor | None]:
    """Blocks to keep per row before clamping, (B, H, NQ) int64, and the full descending
    ranking when top-p needed it (else None)."""
    b, h, nq, n = mass.shape
    if top_p is not None:
        if top_k is not None or budget is not None:
            raise ValueError("give either top_p or a count (top_k / budget), not both")
        order = torch.argsort(ranking, dim=-1, descending=True)  # (B, H, NQ, NKV)
        covered = mass.gather(-1, order).cumsum(-1)
        target = _per_head(top_p, h, mass.device).to(covered.dtype)[..., None]  # (1, H, 1, 1)
        return (covered < target).sum(-1) + 1, order
    if budget is not None:
        budget = _per_head(budget, h, mass.device)
        per_head = torch.ceil(budget * n).long() if budget.is_floating_point() else budget.long()
    elif top_k is not None:
        per_head = _per_head(int(top_k), h, mass.device).long()
    else:
        raise ValueError("give one of top_k, top_p or budget")
    return per_head.expand(b, h, nq), None


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
) -> BlockIndex:
    """Apply the selection rules to block masses (B, H, NQ, NKV) -> BlockIndex.

    budget: (H,) per-head kept-block fractions (floating dtype, rounded up) or counts
        (integer dtype); overrides top_k. top_p: float or (H,) mass fractions.
    """
    b, h, nq, n = mass.shape
    ranking = mass.float()
    if keep_diagonal:
        # masses are <= 1, so +2 ranks the query's own block first
        ranking = ranking + 2.0 * torch.eye(nq, n, device=mass.device)
    counts, order = _counts(mass.float(), ranking, top_k=top_k, top_p=top_p, budget=budget)
    upper = n if max_blocks is None else min(max_blocks, n)
    counts = counts.clamp(min=min(max(min_blocks, 1), upper), max=upper)  # (B, H, NQ)
    width = int(counts.max().item())
    if order is None:
        order = torch.topk(ranking, width, dim=-1).indices  # (B, H, NQ, width), descending mass
    # -- the first `count` ranked blocks, re-sorted ascending, padding (id n) last then zeroed
    kept = torch.arange(width, device=mass.device) < counts[..., None]
    ids = torch.where(kept, order[..., :width], n).sort(dim=-1).values
    indices = torch.where(ids == n, 0, ids).to(torch.int32)
    return BlockIndex(counts=counts.to(torch.int32), indices=indices.contiguous(), block_size=block_size, seq_len=seq_len)


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
) -> BlockIndex:
    """Estimate block masses from q~, k~ (B, H, S, R) and select KV blocks per query block."""
    mass = estimate_block_mass(q_lr, k_lr, block_size=block_size, scale=scale, mode=mode, use_triton=use_triton)
    return select_from_mass(
        mass, block_size=block_size, seq_len=q_lr.shape[2], top_k=top_k, top_p=top_p, budget=budget,
        min_blocks=min_blocks, max_blocks=max_blocks, keep_diagonal=keep_diagonal,
    )


def block_select(q_lr: Tensor, k_lr: Tensor, **kwargs) -> BlockMask:
    """The public API: `select_blocks(q_lr, k_lr, **kwargs).to_block_mask()`."""
    return select_blocks(q_lr, k_lr, **kwargs).to_block_mask()
