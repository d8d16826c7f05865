"""YAML config files: ``base:`` inheritance, ``--set`` overrides, effective-config output.

A job config file is a mapping. It may name one or more base files (``base: ../x.yaml`` or a
list, relative to the file itself); bases are merged first, in order, then the file on top.
Mappings merge key by key (an empty ``{}`` clears); lists and scalars replace. ``--set
a.b=value`` overrides parse ``value`` as YAML (``1e-4`` a float, ``[1, 2]`` a list).

``${NAME}`` inside a string value is replaced by the environment variable ``NAME`` (an unset
one is a config error naming the key): how one file names a root that differs per machine,
e.g. the rehearsal overlays' ``${TTM_REHEARSAL_ROOT}``. Nothing else is interpolated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ttm_ray.config.schema import ConfigError, from_dict, to_dict

T = TypeVar("T")
BASE_KEY = "base"


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge recursively, everything else replaces.

    An explicitly empty mapping (``{}``) replaces instead of merging: it is how a file clears
    a mapping it inherited (e.g. ``custom_resources: {}`` on a CPU-only variant).
    """
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(["<root>: expected a mapping at the top of the file"], str(path))
    return data


def load_merged(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping with all its ``base`` files merged underneath."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError([f"base files include each other: {chain}"])
    data = read_yaml(path)
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError([f"{BASE_KEY}: expected a file path or a list of them"], str(path))
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, load_merged(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> ``(["train", "lr"], 1e-4)``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError([f"--set {text}: expected KEY.PATH=VALUE, e.g. train.lr=1e-4"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"--set {text}: value is not valid YAML ({exc})"]) from exc
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    out = copy.deepcopy(data)
    for text in overrides or []:
        keys, value = parse_override(text)
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError([f"--set {text}: {where} is not a mapping"])
            node = child
        node[keys[-1]] = value
    return out


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(data: Any, problems: list[str], path: str = "") -> Any:
    """``data`` with every ``${NAME}`` in its strings replaced from the environment; unset
    names are added to ``problems`` with their key path."""
    if isinstance(data, dict):
        return {k: expand_env(v, problems, f"{path}.{k}" if path else str(k))
                for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, problems, f"{path}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name not in os.environ:
            problems.append(f"{path}: environment variable {name} is not set (the value "
                            f"{data!r} names it): export {name}=...")
            return match[0]
        return os.environ[name]

    return _ENV_REF.sub(value, data)


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Load ``cls`` from a YAML file (with bases) plus ``--set`` overrides, fully validated.

    Errors name the file (and the override, if one caused it), the key path and what was
    expected; all problems are reported at once.
    """
    data = load_merged(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set {' '.join(overrides)})"
    problems: list[str] = []
    data = expand_env(data, problems)
    if problems:
        raise ConfigError(problems, source)
    return from_dict(cls, data, source)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(cfg: Any) -> str:
    """Stable short hash of the effective config (stored with checkpoints and datasets)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_effective_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the effective (merged, overridden, defaulted) config next to a run's outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(dump_yaml(cfg))
    return path
