"""The import layering of torchkit, echosim and dsv, read from every .py file's imports (ast).

LAYERS below is the architecture: which modules form each layer, and which layers each may
import (a layer may always import itself). torchkit is at the bottom; echosim knows nothing of
dsv; echosim's cost layer, with the hardware profiles, sits below the engine, so a planner can
price collectives without the event loop; dsv uses echosim's public layers, not the engine.
"""
import ast
import fnmatch
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torchkit", "echosim", "dsv")

# layer -> (its modules, as fnmatch patterns of dotted names; the layers it may import)
LAYERS = {
    "torchkit": (["torchkit", "torchkit.*"], []),
    "echosim trace format": (["echosim.graph"], ["torchkit"]),
    "echosim cost layer": (["echosim.costs", "echosim.comm", "echosim.kernels", "echosim.overlap", "echosim.host_cost",
                            "echosim.hw", "echosim.hw.*"],
                           ["torchkit", "echosim trace format"]),
    "echosim engine": (["echosim.engine"], ["torchkit", "echosim trace format", "echosim cost layer"]),
    "echosim simulator": (["echosim.simulator", "echosim.report"],
                          ["torchkit", "echosim trace format", "echosim cost layer", "echosim engine"]),
    "echosim tracing": (["echosim.trace", "echosim.trace.*"],  # fitting a trace replays it on the engine
                        ["torchkit", "echosim trace format", "echosim cost layer", "echosim engine"]),
    "echosim workloads": (["echosim.pipeline", "echosim.gpt3d", "echosim.memory", "echosim.gpt_run",
                           "echosim.gpt_stage", "echosim.gpt_data_parallel", "echosim.gpt_step_trace"],
                          ["torchkit", "echosim trace format", "echosim cost layer", "echosim engine",
                           "echosim tracing"]),
    "echosim commands": (["echosim", "echosim.__main__", "echosim.cli", "echosim.sweep", "echosim.validate",
                          "echosim.validate_gpt"],
                         ["torchkit", "echosim trace format", "echosim cost layer", "echosim engine",
                          "echosim simulator", "echosim tracing", "echosim workloads"]),
    "dsv": (["dsv", "dsv.*"], ["torchkit", "echosim trace format", "echosim cost layer", "echosim simulator",
                               "echosim tracing", "echosim workloads"]),
}

# Imports allowed to break the layering, file -> the layers it may import besides its own: none.
KNOWN_EXCEPTIONS: dict[str, set[str]] = {}


def layer_of(module: str) -> str | None:
    return next((name for name, (patterns, _) in LAYERS.items()
                 if any(fnmatch.fnmatchcase(module, p) for p in patterns)), None)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports (anywhere in it, function bodies included)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, `level - 1` packages up
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def source_imports() -> dict[str, set[str]]:
    """file (relative to the repository) -> the project modules it imports."""
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    known = {module_name(p) for p in files}
    return {str(p.relative_to(ROOT)): imported_modules(p, known) for p in files}


def violations(imports: dict[str, set[str]], exceptions: dict[str, set[str]]) -> list[str]:
    """One line per module outside every layer and per import its layer may not make."""
    out = []
    for path, modules in imports.items():
        source = module_name(ROOT / path)
        layer = layer_of(source)
        if layer is None:
            out.append(f"{path}: {source} is in no layer of LAYERS; add it to the layer it belongs to")
            continue
        allowed = {layer, *LAYERS[layer][1], *exceptions.get(path, ())}
        for target in sorted(modules):
            target_layer = layer_of(target)
            if target_layer not in allowed:
                out.append(f"{path} ({layer}) imports {target} ({target_layer or 'in no layer'})")
    return out


def test_every_import_follows_the_layers():
    assert violations(source_imports(), KNOWN_EXCEPTIONS) == []


def test_known_exceptions_are_still_needed():
    imports = source_imports()
    stale = [path for path, extra in KNOWN_EXCEPTIONS.items()
             if path not in imports or not {layer_of(m) for m in imports[path]} & extra]
    assert stale == [], f"remove from KNOWN_EXCEPTIONS, they no longer break the layering: {stale}"


def test_the_check_catches_each_kind_of_break():
    planted = {
        "echosim/comm.py": {"echosim.engine", "echosim.hw"},  # the cost layer reaching up to the engine
        "echosim/trace/gpt.py": {"dsv.models.dit"},  # echosim importing dsv
        "torchkit/cli.py": {"echosim.graph"},  # the bottom layer importing upwards
        "dsv/parallel/planner.py": {"echosim.engine", "echosim.simulator"},  # dsv using the engine's internals
        "echosim/new_module.py": set(),  # a module nobody placed
    }
    assert violations(planted, {}) == [
        "echosim/comm.py (echosim cost layer) imports echosim.engine (echosim engine)",
        "echosim/trace/gpt.py (echosim tracing) imports dsv.models.dit (dsv)",
        "torchkit/cli.py (torchkit) imports echosim.graph (echosim trace format)",
        "dsv/parallel/planner.py (dsv) imports echosim.engine (echosim engine)",
        "echosim/new_module.py: echosim.new_module is in no layer of LAYERS; add it to the layer it belongs to",
    ]


def test_imports_are_read_from_every_form_of_import(tmp_path, monkeypatch):
    package = tmp_path / "echosim" / "trace"
    package.mkdir(parents=True)
    source = package / "example.py"
    source.write_text("import os\nimport dsv.models\nfrom echosim import graph\nfrom . import recorder\n"
                      "from ..engine import replay\n\ndef late():\n    from torchkit.cli import Failure\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    known = {"echosim.graph", "echosim.trace.recorder", "echosim.engine"}
    assert imported_modules(source, known) == {"dsv.models", "echosim.graph", "echosim.trace.recorder",
                                               "echosim.engine", "torchkit.cli"}
