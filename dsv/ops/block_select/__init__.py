"""Low-rank block selection: estimate each query block's attention mass per KV block from
the predictor's q~, k~ (B, H, S, r), keep the critical KV blocks, and measure how much of
the exact attention mass the selection covers (mass recall).

    mass = estimate_block_mass(q_lr, k_lr, block_size=64, mode="fast")   # (B, H, NQ, NKV)
    index = select_blocks(q_lr, k_lr, block_size=64, top_p=0.9)          # BlockIndex
    mask = block_select(q_lr, k_lr, block_size=64, top_k=8)              # BlockMask
    recall = mass_recall(q, k, index, sample_rows=1024)                  # (B, H)
"""
from dsv.ops.block_select.mass import block_mass_reference, estimate_block_mass
from dsv.ops.block_select.recall import mass_recall
from dsv.ops.block_select.selection import block_select, select_blocks, select_from_mass

__all__ = [
    "block_mass_reference",
    "block_select",
    "estimate_block_mass",
    "mass_recall",
    "select_blocks",
    "select_from_mass",
]
