"""The driver side of training: preflight, the ``TorchTrainer``, the final export.

    cfg = load_config(TrainConfig, "jobs/configs/train/dit_stage2.yaml")
    summary = train(cfg)

Everything that can be wrong with a config is found here, on the driver, before Ray starts
a single worker: batch arithmetic, ZeRO stage and model config already at load
(``TrainConfig.validate``), the dataset version and a resume's consistency in
:func:`preflight`. A worker failure restarts the worker group from the last checkpoint
(``failure.max_failures``); resubmitting the same ``run.name`` with the same storage resumes
the run, with the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ttm_ray.config import absolute_path, config_hash, to_dict, write_effective_config
from ttm_ray.tracking import code_version
from ttm_ray.training.checkpoint import (
    PROBE,
    Probe,
    export_weights,
    read_meta,
    verify_export,
)
from ttm_ray.training.config import TrainConfig
from ttm_ray.training.preflight import Preflight, missing_paths, preflight

log = logging.getLogger(__name__)


class BadRowsStop(RuntimeError):
    """The workers stopped: more than ``data.max_bad_fraction`` of the rows are bad."""

    def __init__(self, path: Path) -> None:
        report = json.loads(path.read_text())
        rows = report["bad_rows"]
        shown = "\n".join(f"  row {r['row']}: {r['error']}" for r in rows[:20])
        more = f"\n  ... and {len(rows) - 20} more" if len(rows) > 20 else ""
        super().__init__(
            f"stopped at step {report['step']}: {len(rows)} of {report['num_rows']} rows of "
            f"{report['dataset_version']} cannot be trained on, more than data.max_bad_fraction "
            f"{report['max_bad_fraction']} (full list: {path}):\n{shown}{more}\nfix or reject "
            "them in data prep and publish a new version, or raise data.max_bad_fraction")


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute and the MLflow URI fixed, so workers (other processes,
    maybe other working dirs) read the same places as the driver."""
    run = cfg.run
    root = run.root if "://" in run.root else str(Path(run.root).resolve())
    run = replace(run, root=root)
    run = replace(run, mlflow_tracking_uri=run.resolved_mlflow_uri())
    data = cfg.data
    if "://" not in data.dataset_root:
        data = replace(data, dataset_root=str(Path(data.dataset_root).resolve()))
    data = replace(data, encoded=absolute_path(data.encoded))
    checkpoint = replace(cfg.checkpoint, storage_path=cfg.checkpoint.resolved_storage(run))
    encoders = cfg.encoders.with_absolute_paths()
    model = replace(cfg.model, init_from=absolute_path(cfg.model.init_from))
    return replace(cfg, run=run, data=data, checkpoint=checkpoint, encoders=encoders,
                   model=model)



def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the training workers: DeepSpeed's CPU accelerator off-GPU, and the
    driver's JIT-extension cache so the CPU comm op is built once, not per worker."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


def worker_bundle(cfg: TrainConfig) -> dict[str, float]:
    """What one training worker asks Ray for (the capacity check asks for the same)."""
    s = cfg.scaling
    bundle: dict[str, float] = {"CPU": s.cpus_per_worker, **s.custom_resources}
    if s.use_gpu:
        bundle["GPU"] = 1
    return bundle


def capacity_bundle(cfg: TrainConfig) -> dict[str, float]:
    """A worker's bundle plus the accelerator-type share Ray Train adds to it."""
    bundle = worker_bundle(cfg)
    if cfg.scaling.accelerator_type:
        bundle[f"accelerator_type:{cfg.scaling.accelerator_type}"] = 0.001
    return bundle


def build_trainer(cfg: TrainConfig, pre: Preflight, mlflow_run_id: str) -> Any:
    """The ``TorchTrainer`` of the run (Ray Train V2 API)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ttm_ray.training.loop import train_worker

    s = cfg.scaling
    job = {"dataset_version": pre.dataset_version, "mlflow_run_id": mlflow_run_id,
           "config_hash": config_hash(cfg)}
    return TorchTrainer(
        train_worker,
        train_loop_config={"train": to_dict(cfg), "job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker=worker_bundle(cfg),
            accelerator_type=s.accelerator_type, placement_strategy=s.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.checkpoint.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )


def train(cfg: TrainConfig, preflight_only: bool = False) -> dict[str, Any]:
    """Preflight, train on Ray, export; returns the job summary. ``preflight_only``: stop
    after the checks (no Ray, nothing written)."""
    from ttm_ray.runtime import init_ray
    from ttm_ray.training.mlflow_logging import resolve_run
    from ttm_ray.training.preflight import summary as preflight_summary

    start = time.perf_counter()
    missing = missing_paths(cfg)  # relative paths: checked before they are resolved
    cfg = resolve_paths(cfg)
    pre = preflight(cfg, missing)  # before Ray: a bad config never costs a cluster
    if preflight_only:
        return preflight_summary(cfg, pre)
    from ttm_ray.ops.capacity import ensure_capacity

    write_effective_config(cfg, cfg.out_dir)
    init_ray(cfg.run)
    # On an autoscaling cluster the training nodes start at zero: ask for them and wait.
    ensure_capacity([capacity_bundle(cfg)] * cfg.scaling.num_workers,
                    timeout_s=cfg.run.capacity_timeout_s, what=f"train {cfg.run.name}")
    run_id = resolve_run(cfg, pre.run_storage, pre.dataset_version,
                         encoded=f"{cfg.data.encoded}@{pre.dataset_version}"
                         if cfg.data.encoded else None)
    log.info("training %s on %s (MLflow run %s, checkpoints in %s%s)", cfg.run.name,
             pre.dataset_version, run_id, pre.run_storage,
             f", resuming after step {pre.resume_step}" if pre.resume_step else "")
    bad_rows = cfg.bad_rows_file
    bad_rows.unlink(missing_ok=True)  # a report of an earlier attempt is not this run's
    result = build_trainer(cfg, pre, run_id).fit()
    if bad_rows.is_file():
        raise BadRowsStop(bad_rows)
    summary: dict[str, Any] = {
        "run_name": cfg.run.name, "dataset_version": pre.dataset_version,
        "mlflow_run_id": run_id, "storage": pre.run_storage,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": dict(result.metrics or {}),
    }
    if cfg.checkpoint.export and result.checkpoint is not None:
        summary.update(export_on_worker(cfg, result.checkpoint))
        summary.update(register(cfg, run_id, summary["export"]))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


def register(cfg: TrainConfig, run_id: str, export_dir: str) -> dict[str, Any]:
    """The export as a model version in the MLflow Model Registry (``registered_model``). A
    store that refuses it does not undo the training run: the weights are written, the summary
    says what failed, and the next submission of the run registers them."""
    import json

    from mlflow.exceptions import MlflowException

    from ttm_ray.models.export import INFO
    from ttm_ray.training.mlflow_logging import register_export

    info = json.loads((Path(export_dir) / INFO).read_text())
    try:
        return {"registered_model": register_export(cfg, run_id, export_dir, info)}
    except (MlflowException, OSError) as exc:
        log.warning("export %s not registered in MLflow: %s", export_dir, exc)
        return {"registered_model": None, "registered_model_error": f"{type(exc).__name__}: "
                                                                    f"{exc}"}


def export_on_worker(cfg: TrainConfig, checkpoint: Any) -> dict[str, Any]:
    """Run :func:`export` as a Ray task shaped like one training worker, so it lands on the
    training node group: consolidating ZeRO shards of a 4B model holds ~16 GB of fp32
    weights, and the driver runs on the head (CPU: 0, a small machine on the shipped
    clusters). The GPU is not needed: consolidation is CPU work."""
    import ray

    bundle = worker_bundle(cfg)
    task = ray.remote(export).options(
        num_cpus=bundle.pop("CPU"), num_gpus=0,
        resources={k: v for k, v in bundle.items() if k != "GPU"},
        runtime_env={"env_vars": worker_env(cfg)}, max_retries=1)
    return ray.get(task.remote(cfg, checkpoint))


def export(cfg: TrainConfig, checkpoint: Any) -> dict[str, Any]:
    """Consolidated weights of ``checkpoint`` under ``<run.root>/<run.name>/export``, checked
    against the probe the last checkpoint carries (when ``checkpoint.verify_export``)."""
    out: dict[str, Any] = {}
    with checkpoint.as_directory() as folder:
        meta = read_meta(folder)
        info = {"run_name": cfg.run.name, "step": meta.get("step"),
                "dataset_version": meta.get("dataset_version"),
                "mlflow_run_id": meta.get("mlflow_run_id"), "config_hash": config_hash(cfg),
                "pixel_shape": meta.get("pixel_shape"),
                "code_version": code_version()}
        export_dir = export_weights(folder, cfg.out_dir / "export", cfg, info)
        out["export"] = str(export_dir)
        probe = Path(folder) / PROBE
        if cfg.checkpoint.verify_export and probe.is_file():
            # fp32 engines must match to float noise; bf16 ones only approximately.
            atol = 5e-2 if cfg.deepspeed.bf16 else 1e-4
            out["export_max_abs_diff"] = verify_export(export_dir, Probe.load(probe), atol)
    return out
