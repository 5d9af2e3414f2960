"""Typed dataclass configuration turned into an argparse CLI, and back.

Every field of a config dataclass becomes a flag; nested dataclasses become dotted
groups (`--optim.lr 3e-4`, `--data.frames 16`). Help text comes from each field's
`metadata={"help": ...}`; a field without help is a programming error. A field whose values
are the keys of a registry (presets) names them with `metadata={"choices": [...]}`. A nested
config typed `X | None` is filled in by its parent's `__post_init__` (e.g. from a preset), so
its flags take their defaults from the parent's default instance.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] / X | None -> (X, True)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any, flag: str, default: Any) -> None:
    help_text = f.metadata.get("help")
    if not help_text:
        raise TypeError(f"config field {flag!r} has no help text (field(metadata={{'help': ...}}))")
    tp, optional = _unwrap_optional(tp)
    kwargs: dict[str, Any] = {"default": default, "help": f"{help_text} (default: {default!r})", "dest": flag}
    if "choices" in f.metadata:
        kwargs["choices"] = list(f.metadata["choices"])
    origin = typing.get_origin(tp)
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        choices = typing.get_args(tp)
        kwargs.update(choices=choices, type=type(choices[0]))
    elif origin is tuple:
        item = typing.get_args(tp)[0]
        nargs = "+" if ... in typing.get_args(tp) else len(typing.get_args(tp))
        kwargs.update(nargs=nargs, type=item)
    elif tp in (int, float, str):
        kwargs["type"] = tp if not optional else _optional_of(tp)
    else:
        raise TypeError(f"config field {flag!r}: unsupported type {tp!r}")
    parser.add_argument(f"--{flag}", **kwargs)


def _optional_of(tp: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "") else tp(text)

    parse.__name__ = tp.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "", defaults: Any = None) -> None:
    """Add one flag per (possibly nested) field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    defaults = defaults if defaults is not None else cls()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, value = _unwrap_optional(hints[f.name])[0], getattr(defaults, f.name)
        flag = f"{prefix}{f.name.replace('_', '-')}"
        if _is_dataclass_type(tp):
            # argparse groups do not nest (deprecated in 3.11, an error in 3.14): deeper fields join their parent's group
            is_parser = isinstance(parser, argparse.ArgumentParser)
            group = parser.add_argument_group(f"{flag} options", f.metadata.get("help")) if is_parser else parser
            add_config_arguments(group, tp, prefix=f"{flag}.", defaults=value)  # type: ignore[arg-type]
        else:
            _add_field(parser, f, tp, flag, value)


def config_from_args(cls: type[T], args: argparse.Namespace, prefix: str = "") -> T:
    """Build an instance of `cls` from the parsed flags that `add_config_arguments` added."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    namespace = vars(args)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = f"{prefix}{f.name.replace('_', '-')}"
        tp, _ = _unwrap_optional(hints[f.name])
        if _is_dataclass_type(tp):
            values[f.name] = config_from_args(tp, args, prefix=f"{flag}.")
        else:
            value = namespace[flag]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: one entry per leaf field, named as in the CLI's groups."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{name}.")
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def as_flag(name: str, value: Any) -> str:
    """The command-line form of setting a (flattened) field: ("optim.warmup_steps", 5) -> "--optim.warmup-steps 5"."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"  # argparse.BooleanOptionalAction's negative form
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(str(v) for v in value)}"
    return f"{flag} {'none' if value is None else value}"


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Inverse of `config_to_dict` (tuples restored; unknown keys are an error)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        tp, _ = _unwrap_optional(hints[name])
        if _is_dataclass_type(tp):
            value = config_from_dict(tp, value)
        elif typing.get_origin(tp) is tuple and value is not None:
            value = tuple(value)
        values[name] = value
    return cls(**values)
