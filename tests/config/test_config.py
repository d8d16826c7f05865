"""Typed config loading: validation errors, base inheritance, --set overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from ttm_ray.config import (
    ConfigError,
    RunConfig,
    config_hash,
    constrained,
    dump_yaml,
    from_dict,
    load_config,
    write_effective_config,
)


@dataclass
class OptimConfig:
    lr: float = constrained(2e-5, gt=0)
    warmup_steps: int = constrained(2000, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class TrainConfig:
    kind: Literal["train"] = "train"
    zero_stage: Literal[2, 3] = 2
    global_batch: int = constrained(32, gt=0)
    micro_batch: int = constrained(1, gt=0)
    workers: int = constrained(32, gt=0)
    dataset_version: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    train: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.global_batch % (self.micro_batch * self.workers):
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by micro_batch x workers "
                f"({self.micro_batch} x {self.workers})"
            )


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    cfg = from_dict(TrainConfig, {})
    assert cfg.train.lr == 2e-5 and cfg.run.name == "default"
    out = write_effective_config(cfg, tmp_path)
    again = load_config(TrainConfig, out)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_wrong_type_names_file_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", {"train": {"lr": "fast"}})
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, path)
    assert str(exc.value) == f'{path}: train.lr: expected a positive float, got "fast"'


def test_out_of_range_and_int_checks(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", {"train": {"lr": -1.0, "warmup_steps": 1.5}})
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, path)
    assert len(exc.value.errors) == 2  # every problem is reported at once
    assert "train.lr: expected a positive float, got -1.0" in str(exc.value)
    assert "train.warmup_steps: expected an integer >= 0, got 1.5" in str(exc.value)


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match="global_batch: expected a positive integer, got True"):
        from_dict(TrainConfig, {"global_batch": True})


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", {"train": {"lrr": 1e-4}})
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, path)
    assert "train.lrr: unknown key (did you mean 'lr'?)" in str(exc.value)
    assert str(path) in str(exc.value)


def test_literal_choice_and_optional() -> None:
    with pytest.raises(ConfigError, match=r"zero_stage: expected one of 2, 3, got 4"):
        from_dict(TrainConfig, {"zero_stage": 4})
    assert from_dict(TrainConfig, {"dataset_version": None}).dataset_version is None
    with pytest.raises(ConfigError, match="dataset_version: expected a string or null"):
        from_dict(TrainConfig, {"dataset_version": 3})


def test_nested_list_and_mapping_types() -> None:
    with pytest.raises(ConfigError, match=r"train.betas\[1\]: expected a float"):
        from_dict(TrainConfig, {"train": {"betas": [0.9, "x"]}})
    with pytest.raises(ConfigError, match=r"train: expected a mapping, got 3"):
        from_dict(TrainConfig, {"train": 3})
    with pytest.raises(ConfigError, match=r"tags.team: expected a string"):
        from_dict(TrainConfig, {"tags": {"team": 1}})


def test_cross_field_validate_reports_where() -> None:
    with pytest.raises(ConfigError, match="<root>: global_batch 32 is not divisible"):
        from_dict(TrainConfig, {"workers": 3})


def test_base_inheritance_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    (tmp_path / "common").mkdir()
    write(tmp_path / "common" / "paper.yaml",
          {"global_batch": 32, "workers": 32, "train": {"lr": 2e-5, "betas": [0.8, 0.9]},
           "run": {"name": "paper"}})
    write(tmp_path / "tiny.yaml",
          {"base": "common/paper.yaml", "workers": 2, "global_batch": 4,
           "train": {"betas": [0.5]}, "run": {"root": "/tmp/r"}})
    cfg = load_config(TrainConfig, tmp_path / "tiny.yaml")
    assert (cfg.workers, cfg.global_batch) == (2, 4)
    assert cfg.train.lr == 2e-5  # inherited
    assert cfg.train.betas == [0.5]  # lists replace
    assert (cfg.run.name, cfg.run.root) == ("paper", "/tmp/r")  # mappings merge


def test_base_list_order_and_cycles(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"micro_batch": 2, "workers": 1})
    write(tmp_path / "b.yaml", {"micro_batch": 4})
    write(tmp_path / "c.yaml", {"base": ["a.yaml", "b.yaml"]})
    assert load_config(TrainConfig, tmp_path / "c.yaml").micro_batch == 4
    write(tmp_path / "x.yaml", {"base": "y.yaml"})
    write(tmp_path / "y.yaml", {"base": "x.yaml"})
    with pytest.raises(ConfigError, match=r"include each other"):
        load_config(TrainConfig, tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_overrides_are_yaml_typed_and_validated(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", {"train": {"lr": 1e-3}})
    cfg = load_config(TrainConfig, path, ["train.lr=1e-4", "run.name=exp1", "train.betas=[0.1]"])
    assert cfg.train.lr == 1e-4 and cfg.run.name == "exp1" and cfg.train.betas == [0.1]
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, path, ["train.lr=fast"])
    msg = str(exc.value)
    assert "--set train.lr=fast" in msg and 'train.lr: expected a positive float, got "fast"' in msg
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        load_config(TrainConfig, path, ["train.lr"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TrainConfig, path, ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"train\.lr is not a mapping"):
        load_config(TrainConfig, path, ["train.lr.x=1"])


def test_bad_yaml_and_non_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(TrainConfig, lst)


def test_dump_yaml_is_loadable() -> None:
    cfg = from_dict(TrainConfig, {"train": {"lr": 3e-4}})
    assert yaml.safe_load(dump_yaml(cfg))["train"]["lr"] == 3e-4


def test_empty_mapping_clears_an_inherited_one(tmp_path: Path) -> None:
    write(tmp_path / "gpu.yaml", {"tags": {"pool": "gpu", "team": "a"}})
    write(tmp_path / "cpu.yaml", {"base": "gpu.yaml", "tags": {}})
    write(tmp_path / "more.yaml", {"base": "gpu.yaml", "tags": {"team": "b"}})
    assert load_config(TrainConfig, tmp_path / "cpu.yaml").tags == {}
    assert load_config(TrainConfig, tmp_path / "more.yaml").tags == {"pool": "gpu", "team": "b"}
