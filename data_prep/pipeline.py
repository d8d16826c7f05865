"""The curation pipeline on Ray Data, readable top to bottom: :func:`stage_specs` and
:func:`build_pipeline`.

Stages are plain classes over row batches (``data_prep/stages``); this module alone decides
where they run: CPU stages as Ray tasks, model stages as actor pools whose size, CPUs and
GPUs come from config. Errors are rows (``status == "rejected"``), so one bad video never ends
the run. Retries are finite (``faults.*``): a task or actor whose worker keeps dying fails its
block instead of retrying forever, and the job (:mod:`data_prep.job`) re-runs the inputs of
failed blocks one by one (:mod:`data_prep.isolation`).
"""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from data_prep.config import PrepConfig, StageResources
from data_prep.engines import EngineConfig, ray_llm
from data_prep.rows import reject_batch, to_table
from data_prep.stages.caption import CaptionStage
from data_prep.stages.clip import ClipStage
from data_prep.stages.ground import GroundingStage
from data_prep.stages.gt_masks import GtMasksStage
from data_prep.stages.ingest import IngestStage
from data_prep.stages.prompts import PromptStage
from data_prep.stages.score import ScoreStage
from data_prep.stages.segment import SegmentStage
from data_prep.work_index import DoneIndex, SkipDone
from ttm_ray.config.resources import ray_remote_args
from ttm_ray.ops.capacity import stage_bundle

log = logging.getLogger(__name__)

RowStage = Callable[[list[dict]], list[dict]]


@dataclass
class StageSpec:
    """One step of the pipeline: a row-stage factory and where it runs."""

    name: str
    factory: Callable[..., RowStage]
    args: tuple = ()
    resources: StageResources | None = None  # None: a CPU task with the default batch size
    actors: bool = False  # model stages hold weights: an actor pool loads them once per actor
    # Set: the stage runs as ray.data.llm processors, ``processor(ds, *args, resources)``
    # (engine.kind ray_data_llm, data_prep.engines.ray_llm) instead of our actor pool;
    # ``factory`` still serves in-process runs (run_sequential, isolated re-runs).
    processor: Callable[..., Any] | None = None


def stage_specs(cfg: PrepConfig, done: Any, skipped: Any = None) -> list[StageSpec]:
    """The whole flow, in order. ``done`` answers which videos and clips an earlier run
    finished (:mod:`data_prep.work_index`); ``skipped`` hears what the skip stages dropped.
    The filter is applied when a version is published (``data_prep.publish``), over every
    scored row, so thresholds can change without reruns."""
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
        StageSpec("skip_done_videos", SkipDone, (done, skipped), cfg.cpu_stages),
        StageSpec("clip", ClipStage, (cfg.clip,), cfg.cpu_stages),
        StageSpec("skip_done_clips", SkipDone, (done, skipped), cfg.cpu_stages),
        StageSpec("caption", CaptionStage, (cfg.caption,), cfg.resources.caption,
                  actors=cfg.caption.engine.kind != "manifest",
                  processor=_llm_processor(cfg.caption.engine, ray_llm.caption_processor)),
        StageSpec("prompts", PromptStage, (cfg.prompts,), cfg.resources.prompts,
                  actors=cfg.prompts.engine.kind != "manifest",
                  processor=_llm_processor(cfg.prompts.engine, ray_llm.prompts_processor)),
        *masks,
        *scoring,
    ]


def _llm_processor(engine: EngineConfig,
                   processor: Callable[..., Any]) -> Callable[..., Any] | None:
    """``processor`` when the stage's engine runs through ray.data.llm, else None."""
    return processor if engine.kind == ray_llm.RUNNER else None


def guarded(name: str, stage: RowStage, rows: list[dict]) -> list[dict]:
    """Run a stage; an error that escapes it rejects the batch's rows (with the reason the
    shared vocabulary gives it: a CUDA OOM is ``out_of_memory``, a bug ``stage_error``)
    instead of ending the run."""
    try:
        return stage(rows)
    except Exception as exc:
        log.error("stage %s raised on a batch of %d rows:\n%s", name, len(rows),
                  traceback.format_exc(limit=8))
        return reject_batch(rows, name, exc)


# ---------------------------------------------------------------------------- Ray adapters
class ArrowStage:
    """Adapts a row stage to Ray Data's Arrow batches (constructed once per actor)."""

    def __init__(self, name: str, factory: Callable[..., RowStage], args: tuple,
                 stats: Any = None) -> None:
        self.name, self.stats = name, stats
        self.stage = factory(*args)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        start = time.perf_counter()
        out = guarded(self.name, self.stage, rows)
        if self.stats is not None:
            self.stats.add.remote(self.name, time.perf_counter() - start, len(rows), len(out))
        return to_table(out, stage=self.name)  # a value Arrow cannot hold rejects its row


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


def build_pipeline(cfg: PrepConfig, inputs: pa.Table, done: Any, stats: Any = None,
                   skipped: Any = None):
    """Compose the stages on Ray Data (lazy, streaming). Returns the Dataset of result rows.

    Retries are finite: a native crash (abort, segfault, OOM kill) is retried
    ``faults.task_retries`` times, then fails only its block (``faults.max_errored_blocks``
    set by the job), never the run and never forever.
    """
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_arrow(inputs)
    # One input per block, so decode-heavy early stages spread over all CPUs.
    ds = ds.repartition(max(1, min(inputs.num_rows, cfg.max_input_blocks)))
    faults = cfg.faults
    for spec in stage_specs(cfg, done, skipped):
        res = spec.resources or cfg.cpu_stages
        common = dict(batch_format="pyarrow", batch_size=res.batch_size, zero_copy_batch=True,
                      **ray_remote_args(res))
        kwargs = {"name": spec.name, "factory": spec.factory, "args": spec.args,
                  "stats": stats}
        # Ray Data's defaults retry a dying worker forever (max_retries / max_restarts -1).
        # Ray 2.60 takes finite ones only as extra remote args, which it flags as deprecated
        # (no named parameter exists yet): pass them anyway, without the warning per stage.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            if spec.processor is not None:  # ray.data.llm owns the pool and the batching
                ds = spec.processor(ds, *spec.args, resources=res)
            elif spec.actors:
                ds = ds.map_batches(
                    ArrowStage, fn_constructor_kwargs=kwargs,
                    compute=ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
                    max_restarts=faults.actor_restarts, max_task_retries=faults.task_retries,
                    **common)
            else:
                ds = ds.map_batches(_task_stage, fn_kwargs=kwargs,
                                    max_retries=faults.task_retries, **common)
    return ds


def run_sequential(cfg: PrepConfig, inputs: list[dict], done: Any = None) -> list[dict]:
    """The same stages in a plain in-process loop (isolated re-runs, benchmark baseline,
    debugging)."""
    rows = inputs
    for spec in stage_specs(cfg, done if done is not None else DoneIndex()):
        stage = spec.factory(*spec.args)
        size = (spec.resources or cfg.cpu_stages).batch_size
        rows = [r for i in range(0, len(rows), size) for r in guarded(spec.name, stage,
                                                                       rows[i:i + size])]
    return rows


__all__ = ["build_pipeline", "capacity_bundles", "run_sequential", "stage_specs"]
