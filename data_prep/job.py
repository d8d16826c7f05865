"""The data-prep job: run the pipeline into the work store, publish a version, refilter,
log to MLflow, summarise. The pipeline's composition is :mod:`data_prep.pipeline`.

Memory: the driver holds the input listing and per-run counters, never the work store's rows.
What is done is answered by sharded index actors (:mod:`data_prep.work_index`), publish and
refilter run one task per shard group (:mod:`data_prep.publish`), and finished rows reach the
work store every ``output.flush_rows`` rows or ``output.flush_seconds`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from data_prep.config import PrepConfig
from data_prep.isolation import isolate
from data_prep.pipeline import StageStats, build_pipeline, capacity_bundles
from data_prep.publish import (
    Published,
    ShardSettings,
    plan_work_store,
    previous_version,
    publish_groups,
    refilter_version,
    unchanged,
)
from data_prep.rows import OK, REJECTED, reject_class, to_table
from data_prep.sources import list_inputs
from data_prep.work_index import ShardedDoneLookup, SkippedInputs, buckets_for
from data_prep.writer import PartWriter, list_parts
from ttm_ray.config import ConfigError, config_hash, to_dict, write_effective_config
from ttm_ray.dataset.versions import DatasetVersion, prune_versions
from ttm_ray.ops.capacity import ensure_capacity
from ttm_ray.tracking import code_version, flatten, log_params, start_mlflow_run

log = logging.getLogger(__name__)
HOLD_ENV = "TTM_RAY_HOLD_AFTER_ROWS"  # fault injection for kill tests (see run_pipeline)

def preflight(cfg: PrepConfig) -> list[dict]:
    """Everything that can fail before work starts: model paths, the input listing."""
    try:
        cfg.check_models()
    except ValueError as exc:
        raise ConfigError([str(exc)], "prep config") from None
    return list_inputs(cfg.source)  # a missing folder/manifest stops us here


def run_pipeline(cfg: PrepConfig, inputs: list[dict], progress: bool = True,
                 fail_after_rows: int | None = None) -> dict[str, Any]:
    """Stream the pipeline's rows into the work store; returns what this run added.
    Needs Ray up. ``fail_after_rows`` injects a crash once that many rows arrived; the
    environment variable ``TTM_RAY_HOLD_AFTER_ROWS=N`` makes the driver stop consuming (and
    wait to be killed) once N rows arrived, so a kill test lands midway deterministically."""
    hold_after = int(os.environ.get(HOLD_ENV) or 0) or None
    import ray

    parts = list_parts(cfg.work_dir)
    writer = PartWriter(cfg.work_dir, cfg.output.flush_rows, cfg.output.flush_seconds)
    counts: Counter = Counter()
    reasons: Counter = Counter()
    classes: Counter = Counter()
    start = time.perf_counter()
    done = None

    def write(batch: pa.Table) -> None:
        writer.add(batch)
        counts.update(batch.column("status").to_pylist())
        found = [r for r in batch.column("reject_reason").to_pylist() if r]
        reasons.update(found)
        classes.update(reject_class(r) for r in found)

    try:
        # A fixed cluster (the local Ray) fails at once if the pools cannot fit; an
        # autoscaling one is asked for the nodes and given run.capacity_timeout_s to add them.
        ensure_capacity(capacity_bundles(cfg), timeout_s=cfg.run.capacity_timeout_s,
                        what="prep")
        done = ShardedDoneLookup.start(cfg.work_dir, cfg.faults.max_attempts,
                                       buckets_for(sum(p.rows for p in parts), 500_000))
        already_done = done.rows()
        log.info("prep: %d inputs; %d rows already in the work store %s", len(inputs),
                 already_done, cfg.work_dir)
        table = to_table(inputs, stage="source")  # a value Arrow cannot hold: a reject
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        context.max_errored_blocks = cfg.faults.max_errored_blocks
        stats = ray.remote(StageStats).options(num_cpus=0).remote()
        skipped = ray.remote(SkippedInputs).options(num_cpus=0).remote()
        seen: set[str | None] = set()
        if table.num_rows:
            for batch in build_pipeline(cfg, table, done, stats, skipped).iter_batches(
                    batch_format="pyarrow", batch_size=None):
                write(batch)
                seen.update(batch.column("source_uri").to_pylist())
                if fail_after_rows is not None and counts.total() >= fail_after_rows:
                    raise RuntimeError(f"injected failure after {counts.total()} rows")
                if hold_after is not None and counts.total() >= hold_after:
                    log.warning("prep: %s=%d: holding after %d rows until killed", HOLD_ENV,
                                hold_after, counts.total())
                    threading.Event().wait()
        # An input that neither produced a row nor was skipped as done lost its block.
        seen |= ray.get(skipped.get.remote())
        lost = [r for r in table.to_pylist() if r["source_uri"] not in seen]
        for result in isolate(cfg, lost, done):
            write(result)
        stage_stats = ray.get(stats.get.remote())
    finally:
        writer.close()  # any exception: what finished is kept, the rerun resumes from it
        if done is not None:
            done.stop()
    return {"inputs": len(inputs), "already_done": already_done, "new_clips": counts[OK],
            "new_rejects": counts[REJECTED], "rejects_by_reason": dict(reasons),
            "new_rejects_by_class": dict(classes), "isolated_inputs": len(lost),
            "stages": stage_stats, "pipeline_seconds": round(time.perf_counter() - start, 2)}


def lineage(cfg: PrepConfig) -> dict[str, Any]:
    # clip: what a clip is (frames, fps, sizes); training's preflight checks it against the
    # model before any worker starts.
    return {"source": to_dict(cfg.source), "filter": to_dict(cfg.filter),
            "clip": to_dict(cfg.clip), "faults": to_dict(cfg.faults),
            "config_hash": config_hash(cfg), "code_version": code_version(),
            "work_dir": str(cfg.work_dir)}


def shard_settings(cfg: PrepConfig) -> ShardSettings:
    target = cfg.clip.resolutions[0]
    return ShardSettings(embed_size=(target.height, target.width)
                         if cfg.publish.embed_clip_bytes else None,
                         row_group_rows=cfg.publish.row_group_rows,
                         row_group_bytes=cfg.publish.row_group_bytes)


def publish(cfg: PrepConfig) -> tuple[DatasetVersion, Published | None]:
    """Publish the work store (incrementally); ``(latest, None)`` if nothing would change."""
    specs = plan_work_store(cfg.work_dir, cfg.publish.rows_per_file)
    settings = shard_settings(cfg)
    same = unchanged(specs, cfg.dataset_root, cfg.filter, settings)
    if same is not None:
        return same, None
    published = publish_groups(specs, cfg.dataset_root, cfg.filter, lineage(cfg), settings,
                               previous_version(cfg.dataset_root))
    return published.version, published


def log_version_to_mlflow(cfg: PrepConfig, version: DatasetVersion,
                          summary: dict[str, Any]) -> str:
    """One MLflow run per published version: config, lineage, counts, the dataset card. The
    raw-video source and the version are the run's dataset inputs (contexts ``source`` and
    ``output``: MLflow has no dataset outputs), so ``ttm-ray lineage`` walks from them."""
    import mlflow

    from ttm_ray import lineage as lin

    job = "refilter" if version.manifest["lineage"].get("refiltered_from") else "prep"
    tags = lin.job_tags(job, dataset_version=version.name, dataset_root=cfg.dataset_root,
                        source=lin.location_uri(cfg.source.path), config_hash=config_hash(cfg),
                        code_version=code_version())
    # The older names, still read by dashboards and searches made before ttm.*.
    tags.update({"job": job, "dataset_version": version.name,
                 "dataset_root": str(cfg.dataset_root), "code_version": tags[lin.CODE_VERSION]})
    uri = cfg.run.resolved_mlflow_uri()
    with start_mlflow_run(uri, cfg.run.mlflow_experiment, f"prep-{version.name}", tags) as run, \
            tempfile.TemporaryDirectory() as tmp:
        inputs = [(lin.version_dataset(version), lin.CONTEXT_OUTPUT)]
        if cfg.source.path:
            inputs.insert(0, (lin.source_dataset(str(cfg.source.path)), lin.CONTEXT_SOURCE))
        lin.log_datasets(lin.client_for(uri), run.info.run_id, inputs)
        log_params(flatten(cfg))
        mlflow.log_metrics({k: float(v) for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        card = [f["path"] for f in version.manifest["files"]
                if f["path"].startswith("card/") and not f.get("version")]
        for rel in card:  # through the version, so an s3:// dataset's card is logged too
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(version.read_bytes(rel))
        if card:
            mlflow.log_artifacts(str(Path(tmp) / "card"), artifact_path="card")
        mlflow.log_dict(version.manifest, "manifest.json")
        mlflow.log_dict(summary, "summary.json")
        return run.info.run_id


def ensure_version_in_mlflow(cfg: PrepConfig, version: DatasetVersion,
                             summary: dict[str, Any]) -> str:
    """A rerun that published nothing: the version's prep run gets the lineage it lacks (a run
    logged before the ``ttm.*`` tags and dataset inputs), or is logged now if the store has
    none, so every version in use has its producer in MLflow. Returns that run's id."""
    from ttm_ray import lineage as lin

    uri = cfg.run.resolved_mlflow_uri()
    client = lin.client_for(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(experiments,
                                          f"tags.`dataset_version` = '{version.name}'")
            if lin.tag(r.data.tags, lin.JOB) in ("prep", "refilter")
            and lin.tag(r.data.tags, lin.DATASET_ROOT) == str(cfg.dataset_root)]
    if not runs:
        return log_version_to_mlflow(cfg, version, summary)
    run = runs[-1]  # search order: newest first; the oldest published the version
    source = run.data.params.get("source.path") or str(cfg.source.path)
    tags = lin.job_tags(lin.tag(run.data.tags, lin.JOB) or "prep", dataset_version=version.name,
                        dataset_root=cfg.dataset_root, source=lin.location_uri(source))
    for key, value in tags.items():
        if key not in run.data.tags:
            client.set_tag(run.info.run_id, key, value)
    lin.log_datasets(client, run.info.run_id, [(lin.source_dataset(source), lin.CONTEXT_SOURCE),
                                               (lin.version_dataset(version),
                                                lin.CONTEXT_OUTPUT)])
    return run.info.run_id


def _version_summary(version: DatasetVersion, published: Published | None) -> dict[str, Any]:
    lin = version.manifest["lineage"]
    out = {"dataset_version": version.name, "version_path": str(version.path),
           "kept": lin["kept"], "rejected": lin["rejected"],
           "rejected_permanent": lin.get("rejected_permanent"),
           "rejected_transient": lin.get("rejected_transient")}
    if published is not None:
        out.update(written_bytes=published.written_bytes,
                   reused_groups=published.reused_groups, new_groups=published.new_groups)
    return out


class PrepGuard(Protocol):
    """What a caller that may have to stop a prep run hooks in (the nightly rebuild's lock:
    :class:`data_prep.rebuild.LockGuard`)."""

    def check(self, before: str) -> None:
        """Raise to stop before the step ``before`` names ("the pipeline", "publishing")."""

    def watch(self) -> AbstractContextManager[None]:
        """Held around the pipeline, while rows flow into the work store."""


class _Unguarded:
    def check(self, before: str) -> None:
        pass

    def watch(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


def run_prep(cfg: PrepConfig, progress: bool = True, fail_after_rows: int | None = None,
             track: bool = True, guard: PrepGuard | None = None) -> dict[str, Any]:
    """Run the pipeline into the work store, then publish a dataset version from all of it.
    ``guard`` may stop the run before the pipeline or before publishing."""
    from ttm_ray.runtime import init_ray

    out = cfg.output_dir
    inputs = preflight(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_effective_config(cfg, out)
    start = time.perf_counter()
    started = init_ray(cfg.run)
    try:
        guard = guard or _Unguarded()
        guard.check("the pipeline")
        with guard.watch():
            summary = run_pipeline(cfg, inputs, progress, fail_after_rows)
        # The last moment a stopped run can still leave no trace in the dataset root.
        guard.check("publishing")
        version, published = publish(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    summary["published"] = published is not None
    pruned = prune_versions(cfg.dataset_root, cfg.publish.keep_versions) \
        if cfg.publish.keep_versions else []
    summary.update(
        output=str(out), work_dir=str(cfg.work_dir), dataset_root=str(cfg.dataset_root),
        **_version_summary(version, published), pruned_versions=pruned,
        seconds=round(time.perf_counter() - start, 2))
    if track and summary["published"]:
        summary["mlflow_run_id"] = log_version_to_mlflow(cfg, version, summary)
    elif track:
        summary["mlflow_run_id"] = ensure_version_in_mlflow(cfg, version, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_refilter(cfg: PrepConfig, version: str = "latest", track: bool = True
                 ) -> dict[str, Any]:
    """Re-apply ``cfg.filter`` to a published version's stored scores. No model; one task
    per shard group on Ray."""
    from ttm_ray.runtime import init_ray

    started = init_ray(cfg.run)
    try:
        published = refilter_version(cfg.dataset_root, cfg.filter, lineage(cfg), version)
    finally:
        if started:
            import ray

            ray.shutdown()
    new = published.version
    summary = {"dataset_root": str(cfg.dataset_root),
               "refiltered_from": new.manifest["lineage"]["refiltered_from"],
               **_version_summary(new, published)}
    if track:
        summary["mlflow_run_id"] = log_version_to_mlflow(cfg, new, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"prep: {summary['inputs']} inputs, {summary['already_done']} already done; "
        f"{summary['new_clips']} new clips, {summary['new_rejects']} new rejects "
        f"in {summary['seconds']}s",
        f"  {'published' if summary['published'] else 'nothing new; latest stays'} "
        f"{summary['dataset_version']}: {summary['kept']} clips kept, "
        f"{summary['rejected']} rejected (all runs: {summary.get('rejected_permanent')} "
        f"permanent, {summary.get('rejected_transient')} transient, retried next run)",
    ]
    if summary.get("isolated_inputs"):
        lines.append(f"  {summary['isolated_inputs']} inputs re-run alone after a crash")
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<18} {s['rows_in']:>6} in {s['rows_out']:>6} out "
                     f"{s['seconds']:>8.2f}s")
    for reason, n in sorted(summary["rejects_by_reason"].items()):
        lines.append(f"  rejected {reason:<24} {n} ({reject_class(reason)})")
    if summary.get("published"):
        lines.append(f"  wrote {summary['written_bytes']} bytes: {summary['new_groups']} new "
                     f"shard groups, {summary['reused_groups']} reused")
    lines.append(f"  dataset: {summary['version_path']}")
    lines.append(f"  card:    {summary['version_path']}/card/README.md")
    if summary.get("mlflow_run_id"):
        lines.append(f"  mlflow:  run {summary['mlflow_run_id']}")
    return "\n".join(lines)


__all__ = ["format_summary", "publish", "run_prep", "run_refilter"]
