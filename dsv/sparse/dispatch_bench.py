"""Measure the dispatcher's table on the current GPU (`dsv bench dispatch`).

    dsv bench dispatch --out dsv/sparse/dispatch_default.json      # on the training GPU

Per sequence length: the best dense SDPA backend (cuDNN or flash, whichever is faster there)
forward+backward, and per kept-block density the DSV path forward+backward: block selection
from rank-r q~, k~ ("fast" mass estimate, per-head budget) + the Triton block-sparse kernel.
B=1, bf16; heads, head_dim and block size as the model trains them. Median of do_bench.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv.ops.block_select import select_blocks
from dsv.ops.layout import BLOCK_SIZE
from dsv.ops.sparse_attention import sparse_attention_index
from dsv.sparse.dispatch import DispatchTable

DENSE_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def _median_ms(fn, rep_ms: int) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")


def _fwd_bwd(attend, q, k, v, grad):
    def run():
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad)

    return run


def best_dense_ms(q, k, v, grad, rep_ms: int) -> tuple[str, float]:
    """(name, ms) of the fastest dense SDPA backend at this shape, forward+backward."""
    times = {}
    for name, backend in DENSE_BACKENDS.items():
        with sdpa_kernel([backend]):
            try:
                times[name] = _median_ms(_fwd_bwd(F.scaled_dot_product_attention, q, k, v, grad), rep_ms)
            except RuntimeError:  # backend not available for this shape / build
                continue
    name = min(times, key=times.get)
    return name, times[name]


def sparse_ms(q, k, v, grad, q_lr, k_lr, *, density: float, block_size: int, rep_ms: int) -> float:
    """Selection + block-sparse attention forward+backward at a kept-block density."""
    budget = torch.full((q.shape[1],), density, device=q.device)

    def attend(q, k, v):
        index = select_blocks(q_lr, k_lr, block_size=block_size, budget=budget, mode="fast")
        return sparse_attention_index(q, k, v, index, check_lists=False)  # as in training: no host sync

    return _median_ms(_fwd_bwd(attend, q, k, v, grad), rep_ms)


def measure_dispatch_table(*, seq_lens: list[int], densities: list[float], heads: int, head_dim: int,
                           block_size: int, rank: int, rep_ms: int = 200, log=print) -> DispatchTable:
    device = torch.device("cuda")
    dense, sparse, used = [], [], set()
    for s in seq_lens:
        q, k, v, grad = (torch.randn(1, heads, s, head_dim, device=device, dtype=torch.bfloat16) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        q_lr, k_lr = (torch.randn(1, heads, s, rank, device=device) for _ in range(2))
        name, ms = best_dense_ms(q, k, v, grad, rep_ms)
        used.add(name)
        row = [sparse_ms(q, k, v, grad, q_lr, k_lr, density=d, block_size=block_size, rep_ms=rep_ms)
               for d in densities]
        log(f"S={s:>6}  dense ({name}) {ms:9.3f} ms  " + "  ".join(
            f"{d:.2f}: {t:8.3f} ({ms / t:5.2f}x)" for d, t in zip(densities, row)))
        dense.append(ms)
        sparse.append(row)
        del q, k, v, grad
        torch.cuda.empty_cache()
    return DispatchTable(seq_lens=seq_lens, densities=densities, dense_ms=dense, sparse_ms=sparse,
                         device=torch.cuda.get_device_name(device) + f", torch {torch.__version__}",
                         shape=f"B=1 H={heads} D={head_dim} block={block_size} r={rank} bf16 fwd+bwd, "
                               f"dense = best of {sorted(used)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsv bench dispatch", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the table (JSON)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072],
                        help="sequence lengths (tokens per sample)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0],
                        help="kept-block densities")
    parser.add_argument("--heads", type=int, default=16, help="attention heads")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE, help="the sparse kernel's block size")
    parser.add_argument("--rank", type=int, default=16, help="predictor rank")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per point")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise RuntimeError("dsv bench dispatch measures GPU kernels: run it on the training GPU")
    table = measure_dispatch_table(seq_lens=sorted(args.seq_lens), densities=sorted(args.densities),
                                   heads=args.heads, head_dim=args.head_dim, block_size=args.block_size,
                                   rank=args.rank, rep_ms=args.rep_ms)
    table.to_json(args.out)
    return 0
