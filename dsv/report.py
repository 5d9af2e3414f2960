"""`dsv report`: figures of a DSV run from its metrics.jsonl.

    dsv report runs/dsv_s0 --baseline runs/dense_s0

Writes into the run directory:
  sparsity_heatmap.png  per-(layer, head) attention sparsity (1 - key fraction covering tau) over training
  density.png           per-layer computed fraction of attention tiles, mass recall, and the stage switch
  loss_vs_dense.png     training and validation loss of the run, and of the dense baseline if given
"""
from __future__ import annotations

from pathlib import Path

from dsv.metrics import read_metrics
from torchkit.cli import Parser


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return ([s for s, _ in points], [v for _, v in points]) if points else ([], [])


def _stage_switch(records: list[dict]) -> int | None:
    return next((r["step"] for r in records if r.get("sparse/stage") == 2), None)


def sparsity_heatmap(records: list[dict], out: Path) -> Path:
    """Rows = (layer, head), columns = logged steps, colour = key sparsity."""
    import numpy as np

    rows = [r for r in records if "sparse/key_sparsity_per_head" in r]
    if not rows:
        raise ValueError("no sparsity profile in metrics.jsonl: was the run trained with --sparse dsv?")
    grid = np.array([r["sparse/key_sparsity_per_head"] for r in rows])  # (steps, L, H)
    steps, layers, heads = grid.shape
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.25 * layers * heads))
    image = ax.imshow(grid.reshape(steps, layers * heads).T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                      extent=(rows[0]["step"], rows[-1]["step"], layers * heads - 0.5, -0.5), interpolation="nearest")
    ax.set_yticks(range(0, layers * heads, heads), [f"layer {i}" for i in range(layers)])
    ax.set(xlabel="step", title=f"attention sparsity per layer x head ({heads} heads each): 1 - keys covering tau")
    fig.colorbar(image, ax=ax, label="sparsity")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def density_plot(records: list[dict], out: Path) -> Path:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    layers = sorted({k.rsplit("L", 1)[1] for r in records for k in r if k.startswith("sparse/density/L")}, key=int)
    for layer in layers:
        top.plot(*_series(records, f"sparse/density/L{layer}"), lw=1, label=f"layer {layer}")
        bottom.plot(*_series(records, f"sparse/recall/L{layer}"), lw=1, label=f"layer {layer}")
    switch = _stage_switch(records)
    for ax in (top, bottom):
        if switch is not None:
            ax.axvline(switch, color="k", ls="--", lw=0.8, label="stage 2")
        ax.grid(alpha=0.3)
    top.set(ylabel="computed fraction of tiles", ylim=(0, 1.05), title="density (1 = dense)")
    bottom.set(xlabel="step", ylabel="mass recall", ylim=(0, 1.05), title="mass recall of the selection")
    top.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def loss_plot(runs: dict[str, list[dict]], out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, records), colour in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        ax.plot(*_series(records, "loss"), lw=0.8, alpha=0.6, color=colour, label=f"{name} train")
        ax.plot(*_series(records, "val_loss"), "o-", ms=3, color=colour, label=f"{name} validation")
        switch = _stage_switch(records)
        if switch is not None:
            ax.axvline(switch, color=colour, ls="--", lw=0.8)
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="dense vs DSV (dashed: stage 2 starts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(run_dir: Path, baseline: Path | None = None) -> list[Path]:
    records = read_metrics(run_dir / "metrics.jsonl")
    runs = {run_dir.name: records}
    if baseline is not None:
        runs[baseline.name] = read_metrics(baseline / "metrics.jsonl")
    return [sparsity_heatmap(records, run_dir / "sparsity_heatmap.png"),
            density_plot(records, run_dir / "density.png"),
            loss_plot(runs, run_dir / "loss_vs_dense.png")]


def main(argv: list[str]) -> int:
    parser = Parser(prog="dsv report", description="Figures of a DSV run (see dsv/report.py).")
    parser.add_argument("run_dir", type=Path, help="runs/<name> of a --sparse dsv run")
    parser.add_argument("--baseline", type=Path, default=None, help="runs/<name> of the dense run to compare with")
    args = parser.parse_args(argv)
    for run in filter(None, (args.run_dir, args.baseline)):
        if not (run / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{run} is not a run directory (it has no metrics.jsonl)")
    for path in write_report(args.run_dir, args.baseline):
        print(path)
    return 0
