"""Checks of hardware descriptions: every field's type and range, one-line errors naming it.

A dataclass of echosim.hw (or echosim.overlap) declares each number's range in its field's
metadata (`POSITIVE`, `NON_NEGATIVE`, `FRACTION`, `AT_LEAST_ONE`); `check` walks the type
hints and applies the range to every number under the field (dict values, list items), so a
negative bandwidth, a string latency, `gpus_per_node: 0` or NaN never reaches a cost model.
`build` makes the dataclass from a JSON object and refuses unknown and missing fields:

    my_cluster.json: nvlink_GBps must be a number > 0, got -450
    my_cluster.json: protocols.LL.bw_fraction must be a number in (0, 1], got 1.5
    my_cluster.json: unknown fields ['nvlnk_GBps'] (Cluster has ...)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from pathlib import Path
from typing import Any

POSITIVE = {"above": 0}  # bandwidths, peaks, multipliers: zero would divide by zero, below it speed a job up
NON_NEGATIVE = {"at_least": 0}  # latencies, times, sizes
FRACTION = {"above": 0, "at_most": 1}  # shares of a peak or of a link
AT_LEAST_ONE = {"at_least": 1}  # counts; slowdown factors (a factor below 1 would make compute faster)


class FieldError(ValueError):
    """One field out of its type or range; `path` names it inside its object (`protocols.LL.base_us`)."""

    def __init__(self, owner: str, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{owner}: {path} {problem}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON: {err}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check(obj: Any) -> None:
    """Raise FieldError for the first field of dataclass `obj` whose value breaks its type or range."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        problem = _problem(hints[f.name], getattr(obj, f.name), f.name, f.metadata)
        if problem:
            raise FieldError(type(obj).__name__, *problem)


def build(cls: type, data: Any, *, source: str, path: str = "") -> Any:
    """An instance of dataclass `cls` from the JSON value `data` read from `source`; nested
    dataclasses (also as dict values) are built the same way. Every error is one line that
    starts with `source` and names the field."""
    where = f"{source}: {path.rstrip('.')}" if path else source
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object of {cls.__name__} fields, got {_kind(data)}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    unknown, missing = sorted(set(data) - set(names)), [n for n in required if n not in data]
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown} ({cls.__name__} has {names})")
    if missing:
        raise ValueError(f"{where}: missing fields {missing} ({cls.__name__} needs {required})")
    values = {}
    for name, value in data.items():
        tp = _hints(cls)[name]
        item = typing.get_args(tp)[1] if typing.get_origin(tp) is dict else None
        if _is_dataclass(tp):
            value = build(tp, value, source=source, path=f"{path}{name}.")
        elif _is_dataclass(item) and isinstance(value, dict):
            value = {k: build(item, v, source=source, path=f"{path}{name}.{k}.") for k, v in value.items()}
        values[name] = value
    try:
        return cls(**values)
    except FieldError as err:
        raise ValueError(f"{source}: {path}{err.path} {err.problem}") from None


def _problem(tp: Any, value: Any, path: str, bounds: Any) -> tuple[str, str] | None:
    """(path, "must be ...") of the first value under `path` that breaks type `tp` or `bounds`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_dataclass(tp):
        fits = isinstance(value, tp)
        return None if fits else (path, f"must be an object of {tp.__name__} fields, got {_kind(value)}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return path, f"must be an object, got {_kind(value)}"
        for key, item in value.items():
            if not isinstance(key, str):
                return path, f"must have string keys, got {key!r}"
            if args and (found := _problem(args[1], item, f"{path}.{key}", bounds)):
                return found
        return None
    if origin is list:
        if not isinstance(value, list):
            return path, f"must be a list, got {_kind(value)}"
        for i, item in enumerate(value):
            if found := _problem(args[0], item, f"{path}[{i}]", bounds):
                return found
        return None
    if tp is bool:
        return None if isinstance(value, bool) else (path, f"must be true or false, got {_kind(value)}")
    if tp is str:
        return None if isinstance(value, str) else (path, f"must be a string, got {_kind(value)}")
    if tp in (int, float):
        kind = "an integer" if tp is int else "a number"
        fits = isinstance(value, int) if tp is int else isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not fits or not _within(value, bounds):
            return path, f"must be {kind}{_range_text(bounds)}, got {_kind(value)}"
        return None
    raise TypeError(f"{path}: no check for type {tp!r}")


def _within(value: float, bounds: Any) -> bool:
    return (value > bounds.get("above", -math.inf) and value >= bounds.get("at_least", -math.inf)
            and value <= bounds.get("at_most", math.inf))


def _range_text(bounds: Any) -> str:
    if "above" in bounds and "at_most" in bounds:
        return f" in ({bounds['above']}, {bounds['at_most']}]"
    parts = [f"{op} {bounds[key]}" for key, op in (("above", ">"), ("at_least", ">="), ("at_most", "<="))
             if key in bounds]
    return (" " + " and ".join(parts)) if parts else ""


def _kind(value: Any) -> str:
    return repr(value) if isinstance(value, (bool, int, float, str)) or value is None else type(value).__name__


def _is_dataclass(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)
