"""Tiny training runs shared by the slow training tests.

A Ray Train run on 2 CPU workers costs ~30 s, most of it worker start-up, so the trainer,
fault-tolerance, MLflow and export tests share runs: :func:`train_tiny` trains each
(config, overrides) once per session and returns the cached summary afterwards.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from ttm_ray.config import load_config
from ttm_ray.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "jobs" / "configs" / "train"
TINY = ("dit_stage1_tiny", "dit_stage2_tiny", "unet_stage1_tiny", "unet_stage2_tiny")

_ROOT: dict[str, Path] = {}
_RUNS: dict[tuple[str, tuple[str, ...]], tuple[TrainConfig, dict[str, Any]]] = {}


def tiny_config(name: str, root: Path, dataset_root: Path, encoders: dict[str, Path],
                *overrides: str) -> TrainConfig:
    """``jobs/configs/train/<name>.yaml`` on the session's dataset and tiny encoders, with a
    run name unique to ``overrides`` (each variant gets its own storage and MLflow run)."""
    slug = re.sub(r"[^0-9A-Za-z]+", "-", "-".join(overrides)).strip("-")
    text = encoders["t5" if name.startswith("dit") else "clip_text"]
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml", [
        f"run.root={root}", f"run.name={name}{'-' + slug if slug else ''}",
        f"data.dataset_root={dataset_root}", f"encoders.text_encoder.path={text}",
        # Our own store (not the session-wide $MLFLOW_TRACKING_URI): run names repeat across
        # sessions, and the MLflow test counts the runs of a name.
        f"run.mlflow_tracking_uri=sqlite:///{root / 'mlflow.db'}",
        # Half a CPU per worker: the 2-CPU session Ray fits both workers whatever else holds
        # a CPU for a moment (the cores are shared anyway).
        "scaling.cpus_per_worker=0.5", *overrides])


def train_tiny(name: str, tmp_path_factory: pytest.TempPathFactory, dataset_root: Path,
               encoders: dict[str, Path], *overrides: str
               ) -> tuple[TrainConfig, dict[str, Any]]:
    """Train once per session; later calls with the same arguments get the cached result.
    All runs share one root (one MLflow store, one checkpoint storage)."""
    from ttm_ray.training.trainer import train

    key = (name, overrides)
    if key not in _RUNS:
        if "root" not in _ROOT:
            _ROOT["root"] = tmp_path_factory.mktemp("train_runs")
        cfg = tiny_config(name, _ROOT["root"], dataset_root, encoders, *overrides)
        _RUNS[key] = (cfg, train(cfg))
    return _RUNS[key]


def train_interrupted(name: str, tmp_path_factory: pytest.TempPathFactory, dataset_root: Path,
                      encoders: dict[str, Path], *overrides: str
                      ) -> tuple[TrainConfig, dict[str, Any], str]:
    """A run whose failures outlast ``failure.max_failures``, then resubmitted under the same
    run name: ``(config, summary of the resubmission, the first submission's error)``."""
    from ttm_ray.training.trainer import train

    key = (name, (*overrides, "<resubmitted>"))
    if key not in _RUNS:
        if "root" not in _ROOT:
            _ROOT["root"] = tmp_path_factory.mktemp("train_runs")
        cfg = tiny_config(name, _ROOT["root"], dataset_root, encoders, *overrides)
        try:
            train(cfg)
        except Exception as exc:  # Ray Train's TrainingFailedError, wrapping the worker's
            error = f"{type(exc).__name__}: {exc}"
        else:
            raise AssertionError("the first submission was expected to fail")
        _RUNS[key] = (cfg, {**train(cfg), "first_error": error})
    cfg, summary = _RUNS[key]
    return cfg, summary, summary["first_error"]


def metric_history(cfg: TrainConfig, run_id: str, key: str = "loss"
                   ) -> dict[int, list[float]]:
    """``step -> every value logged at that step`` (a step re-run after a resume appears
    twice)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.run.resolved_mlflow_uri())
    out: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return dict(sorted(out.items()))


def assert_learns(losses: dict[int, list[float]], steps: int) -> None:
    """Finite losses at every step 1..steps, and the last third below the first third."""
    assert sorted(losses) == list(range(1, steps + 1)), losses
    values = [v[-1] for v in losses.values()]
    assert all(math.isfinite(v) for v in values), values
    k = max(1, steps // 3)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    assert last < first, f"loss did not decrease: first {values[:k]}, last {values[-k:]}"
