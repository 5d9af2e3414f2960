"""Block-sparse attention on one GPU: our Triton kernel vs FlexAttention (compiled) with the
same mask vs dense SDPA (cuDNN, flash), forward and forward+backward, plus the time to select
the blocks from rank-16 projections and the memory of the block indices.

    PYTHONPATH=. python3 benchmarks/attention.py --out benchmarks/results/attention_h100_<date>.md
    PYTHONPATH=. python3 benchmarks/attention.py --seq-lens 32768 65536 --head-dims 128 --densities 0.1 1
    PYTHONPATH=. python3 benchmarks/attention.py --seq-lens --head-dims 128 --block 64 --sweep 32768  # every config

FLOPs: forward 4 * B * H * S^2 * D * density, backward 2.5x that (five matmuls against two);
TFLOP/s are effective, i.e. on the computed blocks only. Memory is the peak allocated during
one forward+backward above what the inputs already hold.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from dsv.ops.block_index import random_block_index
from dsv.ops.block_select import select_blocks
from dsv.ops.sparse_attention import flex_kernel_options, kernels, sparse_attention_index

BATCH = 1
LOW_RANK = 16


def bench_ms(fn, rep_ms: float) -> float:
    return triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")


def measure(attend, q, k, v, do, rep_ms: float) -> dict:
    """Forward and forward+backward median ms, and the peak extra memory of one fwd+bwd."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        forward_ms = bench_ms(lambda: attend(q, k, v), rep_ms)
    train_ms = bench_ms(lambda: attend(*leaves).backward(do), rep_ms)
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    attend(*leaves).backward(do)
    torch.cuda.synchronize()
    return dict(fwd=forward_ms, train=train_ms, mem=(torch.cuda.max_memory_allocated() - base) / 2**20)


def dense(backend: SDPBackend):
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


def selection_ms(s: int, heads: int, density: float, block: int, rep_ms: float) -> float:
    """Time of select_blocks on random rank-16 projections, top-k = density * NKV."""
    q_lr, k_lr = (torch.randn(BATCH, heads, s, LOW_RANK, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    top_k = max(1, round(density * s / block))
    return bench_ms(lambda: select_blocks(q_lr, k_lr, block_size=block, top_k=top_k), rep_ms)


def check(head_dims, block: int) -> list[str]:
    """bf16 forward+backward against an fp32 gather reference at S = 4000 (masked tail)."""
    lines = []
    for d in head_dims:
        generator = torch.Generator(device="cuda").manual_seed(d)
        index = random_block_index(2, 4, 4000, block, 0.3, generator=generator, per_head_density=(0.05, 0.2, 0.5, 1.0))
        q, k, v, do = (torch.randn(2, 4, 4000, d, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(4))
        results = []
        for backend, dtype in (("triton", torch.bfloat16), ("reference", torch.float32)):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out = sparse_attention_index(*leaves, index, backend=backend)
            out.backward(do.to(dtype))
            results.append([out] + [t.grad for t in leaves])
        errors = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(*results)]
        lines.append(f"check D={d}: relative error out/dq/dk/dv " + " ".join(f"{e:.2e}" for e in errors))
        assert all(e < 1e-2 for e in errors), lines[-1]
    return lines


def index_memory(seq_lens, heads: int, block: int, density: float) -> list[str]:
    """Bytes of the compact lists (+ their transpose) against a BlockMask's (NQ, NKV) index."""
    lines = ["", f"Index memory per layer, H = {heads}, block {block}, density {density}:", "",
             "| S | compact lists + transposed | BlockMask (kv + q indices) |", "|---|---|---|"]
    for s in seq_lens:
        generator = torch.Generator(device="cuda").manual_seed(s)
        index = random_block_index(BATCH, heads, s, block, density, generator=generator)
        transposed = index.transpose()
        compact = index.nbytes() + sum(t.nbytes for t in (transposed.counts, transposed.offsets, transposed.q_blocks))
        mask = index.to_block_mask()
        wide = sum(t.nbytes for t in (mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices))
        lines.append(f"| {s // 1024}k | {compact / 2**20:.1f} MiB | {wide / 2**20:.1f} MiB |")
        del mask, index, transposed
        torch.cuda.empty_cache()
    return lines


def kernel_report() -> list[str]:
    """The compiler's report for every compiled variant of our kernels, and the autotuner's picks."""
    lines = ["", "| kernel | config | registers | spills | shared KiB | wgmma |", "|---|---|---|---|---|---|"]
    for tuner in (kernels._forward_kernel, kernels._dkdv_kernel, kernels._dq_kernel):
        for key, config in tuner.cache.items():
            lines.append(f"| {tuner.fn.__name__} best for {key} | {config} | | | | |")
        for kernel_cache, *_ in tuner.fn.device_caches.values():
            for compiled in kernel_cache.values():
                compiled._init_handles()  # registers and spills are read when the binary is loaded
                meta = compiled.metadata
                wgmma = "warp_group_dot" in compiled.asm.get("ttgir", "")
                lines.append(f"| {tuner.fn.__name__} | warps {meta.num_warps} stages {meta.num_stages} | "
                             f"{compiled.n_regs} | {compiled.n_spills} | {meta.shared / 1024:.0f} | {wgmma} |")
    return lines


def _stage_problem(s: int, d: int, heads: int, block: int, density: float):
    """Random inputs, index and the forward's outputs for timing the kernels one by one."""
    generator = torch.Generator(device="cuda").manual_seed(s)
    index = random_block_index(BATCH, heads, s, block, density, generator=generator)
    q, k, v, do = (torch.randn(BATCH, heads, s, d, device="cuda", generator=generator, dtype=torch.bfloat16)
                   for _ in range(4))
    scale = d**-0.5
    o, lse = kernels.forward(q, k, v, index, scale)
    delta = torch.empty_like(lse)
    kernels.launch_delta(o, do, delta)
    dense_flops = 4 * BATCH * heads * s * s * d * index.density()
    return dict(q=q, k=k, v=v, do=do, o=o, lse=lse, delta=delta, index=index, transposed=index.transpose(),
                scale=scale, matmul_flops=dense_flops / 2)


def _kernel_calls(p: dict, config=None) -> dict:
    """name -> (call, matmuls per tile) for our three main kernels, optionally with one config."""
    o, dq, dk, dv = (torch.empty_like(p["q"]) for _ in range(4))
    lse = torch.empty_like(p["lse"])
    qkv = (p["q"], p["k"], p["v"])
    return {
        "forward": (lambda c=config: kernels.launch_forward(*qkv, o, lse, p["index"], p["scale"], c), 2),
        "dK dV": (lambda c=config: kernels.launch_dkdv(*qkv, p["do"], p["lse"], p["delta"], dk, dv, p["index"],
                                                        p["transposed"], p["scale"], c), 4),
        "dQ": (lambda c=config: kernels.launch_dq(*qkv, p["do"], p["lse"], p["delta"], dq, p["index"], p["scale"], c), 3),
    }


def _gluon_calls(p: dict) -> dict:
    """name -> (call, matmuls) of the Gluon kernels, each at its default ring depth and at 2
    stages, or {} where they do not apply; the defaults are named "<kernel> (gluon)"."""
    from dsv.ops.sparse_attention import gluon_backward, gluon_forward

    block = p["index"].block_size
    if kernels.kernel_impl(p["q"], block) != "gluon":
        return {}
    o, lse, dq, dk, dv = (torch.empty_like(t) for t in (p["q"], p["lse"], p["q"], p["q"], p["q"]))
    qkv, grads_in = (p["q"], p["k"], p["v"]), (p["do"], p["lse"], p["delta"])
    kernels_and_depths = {
        "forward": (lambda st: gluon_forward.launch_forward(*qkv, o, lse, p["index"], p["scale"], st), 2,
                    gluon_forward.STAGES),
        "dK dV": (lambda st: gluon_backward.launch_dkdv(*qkv, *grads_in, dk, dv, p["index"], p["transposed"], p["scale"],
                                                        stages=st), 4, gluon_backward.DKDV_STAGES[block]),
        "dQ": (lambda st: gluon_backward.launch_dq(*qkv, *grads_in, dq, p["index"], p["scale"], stages=st), 3,
               gluon_backward.DQ_STAGES[block]),
    }
    calls = {}
    for kernel, (launch, matmuls, default) in kernels_and_depths.items():
        calls[f"{kernel} (gluon)"] = (lambda launch=launch, st=default: launch(st), matmuls)
        if default != 2:
            calls[f"{kernel} (gluon, 2 stages)"] = (lambda launch=launch: launch(2), matmuls)
    return calls


def stage_breakdown(s: int, d: int, heads: int, block: int, density: float, rep_ms: float) -> list[str]:
    """Milliseconds of each stage of our forward+backward, called one by one."""
    p = _stage_problem(s, d, heads, block, density)
    calls = _kernel_calls(p)
    stages = {
        "forward (triton)": calls["forward"],
        "transpose index": (p["index"].transpose, 0),
        "delta": (lambda: kernels.launch_delta(p["o"], p["do"], p["delta"]), 0),
        "dK dV (triton)": calls["dK dV"],
        "dQ (triton)": calls["dQ"],
        **{name: call for name, call in _gluon_calls(p).items() if "stages" not in name},
        "backward (all)": (lambda: kernels.backward(p["do"], p["q"], p["k"], p["v"], p["o"], p["lse"], p["index"],
                                                    p["scale"]), 5),
    }
    lines = ["", f"Stages at S = {s // 1024}k, D = {d}, density {density} (matmul TFLOP/s count the matmuls each does):",
             "", "| stage | ms | TFLOP/s |", "|---|---|---|"]
    for name, (fn, matmuls) in stages.items():
        ms = bench_ms(fn, rep_ms)
        rate = f"{matmuls * p['matmul_flops'] / ms / 1e9:.0f}" if matmuls else ""
        lines.append(f"| {name} | {ms:.3f} | {rate} |")
    return lines


def config_sweep(s: int, d: int, heads: int, block: int, density: float, rep_ms: float) -> list[str]:
    """Every autotune config of each kernel timed on its own (what the autotuner chooses from)."""
    p = _stage_problem(s, d, heads, block, density)
    tuners = {"forward": kernels._forward_kernel, "dK dV": kernels._dkdv_kernel, "dQ": kernels._dq_kernel}
    lines = ["", f"Every config at S = {s // 1024}k, D = {d}, density {density} (walked tile rows, warps, stages):",
             "", "| kernel | tile | warps | stages | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for name, tuner in tuners.items():
        for config in tuner.configs:
            if config.kwargs["TILE"] > block:
                continue
            call, matmuls = _kernel_calls(p, config)[name]
            try:
                ms = bench_ms(call, rep_ms)
                result = f"{ms:.3f} | {matmuls * p['matmul_flops'] / ms / 1e9:.0f}"
            except Exception as error:  # a config the compiler cannot fit (shared memory, registers)
                result = f"failed: {type(error).__name__} | "
            lines.append(f"| {name} | {config.kwargs['TILE']} | {config.num_warps} | {config.num_stages} | {result} |")
            print(lines[-1], flush=True)
    for name, (call, matmuls) in _gluon_calls(p).items():
        ms = bench_ms(call, rep_ms)
        lines.append(f"| {name} | | 2x4 + 1 | | {ms:.3f} | {matmuls * p['matmul_flops'] / ms / 1e9:.0f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="*", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time per measurement")
    parser.add_argument("--selection", action=argparse.BooleanOptionalAction, default=True, help="time select_blocks")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take minutes)")
    parser.add_argument("--index-memory", type=int, nargs="*", default=[131072, 524288], help="S for the index table")
    parser.add_argument("--breakdown", type=int, metavar="S", help="time each stage at this S, the first D, density 0.1")
    parser.add_argument("--sweep", type=int, nargs="*", metavar="S", help="time every kernel config at these S (first D)")
    parser.add_argument("--sweep-densities", type=float, nargs="+", default=[0.1], help="densities of --sweep")
    parser.add_argument("--kernel-report", action="store_true", help="print registers/spills/wgmma per compiled kernel")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()

    started = time.time()
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"B = {BATCH}, H = {args.heads}, bf16, block {args.block}", ""]
    lines += check(args.head_dims, args.block)
    lines += ["", "| S | D | density | kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak MiB | selection ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    flex = torch.compile(flex_attention)
    for d in args.head_dims:
        for s in args.seq_lens:
            generator = torch.Generator(device="cuda").manual_seed(s + d)
            q, k, v, do = (torch.randn(BATCH, args.heads, s, d, device="cuda", generator=generator, dtype=torch.bfloat16)
                           for _ in range(4))
            dense_flops = 4 * BATCH * args.heads * s * s * d

            def row(density, name, r, flops, select=""):
                lines.append(f"| {s // 1024}k | {d} | {density:g} | {name} | {r['fwd']:.2f} | {r['train']:.2f} | "
                             f"{flops / r['fwd'] / 1e9:.0f} | {3.5 * flops / r['train'] / 1e9:.0f} | {r['mem']:.0f} | {select} |")
                print(lines[-1], flush=True)

            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                row(1.0, f"dense {backend.name.split('_')[0].lower()}", measure(dense(backend), q, k, v, do, args.rep_ms), dense_flops)
            for density in args.densities:
                index = random_block_index(BATCH, args.heads, s, args.block, density, generator=generator)
                flops = dense_flops * index.density()
                select = f"{selection_ms(s, args.heads, density, args.block, args.rep_ms):.2f}" if args.selection else ""
                ours = measure(lambda q, k, v: sparse_attention_index(q, k, v, index, check_lists=False), q, k, v, do,
                               args.rep_ms)  # as in training: no host sync
                row(density, f"ours ({kernels.kernel_impl(q, args.block)})", ours, flops, select)
                if not args.no_flex:
                    mask = index.to_block_mask()
                    row(density, "flex (compiled)", measure(lambda q, k, v: flex(q, k, v, block_mask=mask, kernel_options=flex_kernel_options(mask)), q, k, v, do, args.rep_ms), flops)
            del q, k, v, do
            torch.cuda.empty_cache()
    if args.breakdown:
        lines += stage_breakdown(args.breakdown, args.head_dims[0], args.heads, args.block, 0.1, args.rep_ms)
    for s in args.sweep or []:
        for density in args.sweep_densities:
            lines += config_sweep(s, args.head_dims[0], args.heads, args.block, density, args.rep_ms)
    if args.kernel_report:
        lines += kernel_report()
    if args.index_memory:
        lines += index_memory(args.index_memory, args.heads, args.block, 0.1)
    lines += ["", f"Run took {time.time() - started:.0f} s."]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
