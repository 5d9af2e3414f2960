"""What `dsv probe` writes: probe.json (every number), probe.md (tables), probe.png (figure), a summary.

A layer's density at a (t, tau, g) is the mean of its heads' unit fractions (the fraction of
(query block, KV unit) tiles a kernel would compute); the summary gives the median layer of that.
The per-layer tables give the median [min, max] over heads.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from dsv.probe.run import ProbeResult

AXES = {"key": ["t", "layer", "head", "tau"], "units": ["t", "layer", "head", "tau", "granularity"],
        "recall": ["t", "layer", "head", "tau", "granularity"]}


def write_json(result: ProbeResult, path: Path) -> Path:
    numbers = {"key_fraction": result.key.tolist(), "unit_fraction": result.units.tolist(),
               "recall": None if result.recall is None else result.recall.tolist()}
    path.write_text(json.dumps({**result.meta, "axes": AXES, **numbers}, indent=1) + "\n")
    return path


def median_layer(values: Tensor) -> Tensor:
    """(t, L, H, ...) -> (t, ...): the median over layers of the mean over heads."""
    return values.mean(2).median(1).values


def _spread(per_head: Tensor) -> str:
    """(H,) -> 'median [min, max]'."""
    return f"{per_head.median().item():.3f} [{per_head.min().item():.3f}, {per_head.max().item():.3f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]]


def summary_rows(result: ProbeResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows (t, tau) of the median layer's key fraction, unit fraction per g and recall per g."""
    m = result.meta
    header = ["t", "tau", "key"] + [f"g={g}" for g in m["granularity"]]
    if result.recall is not None:
        header += [f"recall g={g}" for g in m["granularity"]]
    key, units = median_layer(result.key), median_layer(result.units)  # (t, tau), (t, tau, g)
    recall = None if result.recall is None else median_layer(result.recall)
    rows = []
    for i, t in enumerate(m["t"]):
        for j, tau in enumerate(m["tau"]):
            cells = [f"{t:g}", f"{tau:g}", f"{key[i, j]:.3f}"] + [f"{x:.3f}" for x in units[i, j].tolist()]
            if recall is not None:
                cells += [f"{x:.3f}" for x in recall[i, j].tolist()]
            rows.append(cells)
    return header, rows


def summary_text(result: ProbeResult) -> str:
    """The summary as a fixed-width table for the terminal."""
    header, rows = summary_rows(result)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows]]
    m = result.meta
    title = (f"step {m['step']}, {m['tokens']} tokens, query block {m['query_block']}: fraction of keys (key, "
             "per query token) and of g-token KV units (per query block) covering tau; "
             "median layer of the mean over heads")
    return "\n".join([title, *lines])


def _per_layer(values: Tensor, taus: list[float]) -> list[list[str]]:
    """values (L, H, tau, columns) -> rows (layer, tau, median [min, max] over heads per column)."""
    return [[str(layer), f"{tau:g}", *(_spread(values[layer, :, j, c]) for c in range(values.shape[-1]))]
            for layer in range(values.shape[0]) for j, tau in enumerate(taus)]


def write_markdown(result: ProbeResult, path: Path) -> Path:
    m = result.meta
    units = [f"g={g}" for g in m["granularity"]]
    recall = (f"*recall*: the true mass on the predictor's top units at the oracle's count, over the oracle's mass "
              f"(predictor mass: {m['predictor_mass']})." if m["predictor"] else "No DSV predictors in the checkpoint.")
    lines = [f"# Attention sparsity of `{m['checkpoint']}` (step {m['step']})", "",
             f"{m['batch']} held-out clips of {m['tokens']} tokens (grid {m['grid']}, cube {m['cube']}), "
             f"{m['weights']} weights, {m['precision']}, noise seed {m['seed']}. Fractions needed to cover tau of the "
             f"attention mass: *key* per query token; *g=N* of N-token KV units per query block of "
             f"{m['query_block']} tokens (block sparsity; a partial last unit counts as one). {recall}",
             "", "## Summary: median layer of the mean over heads (a layer's density)", "",
             *_table(*summary_rows(result))]
    for i, t in enumerate(m["t"]):
        fractions = torch.cat([result.key[i, ..., None], result.units[i]], -1)  # (L, H, tau, 1 + g)
        lines += ["", f"## t = {t:g}: fraction needed, median [min, max] over heads", "",
                  *_table(["layer", "tau", "key", *units], _per_layer(fractions, m["tau"]))]
        if result.recall is not None:
            lines += ["", f"## t = {t:g}: predictor recall, median [min, max] over heads", "",
                      *_table(["layer", "tau", *units], _per_layer(result.recall[i], m["tau"]))]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_figure(result: ProbeResult, path: Path) -> Path:
    """One panel per layer: the fraction needed (mean over heads) at each unit size, one line per t at
    the middle tau, shaded between the lowest and highest tau; a hollow marker at "key" is the key fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result.meta
    layers, grains, taus = m["layers"], m["granularity"], m["tau"]
    order = sorted(range(len(taus)), key=lambda j: taus[j])
    low, mid, high = order[0], order[len(order) // 2], order[-1]
    units, key = result.units.mean(2), result.key.mean(2)  # mean over heads: (t, L, tau, g), (t, L, tau)
    cols = min(layers, 4)
    rows = -(-layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    x = list(range(1, len(grains) + 1))
    colours = plt.get_cmap("viridis")(torch.linspace(0.0, 0.85, len(m["t"])).tolist())
    for layer, ax in enumerate(axes.flat):
        if layer >= layers:
            ax.axis("off")
            continue
        for i, (t, colour) in enumerate(zip(m["t"], colours)):
            ax.plot(x, units[i, layer, mid], "o-", ms=3, color=colour, label=f"t = {t:g}")
            if len(taus) > 1:
                ax.fill_between(x, units[i, layer, low], units[i, layer, high], color=colour, alpha=0.15, lw=0)
            ax.plot([0], [key[i, layer, mid]], "o", mfc="none", color=colour)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([0, *x], ["key", *map(str, grains)], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for col in range(cols):  # the lowest panel of each column (the last row may be short) names the x axis
        lowest = axes[len(range(col, layers, cols)) - 1, col]
        lowest.tick_params(labelbottom=True)
        lowest.set_xlabel(f"KV unit (tokens), per {m['query_block']}-token query block", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"fraction covering tau={taus[mid]:g}", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    band = f"; band: tau {taus[low]:g}-{taus[high]:g}" if len(taus) > 1 else ""
    fig.suptitle(f"step {m['step']}, {m['tokens']} tokens: fraction of KV units needed, mean over heads{band}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
