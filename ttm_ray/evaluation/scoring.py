"""Scoring a benchmark's generated videos where the videos are, not in the job driver.

    plan_chunks (driver: ids, paths, captions, subsets)
        ->  ScoreWorker (actor pool: decode + every enabled backbone)
        ->  collect (driver: per-item values, FVD features; the subset aggregates)

* :func:`plan_chunks` turns one setting's finished items into rows of at most
  ``evaluation.video_batch_size`` items: the item id, the generated video's path, the
  reference video's path, the caption and the subset. No frame is decoded in the driver.
* :class:`ScoreWorker` is a callable class over those rows (a stage in the Cosmos-Curate
  sense): it builds the :class:`~ttm_ray.evaluation.config.Evaluator` once (every enabled
  backbone, on the actor's device), decodes each chunk's generated and reference videos in
  its own process and scores the chunk with the same code as the in-process path. It returns
  one row per item: the per-item metric values and, for set-level metrics (FVD), the item's
  feature vectors (a few hundred floats) - never frames. An item that fails to decode or lacks
  a field becomes a reject row with its reason; the run goes on.
* :func:`collect` streams those rows into the driver, logs progress every
  ``progress_every`` items, orders them by item and aggregates per subset (FVD's mean and
  covariance from the features alone), so the driver's memory grows with the number of
  items by a few KB each, not by their videos.

:func:`score_local` runs the worker in this process (``evaluation.score.engine: local``, for
debugging); :func:`score_ray` places it on a Ray Data actor pool from ``resources.score``
(GPU nodes in production). Both score identical chunks, so they give the same numbers up to
the float rounding of thread counts (see tests/evaluation/test_scoring.py).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttm_ray.config.resources import StageResources, ray_remote_args
from ttm_ray.evaluation.config import EvalItem, EvaluationConfig, Evaluator
from ttm_ray.evaluation.report import EvaluationResults
from ttm_ray.inference.items import GenerationItem, load_pixels
from ttm_ray.inference.outputs import is_done, item_dir, read_record

log = logging.getLogger(__name__)

# Reject reasons (the report counts them per setting).
DECODE_FAILED = "decode_failed"  # a video file that cannot be read
MISSING_FIELD = "missing_field"  # no reference / caption where an enabled metric needs one
SCORE_FAILED = "score_failed"  # a backbone raised on this item

#: The worker's output rows, as Arrow (``values``: the pickled ``{metric: value}``).
ROW_FIELDS = ("index", "video_id", "subset", "status", "reason", "detail", "values", "pid")


# ----------------------------------------------------------------------------- planning
def plan_chunks(items: Sequence[GenerationItem], variant_dir: str | Path, chunk_size: int,
                missing: list[str]) -> list[dict[str, Any]]:
    """Rows of one setting's finished items, ``chunk_size`` items per row (the local path's
    chunks, so both engines score the same batches). Items without output are appended to
    ``missing``. Reads only each item's small ``generation.json`` (for its subset)."""
    from ttm_ray.evaluation.benchmark import subset_of

    entries: list[dict[str, Any]] = []
    for item in items:
        if not is_done(variant_dir, item.item_id):
            missing.append(item.item_id)
            continue
        record = read_record(variant_dir, item.item_id)
        entries.append({
            "index": len(entries), "video_id": item.item_id,
            "video": str(item_dir(variant_dir, item.item_id) / "video.mp4"),
            "reference_video": item.reference_video, "caption": item.prompt,
            "subset": subset_of(item, record)})
    # Rows carry their entries as JSON text: one string column crosses Arrow blocks as is.
    return [{"chunk": k, "payload": json.dumps(entries[i:i + chunk_size])}
            for k, i in enumerate(range(0, len(entries), chunk_size))]


# ----------------------------------------------------------------------------- the stage
def _reject(entry: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"index": entry["index"], "video_id": entry["video_id"], "subset": entry["subset"],
            "status": "rejected", "reason": reason, "detail": detail, "values": None,
            "pid": os.getpid()}


class ScoreWorker:
    """Decode and score chunk rows (see the module docstring); works without Ray.

    ``evaluation``: an :class:`EvaluationConfig` (the backbones are loaded here, once per
    actor) or an already built :class:`Evaluator` (the local engine reuses the driver's).
    ``frames`` / ``fps``: how reference videos are sampled, exactly as generation sampled
    them (:func:`~ttm_ray.inference.items.load_pixels`).
    """

    def __init__(self, evaluation: EvaluationConfig | Evaluator, frames: int,
                 fps: float | None, key: str = "evaluation") -> None:
        self.evaluator = (evaluation if isinstance(evaluation, Evaluator)
                          else evaluation.build(key))
        self.frames, self.fps = frames, fps

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            out += self.score_entries(json.loads(row["payload"]))
        return out

    def _decode(self, entry: dict[str, Any]) -> EvalItem:
        """The item with its frames, decoded in this process. The generated clip is read
        whole (generation's own size and length); the reference only at the frames
        generation sampled (:func:`load_pixels`)."""
        from ttm_ray.evaluation.video import load_video

        reference = None
        if entry["reference_video"] and self.evaluator.need_reference:
            ref_item = GenerationItem(entry["video_id"], entry["caption"] or "",
                                      reference_video=entry["reference_video"])
            reference = load_pixels(ref_item, self.frames, self.fps).reference
        return EvalItem(entry["video_id"], load_video(entry["video"]), reference,
                        entry["caption"], entry["subset"])

    def score_entries(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per entry: its values, or a reject with the reason."""
        out: list[dict[str, Any]] = []
        good: list[tuple[dict[str, Any], EvalItem]] = []
        for entry in entries:
            try:
                item = self._decode(entry)
            except Exception as exc:  # a broken file is this item's problem, not the run's
                out.append(_reject(entry, DECODE_FAILED, f"{type(exc).__name__}: {exc}"))
                continue
            try:
                self.evaluator.check_item(item)
            except ValueError as exc:
                out.append(_reject(entry, MISSING_FIELD, str(exc)))
                continue
            good.append((entry, item))
        if good:
            out += self._score_isolated(good)
        return sorted(out, key=lambda r: r["index"])  # item order, rejects in place

    def _score_isolated(self, good: list[tuple[dict[str, Any], EvalItem]]
                        ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            out += self._score(good)
        except Exception:
            # One bad item must not take its chunk down: score the chunk's items one by one
            # (only in this error case do batches differ from the local path's).
            for pair in good:
                try:
                    out += self._score([pair])
                except Exception:
                    out.append(_reject(pair[0], SCORE_FAILED,
                                       traceback.format_exc(limit=3)[-2000:]))
        return out

    def _score(self, good: list[tuple[dict[str, Any], EvalItem]]) -> list[dict[str, Any]]:
        rows, set_values = self.evaluator.score_chunk([item for _, item in good])
        pid = os.getpid()
        out = []
        for k, ((entry, _), row) in enumerate(zip(good, rows, strict=True)):
            values = {m: row[m] for m in self.evaluator.metrics if m in row}
            values.update({m: set_values[m][k] for m in set_values})
            out.append({"index": entry["index"], "video_id": entry["video_id"],
                        "subset": entry["subset"], "status": "scored", "reason": None,
                        "detail": None, "values": pickle.dumps(_portable(values)),
                        "pid": pid})
        return out


def _portable(value: Any) -> Any:
    """Tensors moved to the CPU (a GPU actor's FVD features), so the driver unpickles them
    without CUDA; containers kept as they are. Values are not rounded: bit-exact."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_portable(v) for v in value)
    return value


class _ArrowRows:
    """Adapts :class:`ScoreWorker` to Ray Data's Arrow batches."""

    def __init__(self, evaluation: EvaluationConfig, frames: int, fps: float | None) -> None:
        self.worker = ScoreWorker(evaluation, frames, fps)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        return pa.Table.from_pylist(self.worker(batch.to_pylist()), schema=_schema())


def _schema() -> Any:
    """:data:`ROW_FIELDS` as Arrow types (built on use: pyarrow is imported lazily)."""
    import pyarrow as pa

    return pa.schema([("index", pa.int64()), ("video_id", pa.string()),
                      ("subset", pa.string()), ("status", pa.string()),
                      ("reason", pa.string()), ("detail", pa.string()),
                      ("values", pa.binary()), ("pid", pa.int64())])


# ----------------------------------------------------------------------------- engines
def score_local(evaluator: Evaluator, rows: Sequence[dict[str, Any]], frames: int,
                fps: float | None) -> Iterator[dict[str, Any]]:
    """The worker in this process, one chunk at a time (the driver holds one chunk)."""
    worker = ScoreWorker(evaluator, frames, fps)
    for row in rows:
        yield from worker([row])


def score_ray(evaluation: EvaluationConfig, rows: Sequence[dict[str, Any]], frames: int,
              fps: float | None, resources: StageResources, progress: bool = True,
              capacity_timeout_s: float = 900.0) -> Iterator[dict[str, Any]]:
    """The worker on a Ray Data actor pool (``resources``), streamed back row by row.

    Ray must be initialised (the job's ``init_ray``). Only chunk rows go in (ids and paths)
    and only value rows come out, so the driver never holds a frame.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from ttm_ray.ops.capacity import ensure_capacity, stage_bundle

    if not rows:
        return
    ensure_capacity([stage_bundle(resources) for _ in range(resources.min_actors)],
                    timeout_s=capacity_timeout_s, what="evaluate scoring")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    # One block per chunk (up to 200) straight from the driver: a chunk is the unit of work,
    # and no repartition task competes with the actors for CPUs.
    ds = ray.data.from_items(list(rows), override_num_blocks=max(1, min(len(rows), 200)))
    ds = ds.map_batches(_ArrowRows, fn_constructor_args=(evaluation, frames, fps),
                        # Pool bounds (Ray 2.60 deprecates `concurrency=` here for this).
                        compute=ActorPoolStrategy(min_size=resources.min_actors,
                                                  max_size=resources.max_actors),
                        batch_size=resources.batch_size, batch_format="pyarrow",
                        **ray_remote_args(resources))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


# ----------------------------------------------------------------------------- the driver
@dataclass
class Scored:
    """What :func:`collect` gathered for one setting."""

    results: EvaluationResults | None  # None: no item scored
    rejected: list[dict[str, Any]] = field(default_factory=list)  # reject rows, item order
    pids: set[int] = field(default_factory=set)  # processes that scored items

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejected))


def collect(evaluator: Evaluator, rows: Iterable[dict[str, Any]], total: int,
            label: str = "", progress_every: int = 10) -> Scored:
    """Stream worker rows into the subset tables (``evaluator``: metric specs and
    aggregates; its backbones are not used). Rows may arrive in any order: they are put
    back in item order first, so the numbers do not depend on which actor finished first."""
    scored: dict[int, dict[str, Any]] = {}
    rejected: dict[int, dict[str, Any]] = {}
    pids: set[int] = set()
    start = time.monotonic()
    for seen, row in enumerate(rows, start=1):
        if row["status"] == "scored":
            scored[row["index"]] = {"video_id": row["video_id"], "subset": row["subset"],
                                    "values": pickle.loads(row["values"])}
            pids.add(int(row["pid"]))
        else:
            rejected[row["index"]] = {k: row[k] for k in
                                      ("video_id", "subset", "reason", "detail")}
            last = (str(row["detail"]).strip().splitlines() or [""])[-1]
            log.warning("%s: rejected %s (%s): %s", label, row["video_id"], row["reason"],
                        last[:300])
        if seen % progress_every == 0 or seen == total:
            log.info("%s: %d/%d items scored (%d rejected, %.1f s)", label, seen, total,
                     len(rejected), time.monotonic() - start)
    specs = evaluator.specs
    per_video: list[dict[str, Any]] = []
    set_values: dict[str, list[Any]] = {m: [] for m in evaluator.metrics if specs[m].set_level}
    for i in sorted(scored):
        s = scored[i]
        row = {"video_id": s["video_id"], "subset": s["subset"]}
        row.update({m: s["values"].get(m) for m in evaluator.metrics
                    if not specs[m].set_level})
        per_video.append(row)
        for m in set_values:
            set_values[m].append(s["values"][m])
    results = (EvaluationResults(evaluator.benchmark, evaluator.metrics,
                                 evaluator.aggregate(per_video, set_values), per_video,
                                 evaluator.backbones) if per_video else None)
    return Scored(results, [rejected[i] for i in sorted(rejected)], pids)


__all__ = ["DECODE_FAILED", "MISSING_FIELD", "ROW_FIELDS", "SCORE_FAILED", "ScoreWorker",
           "Scored", "collect", "plan_chunks", "score_local", "score_ray"]
