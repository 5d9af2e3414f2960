"""Block selection on the GPU: kernel correctness, selection accuracy (mass recall) and speed.

    PYTHONPATH=. python3 benchmarks/block_select.py --out $OUT

1. correctness: Triton block mass (bf16, fp32 inputs) against the fp64 PyTorch path, and
   the sort-free selection kernel against the sorting path, at an odd S.
2. accuracy: mass recall (exact q, k) of the blocks chosen from a low-rank predictor's
   q~, k~, for both estimate modes, against the oracle (exact block mass of the real q, k).
   q, k come from a synthetic clustered video (blocks of one cluster attend to each
   other), the predictor is the ideal rank-16 projection plus noise.
3. speed: estimate + top-p selection at S = 16k..128k, H = 16, r = 16, bf16, against the
   FlexAttention 10%-density forward+backward time of DESIGN.md (the 10% budget).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from triton.testing import do_bench

from dsv.ops.block_select import estimate_block_mass, mass_recall, select_blocks, select_from_mass

HEADS, RANK, HEAD_DIM = 16, 16, 128
# Flex block-sparse fwd+bwd at 10% of blocks, H100, H=16, D=128 (DESIGN.md); 128k = 4 x 64k
FLEX_10PCT_MS = {16384: 2.28, 32768: 8.47, 65536: 32.3, 131072: 4 * 32.3}


def log(lines: list[str], line: str) -> None:
    print(line, flush=True)
    lines.append(line)


def synthetic_qk(s: int, block: int, *, clusters: int = 16, predictor_noise: float = 0.3, seed: int = 0):
    """Real q, k (1, H, S, 128) and low-rank q~, k~ (1, H, S, 16) of a clustered video.

    Every block of tokens belongs to one of `clusters` random clusters (so critical blocks
    are not local); token latents z (rank 16) are the cluster centre plus noise, with a
    per-head temperature; q = z A + noise, k = z A + noise. The predictor maps back to the
    latent space (the ideal rank-16 projection) and adds relative noise.
    """
    g = torch.Generator(device="cuda").manual_seed(seed)
    h, r, d = HEADS, RANK, HEAD_DIM
    n = math.ceil(s / block)
    temp = torch.linspace(1.0, 2.5, h, device="cuda").view(1, h, 1, 1)
    cluster = torch.randint(clusters, (1, h, n), generator=g, device="cuda").repeat_interleave(block, -1)[..., :s]
    centers = torch.randn(1, h, clusters, r, generator=g, device="cuda") * temp
    z = centers.gather(2, cluster[..., None].expand(-1, -1, -1, r)) + 0.5 * torch.randn(1, h, s, r, generator=g, device="cuda")
    a = torch.randn(h, r, d, generator=g, device="cuda") / math.sqrt(r)
    q = z @ a + 0.3 * torch.randn(1, h, s, d, generator=g, device="cuda")
    k = (z + 0.3 * torch.randn(1, h, s, r, generator=g, device="cuda")) @ a + 0.3 * torch.randn(1, h, s, d, generator=g, device="cuda")
    back = torch.linalg.pinv(a)  # (H, D, R)
    c = (r**0.5 / d**0.5) ** 0.5  # q~ k~^T / sqrt(r) ~ q k^T / sqrt(d)
    q_lr = q @ back * c
    k_lr = k @ back @ (a @ a.transpose(-1, -2)).transpose(-1, -2) * c
    q_lr = q_lr + predictor_noise * q_lr.std() * torch.randn(q_lr.shape, generator=g, device="cuda")
    k_lr = k_lr + predictor_noise * k_lr.std() * torch.randn(k_lr.shape, generator=g, device="cuda")
    return q.bfloat16(), k.bfloat16(), q_lr.bfloat16(), k_lr.bfloat16()


def check_correctness(lines: list[str]) -> None:
    log(lines, "## correctness (S=3001, B=2, H=4, r=16): max |err|, ||err||/||ref||, selection agreement")
    g = torch.Generator(device="cuda").manual_seed(1)
    for block in (64, 128):
        for dtype in (torch.bfloat16, torch.float32):
            q, k = (torch.randn(2, 4, 3001, RANK, generator=g, device="cuda").to(dtype) for _ in range(2))
            for mode in ("exact", "fast"):
                mass = estimate_block_mass(q, k, block_size=block, mode=mode)
                ref = estimate_block_mass(q.double(), k.double(), block_size=block, mode=mode, use_triton=False)
                err = (mass.double() - ref).abs()
                sort = select_from_mass(ref.float(), block_size=block, seq_len=3001, top_p=0.9, use_triton=False)
                kern = select_from_mass(ref.float(), block_size=block, seq_len=3001, top_p=0.9, use_triton=True)
                same = (sort.to_dense() == kern.to_dense()).all(-1).float().mean().item()
                log(lines, f"block={block} {str(dtype)[6:]:9s} {mode:5s} max={err.max().item():.2e} "
                           f"rel={(err.norm() / ref.norm()).item():.2e} rows_sum_to_1={mass.sum(-1).sub(1).abs().max().item():.1e} "
                           f"select_rows_equal={same:.4f}")


def check_accuracy(lines: list[str]) -> None:
    log(lines, "## accuracy: mean mass recall over heads (sampled rows), density = kept blocks / all")
    for s, block, rows in ((16384, 64, 2048), (16384, 128, 2048), (65536, 64, 1024)):
        q, k, q_lr, k_lr = synthetic_qk(s, block)
        n = math.ceil(s / block)
        masses = {
            "oracle": estimate_block_mass(q, k, block_size=block, mode="exact", scale=HEAD_DIM**-0.5),
            "exact": estimate_block_mass(q_lr, k_lr, block_size=block, mode="exact"),
            "fast": estimate_block_mass(q_lr, k_lr, block_size=block, mode="fast"),
        }
        for name, mass in masses.items():
            recall = {}
            for rule_name, rule in (("top10%", dict(top_k=max(1, n // 10))), ("top-p.9", dict(top_p=0.9))):
                index = select_from_mass(mass, block_size=block, seq_len=s, **rule)
                gen = torch.Generator().manual_seed(0)
                value = mass_recall(q, k, index, sample_rows=rows, generator=gen).mean().item()
                recall[rule_name] = (value, index.density())
            log(lines, f"S={s} block={block} {name:6s} recall@top10%={recall['top10%'][0]:.4f} "
                       f"recall@top-p.9={recall['top-p.9'][0]:.4f} density@top-p.9={recall['top-p.9'][1]:.4f}")
        del q, k, q_lr, k_lr, masses


def time_speed(lines: list[str]) -> list[str]:
    table = ["| S | block | mode | mass ms | select ms (kernel) | select ms (sort) | total ms | Flex 10% fwd+bwd ms | total / Flex |",
             "|---|---|---|---|---|---|---|---|---|"]
    g = torch.Generator(device="cuda").manual_seed(2)
    for s in (16384, 32768, 65536, 131072):
        q, k = (torch.randn(1, HEADS, s, RANK, generator=g, device="cuda").bfloat16() for _ in range(2))
        for block in (64, 128):
            for mode in ("fast", "exact"):
                mass = estimate_block_mass(q, k, block_size=block, mode=mode)
                t_mass = do_bench(lambda: estimate_block_mass(q, k, block_size=block, mode=mode), warmup=25, rep=100, return_mode="median")
                t_sel = do_bench(lambda: select_from_mass(mass, block_size=block, seq_len=s, top_p=0.9), warmup=25, rep=100, return_mode="median")
                t_sort = do_bench(lambda: select_from_mass(mass, block_size=block, seq_len=s, top_p=0.9, use_triton=False), warmup=25, rep=100, return_mode="median")
                t_total = do_bench(lambda: select_blocks(q, k, block_size=block, top_p=0.9, mode=mode), warmup=25, rep=100, return_mode="median")
                flex = FLEX_10PCT_MS[s]
                row = f"| {s // 1024}k | {block} | {mode} | {t_mass:.3f} | {t_sel:.3f} | {t_sort:.3f} | {t_total:.3f} | {flex:.1f} | {t_total / flex:.3f} |"
                log(lines, row)
                table.append(row)
                del mass
        del q, k
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for block_select.log and block_select_table.md")
    parser.add_argument("--skip-accuracy", action="store_true", help="only correctness and speed")
    args = parser.parse_args()
    lines: list[str] = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    check_correctness(lines)
    if not args.skip_accuracy:
        check_accuracy(lines)
    table = time_speed(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block_select.log").write_text("\n".join(lines) + "\n")
    (args.out / "block_select_table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
