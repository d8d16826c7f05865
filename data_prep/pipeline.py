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
from data_prep.rows import COLUMNS, is_rejected, reject, to_table
from data_prep.sources import list_inputs
from data_prep.stages.caption import CaptionStage
from data_prep.stages.clip import ClipStage
from data_prep.stages.ingest import IngestStage
from data_prep.stages.prompts import PromptStage
from data_prep.writer import CLIPS_DIR, REJECTS_DIR, DoneSet, PartWriter, load_done
from ttm_ray.config import write_effective_config

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
    """The whole flow, in order. Issue-4 stages (ground, segment, score, filter) go after."""
    return [
        StageSpec("ingest", IngestStage, (cfg.ingest,), cfg.cpu_stages),
        StageSpec("skip_done_videos", SkipDone, (done,), cfg.cpu_stages),
        StageSpec("clip", ClipStage, (cfg.clip,), cfg.cpu_stages),
        StageSpec("skip_done_clips", SkipDone, (done,), cfg.cpu_stages),
        StageSpec("caption", CaptionStage, (cfg.caption,), cfg.resources.caption,
                  actors=cfg.caption.engine.kind != "manifest"),
        StageSpec("prompts", PromptStage, (cfg.prompts,), cfg.resources.prompts,
                  actors=cfg.prompts.engine.kind != "manifest"),
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
        common = dict(batch_format="pyarrow", batch_size=res.batch_size, num_cpus=res.num_cpus,
                      num_gpus=res.num_gpus or None, zero_copy_batch=True)
        if res.custom_resources:
            common["resources"] = dict(res.custom_resources)
        if res.accelerator_type:
            common["accelerator_type"] = res.accelerator_type
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


def run_prep(cfg: PrepConfig, progress: bool = True) -> dict[str, Any]:
    """Run the pipeline into ``cfg.output_dir``; returns (and writes) the run summary."""
    import ray

    from ttm_ray.runtime import init_ray

    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_effective_config(cfg, out)
    inputs = list_inputs(cfg.source)  # config errors (missing folder...) stop us here
    done = load_done(out)
    log.info("prep: %d inputs, %d clips/videos already done in %s", len(inputs), len(done), out)

    started = init_ray(cfg.run)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    stats = ray.remote(StageStats).options(num_cpus=0).remote()
    start = time.perf_counter()
    writer = PartWriter(out, cfg.output.rows_per_file)
    counts = Counter()
    reasons: Counter = Counter()
    try:
        ds = build_pipeline(cfg, inputs, done, stats)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(batch)
            for status, reason in zip(batch.column("status").to_pylist(),
                                      batch.column("reject_reason").to_pylist(), strict=True):
                counts[status] += 1
                if reason:
                    reasons[reason] += 1
        writer.close()
        stage_stats = ray.get(stats.get.remote())
    finally:
        if started:
            ray.shutdown()
    summary = {
        "output": str(out),
        "clips_table": str(out / CLIPS_DIR),
        "rejects_table": str(out / REJECTS_DIR),
        "inputs": len(inputs),
        "already_done": len(done),
        "new_clips": counts["ok"],
        "new_rejects": counts["rejected"],
        "rejects_by_reason": dict(reasons),
        "stages": stage_stats,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"prep: {summary['inputs']} inputs, {summary['already_done']} already done; "
        f"{summary['new_clips']} new clips, {summary['new_rejects']} new rejects "
        f"in {summary['seconds']}s",
    ]
    for name, s in summary["stages"].items():
        lines.append(f"  {name:<18} {s['rows_in']:>6} in {s['rows_out']:>6} out "
                     f"{s['seconds']:>8.2f}s")
    for reason, n in sorted(summary["rejects_by_reason"].items()):
        lines.append(f"  rejected {reason:<24} {n}")
    lines.append(f"  clips:   {summary['clips_table']}")
    lines.append(f"  rejects: {summary['rejects_table']}")
    return "\n".join(lines)


__all__ = ["COLUMNS", "build_pipeline", "run_prep", "run_sequential", "stage_specs"]
