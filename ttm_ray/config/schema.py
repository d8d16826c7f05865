"""Typed configuration: plain dataclasses validated from YAML-shaped dicts.

Every component owns a ``@dataclass`` ``Config`` (torchtitan style). This module turns nested
dicts (from YAML files and ``--set`` overrides) into those dataclasses and rejects anything
that does not fit *before* any work starts, with the key path and what was expected, e.g.::

    jobs/configs/x.yaml: train.lr: expected a positive float, got "fast"

Constraints ride on ``dataclasses.field(metadata=...)`` through :func:`constrained`; checks
that span several fields live in a ``validate()`` method that raises ``ValueError`` (the
message gets the key path of that dataclass prepended).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration problem; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.source = source
        self.errors = [f"{source}: {e}" if source else e for e in errors]
        super().__init__("\n".join(self.errors))


def constrained(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    nonempty: bool = False,
    help: str = "",
) -> Any:
    """A dataclass field with numeric bounds / non-emptiness checked at load time."""
    meta = {"gt": gt, "ge": ge, "lt": lt, "le": le, "nonempty": nonempty, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _got(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def describe(tp: Any, meta: dict | None = None) -> str:
    """Human description of what a field accepts ("a positive float", "one of 'a', 'b')."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(describe(a, meta) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    name = {bool: "boolean", int: "integer", float: "float", str: "string"}.get(tp, str(tp))
    if tp in (int, float):
        gt, ge, lt, le = (meta.get(k) for k in ("gt", "ge", "lt", "le"))
        if gt == 0 and ge is None and lt is None and le is None:
            return f"a positive {name}"
        bounds = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "",
                  f"< {lt}" if lt is not None else "", f"<= {le}" if le is not None else ""]
        bounds = [b for b in bounds if b]
        return f"{_article(name)} {name}" + (f" {' and '.join(bounds)}" if bounds else "")
    if tp is str and meta.get("nonempty"):
        return "a non-empty string"
    return f"{_article(name)} {name}"


def _check_bounds(value: Any, meta: dict) -> bool:
    checks = {
        "gt": lambda b: value > b, "ge": lambda b: value >= b,
        "lt": lambda b: value < b, "le": lambda b: value <= b,
    }
    return all(meta.get(k) is None or ok(meta[k]) for k, ok in checks.items())


def _convert(tp: Any, value: Any, path: str, meta: dict, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    expected = describe(tp, meta)

    def fail() -> None:
        errors.append(f"{path}: expected {expected}, got {_got(value)}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
            return None
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            out = _convert(arg, value, path, meta, trial)
            if not trial:
                return out
        fail()
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
            return value
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        out = [_convert(item_tp, v, f"{path}[{i}]", {}, errors) for i, v in enumerate(value)]
        if meta.get("nonempty") and not out:
            errors.append(f"{path}: expected a non-empty list, got an empty list")
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            fail()
            return value
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(val_tp, v, f"{path}.{k}", {}, errors) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
            return None
        return _build_dataclass(tp, value, path, errors)
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or not _check_bounds(value, meta):
            fail()
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string: accept it as a float.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
            return value
        if not _check_bounds(float(value), meta):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str) or (meta.get("nonempty") and not value.strip()):
            fail()
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _build_dataclass(cls: type[T], data: dict, path: str, errors: list[str]) -> T | None:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(
                f"{prefix}{key}: unknown key{hint}; valid keys: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    n_errors = len(errors)
    for name, f in fields.items():
        if name in data:
            meta = dict(f.metadata)
            kwargs[name] = _convert(hints[name], data[name], prefix + name, meta, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required key missing ({describe(hints[name])})")
    if len(errors) > n_errors:
        return None
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            errors.append(f"{path or '<root>'}: {exc}")
            return None
    return obj


def from_dict(cls: type[T], data: dict, source: str | None = None) -> T:
    """Build ``cls`` from a nested dict, raising :class:`ConfigError` listing every problem."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: expected a mapping, got {_got(data)}"], source)
    obj = _build_dataclass(cls, data, "", errors)
    if errors or obj is None:
        raise ConfigError(errors, source)
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data (YAML-safe) form of a config object."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_help(cls: type) -> dict[str, str]:
    """``{dotted.key: help}`` for every field that documents itself (used by ``config show``)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in field_help(tp).items()})
        elif f.metadata.get("help"):
            out[f.name] = f.metadata["help"]
    return out
