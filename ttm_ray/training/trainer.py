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

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ttm_ray.config import ConfigError, config_hash, to_dict, write_effective_config
from ttm_ray.dataset.versions import DatasetVersionError, open_version
from ttm_ray.tracking import code_version
from ttm_ray.training.checkpoint import (
    PROBE,
    Probe,
    export_weights,
    latest_meta,
    read_meta,
    verify_export,
)
from ttm_ray.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preflight:
    """What the driver resolved before starting workers."""

    dataset_version: str  # concrete name (never "latest": a resume must read the same rows)
    run_storage: str  # <storage>/<run.name>: Ray Train's folder for this run
    resume_step: int | None  # step of the checkpoint a resubmission continues from


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
    checkpoint = replace(cfg.checkpoint, storage_path=cfg.checkpoint.resolved_storage(run))
    enc = cfg.encoders
    encoders = replace(enc, autoencoder=replace(enc.autoencoder,
                                                path=absolute(enc.autoencoder.path)),
                       text_encoder=replace(enc.text_encoder,
                                            path=absolute(enc.text_encoder.path),
                                            tokenizer_path=absolute(enc.text_encoder.tokenizer_path)))
    model = replace(cfg.model, init_from=absolute(cfg.model.init_from))
    return replace(cfg, run=run, data=data, checkpoint=checkpoint, encoders=encoders,
                   model=model)


def absolute(path: str | None) -> str | None:
    """A relative local path against the driver's working dir (Ray workers run elsewhere);
    absolute paths and URIs are what every node sees and stay as they are."""
    if not path or "://" in path or Path(path).is_absolute():
        return path
    return str(Path(path).resolve())


def missing_paths(cfg: TrainConfig) -> list[str]:
    """Model/encoder folders given as relative paths that do not exist here: a worker could
    never find them, so the run is refused before any worker starts (absolute paths may live
    only on the training nodes and are checked there)."""
    raw = {"encoders.text_encoder.path": cfg.encoders.text_encoder.path,
           "encoders.autoencoder.path": cfg.encoders.autoencoder.path,
           "model.init_from": cfg.model.init_from}
    return [f"{key}: {path} does not exist (relative to {Path.cwd()})"
            for key, path in raw.items()
            if path and "://" not in path and not Path(path).is_absolute()
            and not Path(path).exists()]


def preflight(cfg: TrainConfig, errors: list[str] | None = None) -> Preflight:
    """Checks that need the filesystem; raises ConfigError listing every problem (with the
    ``errors`` found before paths were resolved), so one attempt shows them all."""
    errors = list(errors or [])
    version = None
    try:
        version = open_version(cfg.data.dataset_root, cfg.data.version).name
    except DatasetVersionError as exc:
        errors.append(f"data.version: {exc}")
    run_storage = f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.run.name}"
    meta = latest_meta(run_storage)
    if meta is not None and version is not None and meta["dataset_version"] != version:
        if cfg.data.version == "latest":
            # The run started on an older version: keep reading it, or the data position
            # would point into different rows.
            log.info("resuming %s on its dataset version %s (latest is now %s)",
                     cfg.run.name, meta["dataset_version"], version)
            version = meta["dataset_version"]
        else:
            errors.append(f"data.version: {version} but run {cfg.run.name!r} was checkpointed "
                          f"on {meta['dataset_version']}; use that version or a new run.name")
    if errors:
        raise ConfigError(errors)
    assert version is not None
    return Preflight(version, run_storage, meta["step"] if meta else None)


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the training workers: DeepSpeed's CPU accelerator off-GPU, and the
    driver's JIT-extension cache so the CPU comm op is built once, not per worker."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


def build_trainer(cfg: TrainConfig, pre: Preflight, mlflow_run_id: str) -> Any:
    """The ``TorchTrainer`` of the run (Ray Train V2 API)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ttm_ray.training.loop import train_worker

    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker, **s.custom_resources}
    if s.use_gpu:
        resources["GPU"] = 1
    job = {"dataset_version": pre.dataset_version, "mlflow_run_id": mlflow_run_id,
           "config_hash": config_hash(cfg)}
    return TorchTrainer(
        train_worker,
        train_loop_config={"train": to_dict(cfg), "job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
            accelerator_type=s.accelerator_type, placement_strategy=s.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.checkpoint.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Preflight, train on Ray, export; returns the job summary."""
    from ttm_ray.runtime import init_ray
    from ttm_ray.training.mlflow_logging import resolve_run

    start = time.perf_counter()
    missing = missing_paths(cfg)  # relative paths: checked before they are resolved
    cfg = resolve_paths(cfg)
    pre = preflight(cfg, missing)  # before Ray: a bad config never costs a cluster
    write_effective_config(cfg, cfg.out_dir)
    init_ray(cfg.run)
    run_id = resolve_run(cfg, pre.run_storage, pre.dataset_version)
    log.info("training %s on %s (MLflow run %s, checkpoints in %s%s)", cfg.run.name,
             pre.dataset_version, run_id, pre.run_storage,
             f", resuming after step {pre.resume_step}" if pre.resume_step else "")
    result = build_trainer(cfg, pre, run_id).fit()
    summary: dict[str, Any] = {
        "run_name": cfg.run.name, "dataset_version": pre.dataset_version,
        "mlflow_run_id": run_id, "storage": pre.run_storage,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": dict(result.metrics or {}),
    }
    if cfg.checkpoint.export and result.checkpoint is not None:
        summary.update(export(cfg, result.checkpoint))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


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
