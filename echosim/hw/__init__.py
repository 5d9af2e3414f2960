"""Hardware descriptions: GPU profiles (kernel times) and clusters (links, NCCL protocols).

Both are JSON files named after the hardware. A name ("dgx_h200") is looked up first in the
user's folder, where `echosim calibrate` writes (`$XDG_CONFIG_HOME/echosim`, else
`~/.config/echosim`), then among the shipped files beside this module; a path describes one's
own hardware. Shipped: the measured `h200.json` and `dgx_h200.json`, and datasheet seeds
`a100_80gb` / `dgx_a100`, `h100` / `dgx_h100`, `h200_datasheet` / `dgx_h200_datasheet`,
`b200` / `dgx_b200` (GPU / its 8-GPU node). A
cluster's `gpu` is a profile name, looked up the same way, or a path, relative to the
cluster file's folder. Every field is checked on load (echosim.hw.schema). `"measured":
false` marks numbers seeded from datasheets and NCCL's defaults; `echosim calibrate`
replaces them with measured ones. `sources` says where each number (or section, such as
`efficiency` or `network`) comes from: a datasheet, a measurement, another profile.

A cluster is nodes of `gpus_per_node` GPUs on NVLink (`nvlink_GBps` per GPU), each with
`nics_per_node` NICs of `nic_Gbps`, under a two-tier network: `network.leaf_nodes` nodes per
leaf switch, whose uplinks to the spine carry 1 / `network.oversubscription` of what its nodes
can send (echosim.comm: a collective over nodes of more than one leaf gets that share).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from echosim.hw.schema import (AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, FieldError, build, check,
                               read_json)

HW_DIR = Path(__file__).parent
DEFAULT_CLUSTER = "dgx_h200"  # the cluster every echosim command uses without --cluster (measured)
ROOFLINE_CLASSES = ("gemm", "attention", "memory")  # the efficiencies echosim.kernels asks for
HOST_KINDS = ("kernel", "gemm", "attention", "foreach", "foreach_tensor", "dispatch")  # echosim.host_cost


def user_hw_dir() -> Path:
    """Where `echosim calibrate` writes by default, searched before the shipped files."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "echosim"


def locate(name_or_path: str | Path, kind: str) -> Path:
    """The file of a name or path: an existing file as given, else `<name>.json` in the user's
    folder, else among the shipped files."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in (user_hw_dir(), HW_DIR):
        if (folder / f"{name_or_path}.json").is_file():
            return folder / f"{name_or_path}.json"
    shipped = sorted(p.stem for p in HW_DIR.glob("*.json"))
    raise FileNotFoundError(f"no {kind} {str(name_or_path)!r}: not a file, not in {user_hw_dir()}, "
                            f"and not one of the shipped {shipped}")


def origin(path: Path) -> str:
    """Where a located file comes from, for the output: shipped, calibrated here, or the user's file."""
    folder = path.resolve().parent
    if folder == HW_DIR.resolve():
        return "shipped"
    if folder == user_hw_dir().resolve():
        return "calibrated, user folder"
    return "file"


@dataclass(kw_only=True)
class GpuProfile:
    """What one GPU computes how fast: roofline peaks, efficiencies, measured kernel times."""

    name: str
    measured: bool
    peak_tflops: dict[str, float] = field(metadata=POSITIVE)  # dtype -> dense peak (tensor cores where torch uses them)
    hbm_GBps: float = field(metadata=POSITIVE)  # memory bandwidth
    efficiency: dict[str, float] = field(metadata=FRACTION)  # op class (gemm, ...) -> fraction of the roofline
    launch_us: float = field(metadata=NON_NEGATIVE)  # fixed cost added to every modelled kernel
    # device memory (GB = 1e9 bytes); 0: unknown, nothing is flagged out of memory
    memory_GB: float = field(default=0.0, metadata=NON_NEGATIVE)
    kernels: dict[str, float] = field(default_factory=dict, metadata=NON_NEGATIVE)  # kernel database: key -> us
    # the host's dispatch and launch cost per op kind (echosim.host_cost.HOST_KINDS), for traces
    # without a measured host; measured by `echosim calibrate --host-ops`; empty: unknown (0)
    host_launch_us: dict[str, float] = field(default_factory=dict, metadata=NON_NEGATIVE)
    sources: dict[str, str] = field(default_factory=dict)  # field -> where its numbers come from
    notes: str = ""

    def __post_init__(self):
        check(self)
        _check_sources(self)
        missing = [c for c in ROOFLINE_CLASSES if c not in self.efficiency]
        if missing:
            raise FieldError("GpuProfile", "efficiency", f"must give every op class {list(ROOFLINE_CLASSES)}, "
                                                         f"lacks {missing}")
        if "float32" not in self.peak_tflops:
            raise FieldError("GpuProfile", "peak_tflops", "must give float32 (the peak of dtypes not listed)")
        unknown = sorted(set(self.host_launch_us) - set(HOST_KINDS))
        if unknown:
            raise FieldError("GpuProfile", "host_launch_us", f"has unknown kinds {unknown} (kinds: {list(HOST_KINDS)})")


@dataclass(kw_only=True)
class Protocol:
    """One NCCL protocol's costs (LL, LL128, Simple)."""

    base_us: float = field(metadata=NON_NEGATIVE)  # launch and setup per collective
    nvlink_step_us: float = field(metadata=NON_NEGATIVE)  # per algorithm step inside a node
    net_step_us: float = field(metadata=NON_NEGATIVE)  # per algorithm step that crosses the network
    bw_fraction: float = field(metadata=FRACTION)  # share of the link bandwidth the protocol delivers

    def __post_init__(self):
        check(self)


@dataclass(kw_only=True)
class Network:
    """The fabric between nodes: leaf switches under a spine."""

    leaf_nodes: int = field(default=0, metadata=NON_NEGATIVE)  # nodes under one leaf switch; 0: one flat tier
    # what a leaf's nodes can send over what its uplinks carry (1: non-blocking, 2: 2:1 ...)
    oversubscription: float = field(default=1.0, metadata=AT_LEAST_ONE)

    def __post_init__(self):
        check(self)


@dataclass(kw_only=True)
class Cluster:
    """The machines and links a job runs on."""

    name: str
    gpu: str  # GPU profile name or path
    gpus_per_node: int = field(metadata=AT_LEAST_ONE)
    nvlink_GBps: float = field(metadata=POSITIVE)  # per GPU, one direction, as NCCL achieves it (bus bandwidth)
    nic_Gbps: float = field(metadata=POSITIVE)  # line rate of one NIC
    nics_per_node: int = field(default=0, metadata=NON_NEGATIVE)  # 0: one NIC per GPU
    network: Network = field(default_factory=Network)
    protocols: dict[str, Protocol]
    collective_bw: dict[str, float] = field(default_factory=dict, metadata=POSITIVE)  # "all_gather@4" -> multiplier
    # "all_gather@4" -> [[bytes, us], ...] measured inside a node, interpolated in log-log
    tables: dict[str, list[list[float]]] = field(default_factory=dict, metadata=POSITIVE)
    # host time a real collective call takes beyond a fake one (calibrate_host)
    collective_host_us: float = field(default=0.0, metadata=NON_NEGATIVE)
    measured: bool = False
    sources: dict[str, str] = field(default_factory=dict)  # field -> where its numbers come from
    notes: str = ""

    def __post_init__(self):
        check(self)
        _check_sources(self)
        if not self.protocols:
            raise FieldError("Cluster", "protocols", "must name at least one NCCL protocol (e.g. Simple)")
        for what, keys in (("collective_bw", self.collective_bw), ("tables", self.tables)):
            for key in keys:
                name, _, size = key.partition("@")
                if not name or not size.isdigit() or int(size) < 2:
                    raise FieldError("Cluster", f"{what}.{key}", "must be keyed <collective>@<GPUs>, e.g. all_gather@4")
        for key, table in self.tables.items():
            if not table or any(len(row) != 2 for row in table):
                raise FieldError("Cluster", f"tables.{key}", "must hold [bytes, us] rows")
            if any(a[0] >= b[0] for a, b in zip(table, table[1:])):
                raise FieldError("Cluster", f"tables.{key}", "must list sizes in increasing order")


    @property
    def net_GBps(self) -> float:
        """Network bandwidth per GPU, one direction (GB/s): the node's NICs shared by its GPUs."""
        nics = self.nics_per_node or self.gpus_per_node
        return nics * self.nic_Gbps / 8 / self.gpus_per_node


def _check_sources(profile) -> None:
    """Every key of `profile.sources` names one of its fields."""
    names = [f.name for f in fields(profile) if f.name not in ("sources", "notes")]
    for key in profile.sources:
        if key not in names:
            raise FieldError(type(profile).__name__, f"sources.{key}", f"names no field (one of {names})")


def load_gpu(name_or_path: str | Path) -> GpuProfile:
    """A profile by name ("h200": the user's calibration, else the shipped file) or a JSON file."""
    path = locate(name_or_path, "GPU profile")
    return build(GpuProfile, read_json(path), source=str(path))


def load_cluster(name_or_path: str | Path) -> Cluster:
    """A cluster by name ("dgx_h200": the user's calibration, else the shipped file) or a JSON file.
    A relative path in its `gpu` field is taken from the cluster file's folder."""
    path = locate(name_or_path, "cluster")
    data = read_json(path)
    gpu = data.get("gpu") if isinstance(data, dict) else None
    if isinstance(gpu, str) and _is_path(gpu):
        data["gpu"] = str(path.parent / gpu)
    cluster = build(Cluster, data, source=str(path))
    try:
        locate(cluster.gpu, "GPU profile")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: gpu: {err}") from None
    return cluster


def _is_path(gpu: str) -> bool:
    """A path ("../gpus/a100.json"), not a profile name ("h200")."""
    return gpu.endswith(".json") or "/" in gpu or os.sep in gpu
