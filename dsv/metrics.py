"""What a run records: metrics.jsonl, TensorBoard events, a loss-curve PNG, and MFU."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    """Datasheet bf16 peak of the device, or None (CPU, unknown GPU): then no MFU is logged."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsLogger:
    """One JSON object per logged step in metrics.jsonl, mirrored to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so the file stays one run. A half-written
        last line (what kill -9 during a write leaves) is dropped with a warning."""
        lines = [line for line in self.path.read_text().splitlines() if line]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append((json.loads(line)["step"], line))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if number < len(lines):
                    raise ValueError(f"{self.path} line {number} is not a metrics record ({e}); "
                                     "repair or remove that line, then resume") from e
                warnings.warn(f"{self.path}: dropped its half-written last line {line[:40]!r}...", stacklevel=3)
        self.path.write_text("".join(line + "\n" for logged, line in records if logged <= step))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_loss_curve(metrics_path: Path, out_png: Path, label: str | None = None) -> Path | None:
    """Training loss (and validation loss where logged) against step; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title=label or metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
