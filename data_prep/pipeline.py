"""The curation pipeline on Ray Data, readable top to bottom: :func:`build_pipeline`.

Stages are plain classes over row batches (``data_prep/stages``); this module alone decides
where they run: CPU stages as Ray tasks, model stages as actor pools whose size, CPUs and
GPUs come from config. Errors are rows (``status == "rejected"``), so one bad video never ends
the run; :func:`run_prep` streams the result into Parquet parts and prints a summary.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from data_prep.config import PrepConfig, StageResources
from data_prep.publish import clip_bytes_encoder, publish_rows, refilter_version, row_key
from data_prep.rows import COLUMNS, OK, REJECTED, is_rejected, reject, to_table
from data_prep.sources import list_inputs
from data_prep.stages.caption import CaptionStage
from data_prep.stages.clip import ClipStage
from data_prep.stages.ground import GroundingStage
from data_prep.stages.gt_masks import GtMasksStage
from data_prep.stages.ingest import IngestStage
from data_prep.stages.prompts import PromptStage
from data_prep.stages.score import ScoreStage
from data_prep.stages.segment import SegmentStage
from data_prep.writer import (
    CLIPS_DIR,
    REJECTS_DIR,
    DoneSet,
    PartWriter,
    load_done,
    read_parts,
)
from ttm_ray.config import ConfigError, config_hash, to_dict, write_effective_config
from ttm_ray.config.resources import ray_remote_args
from ttm_ray.dataset.versions import (
    DatasetVersion,
    latest_version,
    open_version,
    prune_versions,
)
from ttm_ray.ops.capacity import ensure_capacity, stage_bundle
from ttm_ray.tracking import code_version, flatten, log_params, start_mlflow_run

log = logging.getLogger(__name__)

RowStage = Callable[[list[dict]], list[dict]]


class SkipDone:
    """Drops rows an earlier run already wrote (resume and incremental reruns)."""

    def __init__(self, done: DoneSet) -> None:
        self.done = done

    def __call__(self, rows: list[dict]) -> list[dict]:
        return [
            r for r in rows
            if r["video_id"] not in self.done.rejected_video_ids
            and (r["clip_id"] is None or r["clip_id"] not in self.done.clip_ids)
        ]


@dataclass
class StageSpec:
    """One step of the pipeline: a row-stage factory and where it runs."""

    name: str
    factory: Callable[..., RowStage]
    args: tuple = ()
    resources: StageResources | None = None  # None: a CPU task with the default batch size
    actors: bool = False  # model stages hold weights: an actor pool loads them once per actor


def stage_specs(cfg: PrepConfig, done: Any) -> list[StageSpec]:
    """The whole flow, in order. The filter is applied when a version is published
    (``data_prep.publish``), over every scored row, so thresholds can change without reruns."""
    res = cfg.resources
    masks = {
        "sam2": [StageSpec("ground", GroundingStage, (cfg.ground,), res.ground, actors=True),
                 StageSpec("segment", SegmentStage, (cfg.segment,), res.segment, actors=True)],
        "gt": [StageSpec("gt_masks", GtMasksStage, (cfg.gt_masks,), res.cpu)],
        "none": [],
    }[cfg.mask_source]
    scoring = [StageSpec("score", ScoreStage, (cfg.score,), res.score,
                         actors=cfg.score.temporal)] if cfg.score.enabled else []
    return [
        StageSpec("ingest", IngestStage, (cfg.ingest,), cfg.cpu_stages),
        StageSpec("skip_done_videos", SkipDone, (done,), cfg.cpu_stages),
        StageSpec("clip", ClipStage, (cfg.clip,), cfg.cpu_stages),
        StageSpec("skip_done_clips", SkipDone, (done,), cfg.cpu_stages),
        StageSpec("caption", CaptionStage, (cfg.caption,), cfg.resources.caption,
                  actors=cfg.caption.engine.kind != "manifest"),
        StageSpec("prompts", PromptStage, (cfg.prompts,), cfg.resources.prompts,
                  actors=cfg.prompts.engine.kind != "manifest"),
        *masks,
        *scoring,
    ]


def guarded(name: str, stage: RowStage, rows: list[dict]) -> list[dict]:
    """Run a stage; a bug that escapes it rejects the batch's rows instead of ending the run."""
    try:
        return stage(rows)
    except Exception:
        detail = traceback.format_exc(limit=8)
        log.error("stage %s raised on a batch of %d rows:\n%s", name, len(rows), detail)
        return [r if is_rejected(r) else reject(r, name, "stage_error", detail) for r in rows]


# ---------------------------------------------------------------------------- Ray adapters
_RESOLVED: dict[str, Any] = {}


def _resolve(args: tuple) -> tuple:
    """Large arguments (the done set) travel as ObjectRefs; fetch each once per worker."""
    import ray

    out = []
    for a in args:
        if isinstance(a, ray.ObjectRef):
            key = a.hex()
            if key not in _RESOLVED:
                _RESOLVED[key] = ray.get(a)
            a = _RESOLVED[key]
        out.append(a)
    return tuple(out)


class ArrowStage:
    """Adapts a row stage to Ray Data's Arrow batches (constructed once per actor)."""

    def __init__(self, name: str, factory: Callable[..., RowStage], args: tuple,
                 stats: Any = None) -> None:
        self.name, self.stats = name, stats
        self.stage = factory(*_resolve(args))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        start = time.perf_counter()
        out = guarded(self.name, self.stage, rows)
        if self.stats is not None:
            self.stats.add.remote(self.name, time.perf_counter() - start, len(rows), len(out))
        return to_table(out)


def _task_stage(batch: pa.Table, name: str, factory: Callable[..., RowStage], args: tuple,
                stats: Any = None) -> pa.Table:
    return ArrowStage(name, factory, args, stats)(batch)


class StageStats:
    """A tiny Ray actor summing time and row counts per stage across all workers."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float, rows_in: int, rows_out: int) -> None:
        t = self.totals.setdefault(name, [0.0, 0, 0])
        t[0] += seconds
        t[1] += rows_in
        t[2] += rows_out

    def get(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": round(v[0], 3), "rows_in": v[1], "rows_out": v[2]}
                for k, v in self.totals.items()}


def capacity_bundles(cfg: PrepConfig) -> list[dict[str, float]]:
    """What the pipeline needs placed before it can make progress, as bundles for
    :func:`ttm_ray.ops.capacity.ensure_capacity`: every model stage's ``min_actors`` actors
    (Ray Data starts them up front) plus one CPU-stage task. If the pools' actors took every
    CPU, the CPU tasks that feed them would never run and the job would hang instead of
    failing."""
    bundles = [stage_bundle(s.resources) for s in stage_specs(cfg, None) if s.actors
               for _ in range(s.resources.min_actors)]
    return [*bundles, stage_bundle(cfg.cpu_stages)]


def build_pipeline(cfg: PrepConfig, inputs: list[dict], done: DoneSet, stats: Any = None):
    """Compose the stages on Ray Data (lazy, streaming). Returns the Dataset of result rows."""
    import ray
    from ray.data import ActorPoolStrategy

    done_ref = ray.put(done)
    ds = ray.data.from_arrow(to_table(inputs))
    # One input per block, so decode-heavy early stages spread over all CPUs.
    ds = ds.repartition(max(1, min(len(inputs), cfg.max_input_blocks)))
    for spec in stage_specs(cfg, done_ref):
        res = spec.resources or cfg.cpu_stages
        common = dict(batch_format="pyarrow", batch_size=res.batch_size, zero_copy_batch=True,
                      **ray_remote_args(res))
        if spec.actors:
            ds = ds.map_batches(
                ArrowStage,
                fn_constructor_kwargs={"name": spec.name, "factory": spec.factory,
                                       "args": spec.args, "stats": stats},
                compute=ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
                **common,
            )
        else:
            ds = ds.map_batches(
                _task_stage,
                fn_kwargs={"name": spec.name, "factory": spec.factory, "args": spec.args,
                           "stats": stats},
                **common,
            )
    return ds


def run_sequential(cfg: PrepConfig, inputs: list[dict], done: DoneSet | None = None) -> list[dict]:
    """The same stages in a plain in-process loop (benchmark baseline, debugging)."""
    rows = inputs
    for spec in stage_specs(cfg, done or DoneSet()):
        stage = spec.factory(*spec.args)
        size = (spec.resources or cfg.cpu_stages).batch_size
        rows = [r for i in range(0, len(rows), size) for r in guarded(spec.name, stage,
                                                                       rows[i:i + size])]
    return rows


# ------------------------------------------------------------------------------ the job
def summarize(rows: Iterable[dict]) -> dict[str, Any]:
    ok, reasons, stages = 0, Counter(), Counter()
    for r in rows:
        if is_rejected(r):
            reasons[r["reject_reason"]] += 1
            stages[r["reject_stage"]] += 1
        else:
            ok += 1
    return {"clips": ok, "rejects": sum(reasons.values()),
            "rejects_by_reason": dict(reasons), "rejects_by_stage": dict(stages)}


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

    ``fail_after_rows`` injects a crash once that many rows are written (crash tests).
    """
    import ray

    from ttm_ray.runtime import init_ray

    done = load_done(cfg.work_dir)
    log.info("prep: %d inputs; %d clips/videos already in %s", len(inputs), len(done),
             cfg.work_dir)
    started = init_ray(cfg.run)
    writer = PartWriter(cfg.work_dir, cfg.output.rows_per_file)
    counts: Counter = Counter()
    reasons: Counter = Counter()
    start = time.perf_counter()
    try:
        # A fixed cluster (the local Ray) fails at once if the pools cannot fit; an
        # autoscaling one is asked for the nodes and given run.capacity_timeout_s to add them.
        ensure_capacity(capacity_bundles(cfg), timeout_s=cfg.run.capacity_timeout_s,
                        what="prep")
        ray.data.DataContext.get_current().enable_progress_bars = progress
        stats = ray.remote(StageStats).options(num_cpus=0).remote()
        ds = build_pipeline(cfg, inputs, done, stats)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(batch)
            counts.update(batch.column("status").to_pylist())
            reasons.update(r for r in batch.column("reject_reason").to_pylist() if r)
            if fail_after_rows is not None and counts.total() >= fail_after_rows:
                writer.close()  # what was processed is kept: the rerun resumes from it
                raise RuntimeError(f"injected failure after {counts.total()} rows")
        writer.close()
        stage_stats = ray.get(stats.get.remote())
    finally:
        if started:
            ray.shutdown()
    return {"inputs": len(inputs), "already_done": len(done), "new_clips": counts[OK],
            "new_rejects": counts[REJECTED], "rejects_by_reason": dict(reasons),
            "stages": stage_stats, "pipeline_seconds": round(time.perf_counter() - start, 2)}


def work_rows(cfg: PrepConfig) -> list[dict]:
    clips = read_parts(cfg.work_dir / CLIPS_DIR).to_pylist()
    return clips + read_parts(cfg.work_dir / REJECTS_DIR).to_pylist()


def lineage(cfg: PrepConfig) -> dict[str, Any]:
    # clip: what a clip is (frames, fps, sizes); training's preflight checks it against the
    # model before any worker starts.
    return {"source": to_dict(cfg.source), "filter": to_dict(cfg.filter),
            "clip": to_dict(cfg.clip),
            "config_hash": config_hash(cfg), "code_version": code_version(),
            "work_dir": str(cfg.work_dir)}


def work_store_size(cfg: PrepConfig) -> int:
    """Distinct rows in the work store (one per clip / rejected video, as a version holds)."""
    cols = ["clip_id", "video_id", "source_uri"]
    keys: set[str] = set()
    for sub in (CLIPS_DIR, REJECTS_DIR):
        table = read_parts(cfg.work_dir / sub, cols)
        keys.update(row_key(*row) for row in zip(*(table.column(c).to_pylist() for c in cols),
                                                 strict=True))
    return len(keys)


def unchanged_latest(cfg: PrepConfig, added_rows: int) -> DatasetVersion | None:
    """The latest version, if publishing now would reproduce it: nothing new this run, the
    same filter, and built from every row of the work store. The last check matters after a
    run that crashed between writing rows and publishing: the rerun adds nothing, yet the
    crashed run's rows are not in ``latest`` and must be published now."""
    if added_rows or latest_version(cfg.dataset_root) is None:
        return None
    latest = open_version(cfg.dataset_root)
    lineage_ = latest.manifest["lineage"]
    same = lineage_.get("filter") == to_dict(cfg.filter)
    covers = work_store_size(cfg) == int(lineage_["kept"]) + int(lineage_["rejected"])
    return latest if same and covers else None


def log_version_to_mlflow(cfg: PrepConfig, version: DatasetVersion,
                          summary: dict[str, Any]) -> str:
    """One MLflow run per published version: config, lineage, counts, the dataset card."""
    import mlflow

    tags = {"job": "prep", "dataset_version": version.name,
            "dataset_root": str(cfg.dataset_root), "code_version": code_version()}
    with start_mlflow_run(cfg.run.resolved_mlflow_uri(), cfg.run.mlflow_experiment,
                          f"prep-{version.name}", tags) as run:
        log_params(flatten(cfg))
        mlflow.log_metrics({k: float(v) for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_artifacts(str(version.path / "card"), artifact_path="card")
        mlflow.log_dict(version.manifest, "manifest.json")
        mlflow.log_dict(summary, "summary.json")
        return run.info.run_id


def run_prep(cfg: PrepConfig, progress: bool = True, fail_after_rows: int | None = None,
             track: bool = True) -> dict[str, Any]:
    """Run the pipeline into the work store, then publish a dataset version from all of it."""
    out = cfg.output_dir
    inputs = preflight(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_effective_config(cfg, out)
    start = time.perf_counter()
    summary = run_pipeline(cfg, inputs, progress, fail_after_rows)
    version = unchanged_latest(cfg, summary["new_clips"] + summary["new_rejects"])
    summary["published"] = version is None
    if version is None:
        embed = None
        if cfg.publish.embed_clip_bytes:
            target = cfg.clip.resolutions[0]
            embed = clip_bytes_encoder(target.height, target.width)
        version = publish_rows(work_rows(cfg), cfg.dataset_root, cfg.filter, lineage(cfg),
                               rows_per_file=cfg.publish.rows_per_file, embed=embed)
    pruned = prune_versions(cfg.dataset_root, cfg.publish.keep_versions) \
        if cfg.publish.keep_versions else []
    summary.update(
        output=str(out), work_dir=str(cfg.work_dir), dataset_root=str(cfg.dataset_root),
        dataset_version=version.name, version_path=str(version.path),
        kept=version.manifest["lineage"]["kept"], rejected=version.manifest["lineage"]["rejected"],
        pruned_versions=pruned, seconds=round(time.perf_counter() - start, 2),
    )
    if track and summary["published"]:
        summary["mlflow_run_id"] = log_version_to_mlflow(cfg, version, summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_refilter(cfg: PrepConfig, version: str = "latest", track: bool = True
                 ) -> dict[str, Any]:
    """Re-apply ``cfg.filter`` to a published version's stored scores. No model, no Ray."""
    new = refilter_version(cfg.dataset_root, cfg.filter, lineage(cfg), version)
    summary = {"dataset_root": str(cfg.dataset_root), "dataset_version": new.name,
               "refiltered_from": new.manifest["lineage"]["refiltered_from"],
               "kept": new.manifest["lineage"]["kept"],
               "rejected": new.manifest["lineage"]["rejected"]}
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
        f"{summary['rejected']} rejected (all runs)",
    ]
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<18} {s['rows_in']:>6} in {s['rows_out']:>6} out "
                     f"{s['seconds']:>8.2f}s")
    for reason, n in sorted(summary["rejects_by_reason"].items()):
        lines.append(f"  rejected {reason:<24} {n}")
    lines.append(f"  dataset: {summary['version_path']}")
    lines.append(f"  card:    {summary['version_path']}/card/README.md")
    if summary.get("mlflow_run_id"):
        lines.append(f"  mlflow:  run {summary['mlflow_run_id']}")
    return "\n".join(lines)


__all__ = ["COLUMNS", "build_pipeline", "run_prep", "run_sequential", "stage_specs"]
