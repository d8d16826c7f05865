"""Batch generation over a manifest: annotate each item once, generate every requested
variant, write each (item, variant) atomically; resumable and fault-isolating.

    plan (driver)  ->  annotate (actor pool)  ->  generate + write (actor pool)  ->  results

* :func:`plan` drops the (item, variant) pairs whose ``generation.json`` already exists (a
  rerun after an interruption redoes only the rest) and records the pairs an item cannot
  serve (a GT variant without an annotation, ...) as failures with a reason.
* :class:`AnnotateWorker` runs the injected front-end (:data:`Annotator`; data prep's
  ``ImageAnnotator`` in the jobs) once per item for all its variants.
* :class:`GenerateWorker` holds the two-stage generator and writes outputs.

Both workers are plain classes over row batches: :func:`run_local` calls them in-process
(one image, tests), :func:`run_ray` places them on Ray Data actor pools from
``resources.annotate`` / ``resources.generate`` (GPU nodes in production). A failing item
becomes a failure row (reason + detail); the run goes on. Rows carry their payload as JSON
text so nested prompts and RLE masks cross Ray Data's Arrow blocks unchanged.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttm_ray.config import constrained
from ttm_ray.config.resources import StageResources, ray_remote_args
from ttm_ray.inference.annotation import AnnotationRejected, Annotator
from ttm_ray.inference.config import GenerationConfig
from ttm_ray.inference.harness import (
    NEEDS_GIVEN_PROMPTS,
    NEEDS_TRAJECTORY,
    STAGE1_VARIANTS,
    TABLE5,
    VARIANTS,
    HarnessConfig,
    variant_input,
)
from ttm_ray.inference.items import GenerationItem, annotation_request, load_pixels
from ttm_ray.inference.outputs import is_done, item_dir, write_outputs
from ttm_ray.ops.capacity import ensure_capacity, stage_bundle

log = logging.getLogger(__name__)

FAILURES = "failures.jsonl"
RESULTS = "results.jsonl"


@dataclass
class BatchConfig:
    """Section ``batch:``: which settings to generate for each item and how clips are read."""

    variants: list[str] = field(
        default_factory=lambda: ["generated"],
        metadata={"help": "generated (stage 1 from the front-end's s0) | given_trajectory (the "
                          f"item's annotation) | the failure-case settings {list(TABLE5)}; "
                          "`table5` expands to all of those"})
    fps: float | None = constrained(
        8.0, gt=0, help="frame rate reference videos are sampled at (null: every frame)")
    seed: int = constrained(0, ge=0, help="item k of the manifest samples with seed + k")
    overwrite: bool = constrained(False, help="regenerate items that are already done")
    harness: HarnessConfig = field(default_factory=HarnessConfig)

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in (*VARIANTS, "table5")]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {[*VARIANTS, 'table5']}")
        if not self.variants:
            raise ValueError("variants: at least one")

    def expanded(self) -> list[str]:
        out: list[str] = []
        for v in self.variants:
            for name in (TABLE5 if v == "table5" else (v,)):
                if name not in out:
                    out.append(name)
        return out


@dataclass
class InferenceResources:
    """Section ``resources:`` of the generate / evaluate jobs (Ray placement)."""

    annotate: StageResources = field(default_factory=StageResources)
    generate: StageResources = field(default_factory=StageResources)


# ----------------------------------------------------------------------------- planning
@dataclass
class Plan:
    rows: list[dict[str, Any]]  # one per item with work left: {"item_id", "payload"}
    skipped_done: int
    failures: list[dict[str, Any]]
    pending: int = 0  # (item, variant) pairs to generate
    done: list[str] = field(default_factory=list)  # folders of the pairs skipped as finished


def _donor(item: GenerationItem) -> dict[str, Any] | None:
    if item.object_prompts is None:
        return None
    return {"item_id": item.item_id, "caption": item.prompt, "c_motion": item.motion_prompt,
            "c_local": [{"name": n, "prompt": p} for n, p in item.object_prompts]}


def plan(items: Sequence[GenerationItem], variants: Sequence[str], out_dir: str | Path,
         seed: int = 0, overwrite: bool = False) -> Plan:
    """The work left: per item, the variants not done yet (and those it cannot serve)."""
    rows, failures, done = [], [], []
    for k, item in enumerate(items):
        todo = []
        for v in variants:
            if not overwrite and is_done(Path(out_dir) / v, item.item_id):
                done.append(str(item_dir(Path(out_dir) / v, item.item_id)))
            elif v in NEEDS_TRAJECTORY and not item.annotation:
                failures.append(failure(item.item_id, v, "no_annotation",
                                        f"variant {v} conditions on the item's annotation "
                                        "(GT / user trajectory); the manifest gives none"))
            elif v in NEEDS_GIVEN_PROMPTS and (item.motion_prompt is None
                                               or item.object_prompts is None):
                failures.append(failure(item.item_id, v, "no_given_prompts",
                                        f"variant {v} needs motion_prompt and object_prompts "
                                        "in the manifest"))
            else:
                todo.append(v)
        if todo:
            # gt_wrong borrows the prompts of the next item that has some (never its own).
            donor = next((d for j in range(1, len(items))
                          if (d := _donor(items[(k + j) % len(items)])) is not None), None)
            payload = {"item": item.as_dict(), "variants": todo, "seed": seed + k,
                       "donor": donor}
            rows.append({"item_id": item.item_id, "payload": json.dumps(payload)})
    pending = sum(len(json.loads(r["payload"])["variants"]) for r in rows)
    return Plan(rows, len(done), failures, pending, done)


def failure(item_id: str, variant: str | None, reason: str, detail: str) -> dict[str, Any]:
    return {"item_id": item_id, "variant": variant, "status": "failed", "reason": reason,
            "detail": detail[:4000]}


# ----------------------------------------------------------------------------- workers
def _item(payload: dict[str, Any]) -> GenerationItem:
    from ttm_ray.inference.items import item_from_row

    return item_from_row(payload["item"])


class AnnotateWorker:
    """Row batches -> the same rows with the front-end's response in the payload."""

    def __init__(self, annotator_factory: Callable[[], Annotator], frames: int,
                 fps: float | None) -> None:
        self.annotator = annotator_factory()
        self.frames, self.fps = frames, fps

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out, requests, index = list(rows), [], []
        for i, row in enumerate(rows):
            payload = json.loads(row["payload"])
            try:
                item = _item(payload)
                pixels = load_pixels(item, self.frames, self.fps)
            except Exception as exc:  # unreadable image / video: this item only
                payload["error"] = failure(row["item_id"], None, "unreadable_input",
                                           f"{type(exc).__name__}: {exc}")
                out[i] = {**row, "payload": json.dumps(payload)}
                continue
            variants = payload["variants"]
            requests.append(annotation_request(
                item, pixels.frame_indices, want_llm="gt_llm" in variants,
                need_motion=any(v in STAGE1_VARIANTS for v in variants)))
            index.append((i, payload))
        if requests:
            try:
                responses = self.annotator(requests)
            except Exception:  # a front-end bug: fail these items, keep the run
                detail = traceback.format_exc(limit=6)
                responses = [{**r, "status": "rejected", "reject_reason": "annotate_error",
                              "reject_detail": detail} for r in requests]
            for (i, payload), resp in zip(index, responses, strict=True):
                payload["annotation"] = resp
                out[i] = {**rows[i], "payload": json.dumps(payload, default=str)}
        return out


class GenerateWorker:
    """Row batches -> result rows, one per (item, variant): generated and written, or failed."""

    def __init__(self, cfg: GenerationConfig, batch: BatchConfig, out_dir: str,
                 load_stage1: bool) -> None:
        from ttm_ray.inference.generate import TwoStageGenerator

        self.cfg, self.batch, self.out_dir = cfg, batch, Path(out_dir)
        self.generator = TwoStageGenerator(cfg, load_stage1=load_stage1)
        self.frames = self.generator.stage2.frames

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for row in rows:
            payload = json.loads(row["payload"])
            results += self._item(row["item_id"], payload)
        return [{"item_id": r["item_id"], "payload": json.dumps(r, default=str)}
                for r in results]

    def _item(self, item_id: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        variants = payload["variants"]
        if "error" in payload:
            return [{**payload["error"], "variant": v} for v in variants]
        response = payload["annotation"]
        if response.get("status") != "ok":
            return [failure(item_id, v, str(response.get("reject_reason")),
                            str(response.get("reject_detail") or "")) for v in variants]
        try:
            item = _item(payload)
            pixels = load_pixels(item, self.frames, self.batch.fps)
        except Exception as exc:
            return [failure(item_id, v, "unreadable_input", f"{type(exc).__name__}: {exc}")
                    for v in variants]
        out = []
        for v in variants:
            start = time.perf_counter()
            try:
                inp = variant_input(v, response, pixels.image, int(payload["seed"]),
                                    self.batch.harness, payload.get("donor"))
                result = self.generator.generate(inp)
                folder = write_outputs(self.out_dir / v, result, self.cfg.fps,
                                       self.cfg.overlay_alpha,
                                       extra={"variant": v, "item": payload["item"]})
            except AnnotationRejected as exc:
                out.append(failure(item_id, v, exc.reason, exc.detail))
                continue
            except Exception:
                out.append(failure(item_id, v, "generation_failed",
                                   traceback.format_exc(limit=6)))
                continue
            out.append({"item_id": item_id, "variant": v, "status": "generated",
                        "dir": str(folder), "objects": len(result.record["objects"]),
                        "seconds": round(time.perf_counter() - start, 3)})
        return out


# ----------------------------------------------------------------------------- running
def _decode(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(r["payload"]) for r in rows]


def run_local(plan_: Plan, cfg: GenerationConfig, batch: BatchConfig, out_dir: str | Path,
              annotator_factory: Callable[[], Annotator], frames: int,
              load_stage1: bool = True) -> list[dict[str, Any]]:
    """Both workers in this process (one image, small sets, tests)."""
    if not plan_.rows:
        return []
    annotated = AnnotateWorker(annotator_factory, frames, batch.fps)(plan_.rows)
    return _decode(GenerateWorker(cfg, batch, str(out_dir), load_stage1)(annotated))


def run_ray(plan_: Plan, cfg: GenerationConfig, batch: BatchConfig, out_dir: str | Path,
            annotator_factory: Callable[[], Annotator], frames: int,
            resources: InferenceResources, load_stage1: bool = True,
            progress: bool = True, capacity_timeout_s: float = 900.0) -> list[dict[str, Any]]:
    """The same workers on Ray Data actor pools (streaming; placement from ``resources``).
    ``capacity_timeout_s``: how long an autoscaling cluster gets to add the pools' nodes
    (``run.capacity_timeout_s``); a fixed one that cannot hold them fails at once."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if not plan_.rows:
        return []
    ensure_capacity(capacity_bundles(resources), timeout_s=capacity_timeout_s,
                    what="generate")
    DataContext.get_current().enable_progress_bars = progress
    # One block per item (up to 200) straight from the driver: no shuffle task that would
    # need a CPU the two actor pools may be holding.
    ds = ray.data.from_items(plan_.rows, override_num_blocks=max(1, min(len(plan_.rows), 200)))
    for worker, args, res in (
            (AnnotateWorker, (annotator_factory, frames, batch.fps), resources.annotate),
            (GenerateWorker, (cfg, batch, str(out_dir), load_stage1), resources.generate)):
        ds = ds.map_batches(_Rows, fn_constructor_args=(worker, args),
                            compute=ActorPoolStrategy(min_size=res.min_actors,
                                                      max_size=res.max_actors),
                            batch_size=res.batch_size, batch_format="pyarrow",
                            **ray_remote_args(res))
    return _decode(ds.take_all())


def capacity_bundles(resources: InferenceResources) -> list[dict[str, float]]:
    """The two pools' minimum actors as bundles: Ray Data starts them up front and would
    otherwise wait forever for the second pool on a cluster that cannot hold both."""
    return [stage_bundle(r) for r in (resources.annotate, resources.generate)
            for _ in range(r.min_actors)]


class _Rows:
    """Adapts a worker over ``list[dict]`` to Ray Data's Arrow batches."""

    def __init__(self, worker: type, args: tuple) -> None:
        self.worker = worker(*args)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        out = self.worker(batch.to_pylist())
        return pa.Table.from_pylist(out, schema=pa.schema([("item_id", pa.string()),
                                                            ("payload", pa.string())]))


def record_results(out_dir: str | Path, results: list[dict[str, Any]],
                   planned_failures: list[dict[str, Any]]) -> dict[str, Any]:
    """Append this run's results and failures to ``results.jsonl`` / ``failures.jsonl`` and
    summarize (generated, failed by reason)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    failures = planned_failures + [r for r in results if r["status"] != "generated"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for name, rows in ((RESULTS, results), (FAILURES, failures)):
        if rows:
            with (out / name).open("a") as f:
                for r in rows:
                    f.write(json.dumps({**r, "run_at": stamp}, default=str) + "\n")
    generated = [r for r in results if r["status"] == "generated"]
    return {"generated": len(generated), "failed": len(failures),
            "failed_by_reason": dict(Counter(r["reason"] for r in failures))}


__all__ = ["FAILURES", "RESULTS", "AnnotateWorker", "BatchConfig", "GenerateWorker",
           "InferenceResources", "Plan", "capacity_bundles", "failure", "plan",
           "record_results", "run_local", "run_ray"]
