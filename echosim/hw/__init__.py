"""Hardware descriptions: GPU profiles (kernel times) and clusters (links, NCCL protocols).

Both are JSON files named after the hardware. Shipped ones live beside this module
(`h100.json`, `h200.json`, `dgx_h100.json`, `dgx_h200.json`); a user passes a path to
describe their own. `"measured": false` marks numbers seeded from datasheets and NCCL's
defaults; `echosim calibrate` replaces them with measured ones.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

HW_DIR = Path(__file__).parent


@dataclass(kw_only=True)
class GpuProfile:
    """What one GPU computes how fast: roofline peaks, efficiencies, measured kernel times."""

    name: str
    measured: bool
    peak_tflops: dict[str, float]  # dtype -> dense peak (tensor cores where torch uses them)
    hbm_GBps: float  # memory bandwidth
    efficiency: dict[str, float]  # op class (gemm, attention, memory) -> fraction of the roofline
    launch_us: float  # fixed cost added to every modelled kernel
    memory_GB: float = 0.0  # device memory (GB = 1e9 bytes); 0: unknown, nothing is flagged out of memory
    kernels: dict[str, float] = field(default_factory=dict)  # kernel-time database: key -> microseconds
    host_us_per_op: float = 0.0  # the host's time to issue one traced op in eager PyTorch, for traces
    # without a measured host (echosim.engine.host_measured); measured from full-speed steps
    notes: str = ""


@dataclass(kw_only=True)
class Protocol:
    """One NCCL protocol's costs (LL, LL128, Simple)."""

    base_us: float  # launch and setup per collective
    nvlink_step_us: float  # per algorithm step inside a node
    net_step_us: float  # per algorithm step that crosses the network
    bw_fraction: float  # share of the link bandwidth the protocol delivers


@dataclass(kw_only=True)
class Cluster:
    """The machines and links a job runs on."""

    name: str
    gpu: str  # GPU profile name or path
    gpus_per_node: int
    nvlink_GBps: float  # per GPU, one direction, as NCCL achieves it (bus bandwidth)
    nic_Gbps: float  # per GPU network line rate
    protocols: dict[str, Protocol]
    collective_bw: dict[str, float] = field(default_factory=dict)  # "all_gather@4" -> bandwidth multiplier
    tables: dict[str, list[list[float]]] = field(default_factory=dict)  # "all_gather@4" -> [[bytes, us], ...]
    collective_host_us: float = 0.0  # host time a real collective call takes beyond a fake one (calibrate_host)
    measured: bool = False
    notes: str = ""


def _read(name_or_path: str | Path, kind: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if not path.is_file():
        path = HW_DIR / f"{name_or_path}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in HW_DIR.glob("*.json"))
        raise FileNotFoundError(f"no {kind} {name_or_path!r}: not a file, and not one of the shipped {shipped}")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON: {err}") from None


def _build(cls, data: dict, source: str):
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    unknown, missing = set(data) - names, {n for n in required if n not in data}
    if unknown or missing:
        raise ValueError(f"{source}: {cls.__name__} has unknown fields {sorted(unknown)} / "
                         f"missing fields {sorted(missing)}")
    return cls(**data)


def load_gpu(name_or_path: str | Path) -> GpuProfile:
    """A shipped profile by name ("h100") or a JSON file."""
    data, source = _read(name_or_path, "GPU profile")
    return _build(GpuProfile, data, source)


def load_cluster(name_or_path: str | Path) -> Cluster:
    """A shipped cluster by name ("dgx_h100") or a JSON file."""
    data, source = _read(name_or_path, "cluster")
    data["protocols"] = {k: _build(Protocol, v, f"{source} protocol {k}") for k, v in data.get("protocols", {}).items()}
    return _build(Cluster, data, source)
