"""Typed configs, YAML loading with inheritance, ``--set`` overrides."""

from ttm_ray.config.loader import (
    apply_overrides,
    config_hash,
    deep_merge,
    dump_yaml,
    load_config,
    load_merged,
    write_effective_config,
)
from ttm_ray.config.paths import absolute_path
from ttm_ray.config.run import RunConfig
from ttm_ray.config.schema import ConfigError, constrained, from_dict, to_dict

__all__ = [
    "ConfigError",
    "RunConfig",
    "absolute_path",
    "apply_overrides",
    "config_hash",
    "constrained",
    "deep_merge",
    "dump_yaml",
    "from_dict",
    "load_config",
    "load_merged",
    "to_dict",
    "write_effective_config",
]
