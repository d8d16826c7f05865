"""Tiny training runs shared by the slow training tests.

A Ray Train run on 2 CPU workers costs ~30 s, most of it worker start-up, so the trainer,
fault-tolerance, MLflow and export tests share runs: :func:`train_tiny` trains each
(config, overrides) once per session and returns the cached summary afterwards.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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


def tiny_overrides(name: str, root: Path, dataset_root: Path, encoders: dict[str, Path],
                   *overrides: str) -> list[str]:
    """The ``--set`` overrides of :func:`tiny_config` (a subprocess driver gets the same)."""
    slug = re.sub(r"[^0-9A-Za-z]+", "-", "-".join(overrides)).strip("-")
    text = encoders["t5" if name.startswith("dit") else "clip_text"]
    return [
        f"run.root={root}", f"run.name={name}{'-' + slug if slug else ''}",
        f"data.dataset_root={dataset_root}", f"encoders.text_encoder.path={text}",
        # Our own store (not the session-wide $MLFLOW_TRACKING_URI): run names repeat across
        # sessions, and the MLflow test counts the runs of a name.
        f"run.mlflow_tracking_uri=sqlite:///{root / 'mlflow.db'}",
        # Half a CPU per worker: the 2-CPU session Ray fits both workers whatever else holds
        # a CPU for a moment (the cores are shared anyway).
        "scaling.cpus_per_worker=0.5", *overrides]


def tiny_config(name: str, root: Path, dataset_root: Path, encoders: dict[str, Path],
                *overrides: str) -> TrainConfig:
    """``jobs/configs/train/<name>.yaml`` on the session's dataset and tiny encoders, with a
    run name unique to ``overrides`` (each variant gets its own storage and MLflow run)."""
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml",
                       tiny_overrides(name, root, dataset_root, encoders, *overrides))


def _root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one root of every cached run (one MLflow store, one checkpoint storage)."""
    if "root" not in _ROOT:
        _ROOT["root"] = tmp_path_factory.mktemp("train_runs")
    return _ROOT["root"]


def train_tiny(name: str, tmp_path_factory: pytest.TempPathFactory, dataset_root: Path,
               encoders: dict[str, Path], *overrides: str
               ) -> tuple[TrainConfig, dict[str, Any]]:
    """Train once per session; later calls with the same arguments get the cached result.
    All runs share one root (one MLflow store, one checkpoint storage)."""
    from ttm_ray.training.trainer import train

    key = (name, overrides)
    if key not in _RUNS:
        cfg = tiny_config(name, _root(tmp_path_factory), dataset_root, encoders, *overrides)
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
        cfg = tiny_config(name, _root(tmp_path_factory), dataset_root, encoders, *overrides)
        try:
            train(cfg)
        except Exception as exc:  # Ray Train's TrainingFailedError, wrapping the worker's
            error = f"{type(exc).__name__}: {exc}"
        else:
            raise AssertionError("the first submission was expected to fail")
        _RUNS[key] = (cfg, {**train(cfg), "first_error": error})
    cfg, summary = _RUNS[key]
    return cfg, summary, summary["first_error"]


def train_killed(name: str, tmp_path_factory: pytest.TempPathFactory, dataset_root: Path,
                 encoders: dict[str, Path], *overrides: str
                 ) -> tuple[TrainConfig, dict[str, Any]]:
    """A run driven by ``python -m jobs.train`` in its own process group on the session's Ray,
    with ``debug.pause_at_steps=[w, d]``: rank 0's process is SIGKILLed while paused before
    step ``w`` (Ray Train restarts the group from the last checkpoint), the driver's process
    group while the restarted rank 0 is paused before step ``d``; then the run is resubmitted
    under the same name in this process. Returns ``(config, summary of the resubmission)``,
    the summary with the pids killed: ``killed_worker``, ``restarted_worker``, ``driver``."""
    from ttm_ray.training.trainer import train

    key = (name, (*overrides, "<killed>"))
    if key not in _RUNS:
        sets = tiny_overrides(name, _root(tmp_path_factory), dataset_root, encoders,
                              *overrides)
        cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml", sets)
        pids = _kill_worker_then_driver(cfg, [sys.executable, "-m", "jobs.train", "--config",
                                              str(CONFIGS / f"{name}.yaml"),
                                              *(a for v in sets for a in ("--set", v))])
        _RUNS[key] = (cfg, {**train(cfg), **pids})
    return _RUNS[key]


def _kill_worker_then_driver(cfg: TrainConfig, command: list[str]) -> dict[str, int]:
    """Start the driver, kill rank 0 at the first pause, the driver at the second; return
    once no worker of the run is left."""
    import ray

    worker_step, driver_step = cfg.debug.pause_at_steps
    log = cfg.out_dir.parent / f"{cfg.run.name}.driver.log"
    # The session's Ray, through $RAY_ADDRESS: the config stays the one resubmitted below.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with log.open("w") as out:
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first = _paused(cfg, worker_step, driver, log)
        assert first["pid"] in train_worker_pids(), (first, train_worker_pids())
        os.kill(first["pid"], signal.SIGKILL)
        again = _paused(cfg, driver_step, driver, log)
        assert again["pid"] != first["pid"] and again["pid"] in train_worker_pids()
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    # Ray ends a dead driver's actors (the Ray Train controller, then its workers); the
    # resubmission must not race the paused rank 0, which would go on training.
    _wait_for(lambda: not train_worker_pids() and not _alive(again["pid"]), 120,
              f"the workers of the killed driver to end (log: {log})")
    return {"killed_worker": first["pid"], "restarted_worker": again["pid"],
            "driver": driver.pid}


def _paused(cfg: TrainConfig, step: int, driver: subprocess.Popen, log: Path
            ) -> dict[str, int]:
    """Rank 0's marker once it pauses before ``step`` and the checkpoint before that step is
    registered by Ray Train (the one a restart or resubmission resumes from: reported by
    the workers, then recorded by the driver's controller on its next poll)."""
    marker = cfg.out_dir / f"paused_before_step_{step}"
    last = (step - 1) // cfg.checkpoint.every_steps * cfg.checkpoint.every_steps
    snapshot = (Path(cfg.checkpoint.resolved_storage(cfg.run)) / cfg.run.name
                / "checkpoint_manager_snapshot.json")

    def ready() -> bool:
        if driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}) before rank 0 "
                                 f"paused before step {step}:\n{log.read_text()[-3000:]}")
        return marker.is_file() and f'"step_{last:08d}"' in _latest_checkpoint(snapshot)

    _wait_for(ready, 300, f"rank 0 to pause before step {step} after checkpoint {last} "
                          f"(log: {log})")
    return json.loads(marker.read_text())


def _latest_checkpoint(snapshot: Path) -> str:
    try:
        return json.dumps(json.loads(snapshot.read_text())["latest_checkpoint_result"])
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return ""


def train_worker_pids() -> set[int]:
    """Pids of the live Ray Train worker actors (``RayTrainWorker``) on the session's Ray.

    Ray's state API answers through the cluster's dashboard; without one (the session's
    ``ray_local`` starts none) ``list_actors`` would fall back to 127.0.0.1:8265, which on a
    shared machine can be another cluster's, so this asks the GCS actor table the state API
    itself reads instead."""
    import ray
    from ray.util.state import list_actors

    dashboard = ray._private.worker.get_dashboard_url()
    if dashboard:
        return {a.pid for a in list_actors(
            address=f"http://{dashboard}",
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])}
    return {a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


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
