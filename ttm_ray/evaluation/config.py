"""``EvaluationConfig`` -> ``Evaluator``: the paper's metrics over a benchmark's videos.

``Evaluator.evaluate(items)`` takes :class:`EvalItem` s (a generated video, its reference
video, caption and subset) from any iterable - a generator keeps memory at
``video_batch_size`` videos - and returns :class:`~ttm_ray.evaluation.report.EvaluationResults`:

* per video: CLIPFrame, ViCLIP-T (needs ``caption``), ViCLIP-V (needs ``reference``), AD;
  averaged per subset and over all videos;
* per subset and over all: FVD of the generated set against the reference set (needs
  ``reference``; None below two videos, where a covariance does not exist).

Which metrics exist, what each needs and whether it is per video or per set is declared by
the metric itself and listed in :mod:`ttm_ray.evaluation.registry`; nothing here names one.
Every backbone is loaded in ``build()``, so a missing path fails before any video is read,
with the config key and the fix in the message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ttm_ray.config import constrained
from ttm_ray.evaluation import registry
from ttm_ray.evaluation.clipframe import ClipFrameConfig
from ttm_ray.evaluation.displacement import FlowConfig
from ttm_ray.evaluation.fvd import FvdConfig
from ttm_ray.evaluation.metric import Batch, Metric, Scorer
from ttm_ray.evaluation.report import SUBSET_ALL, EvaluationResults
from ttm_ray.evaluation.viclip import ViClipConfig
from ttm_ray.evaluation.video import VideoLike, to_uint8
from ttm_ray.evaluation.weights import CONFIG_KEY, resolve_device


@dataclass
class EvalItem:
    """One generated video of a benchmark (see :mod:`ttm_ray.evaluation.video` for what a
    video may be)."""

    video_id: str
    video: VideoLike
    reference: VideoLike | None = None
    caption: str | None = None
    subset: str | None = None  # e.g. "single-object" / "multi-object"; None: only in "all"


@dataclass
class ScoreSettings:
    """Section ``evaluation.score:``: how scoring runs (:mod:`ttm_ray.evaluation.scoring`).
    Where its actors run is the job's ``resources.score`` (a Ray Data row there is one chunk
    of ``evaluation.video_batch_size`` items; the local path scores the same chunks, so both
    give the same numbers)."""

    engine: Literal["auto", "ray", "local"] = constrained(
        "auto", help="ray: decode + score on Ray Data actor pools (the driver holds only "
                     "per-item values and FVD features); local: in this process (debugging); "
                     "auto: the job's `engine`, else ray when Ray is installed")
    progress_every: int = constrained(10, gt=0, help="log a progress line every N items")

    def resolved_engine(self, job_engine: str | None = None) -> str:
        if self.engine != "auto":
            return self.engine
        if job_engine in ("ray", "local"):
            return job_engine
        try:
            import ray  # noqa: F401
        except ImportError:
            return "local"
        return "ray"


@dataclass
class EvaluationConfig:
    """Which metrics, on which device, with which backbones (each loaded from a local path).

    Metric names are checked against :mod:`ttm_ray.evaluation.registry`; each metric's
    backbone settings are the section its :attr:`~ttm_ray.evaluation.metric.Metric.section`
    names (``clip``, ``viclip``, ``fvd``, ``flow``).
    """

    # A plain str list checked in validate(), not a Literal: the registry, not this type,
    # decides which names exist (a registered metric needs no edit here).
    metrics: list[str] = constrained(  # noqa: RUF009 - returns a dataclasses.field
        default_factory=lambda: list(registry.names()), nonempty=True,
        help=f"any of {', '.join(registry.names())}; only the backbones of these are "
             "loaded (and required)",
    )
    benchmark: str = constrained(
        "sa-v-128", nonempty=True, help="benchmark name for the tables; sa-v-128 puts the "
                                        "paper's numbers beside the single-object row")
    device: str = constrained("auto", nonempty=True,
                              help="torch device for every backbone; auto: cuda if available")
    video_batch_size: int = constrained(
        8, gt=0, help="videos decoded and scored together (bounds memory; per-backbone "
                      "batch sizes split the work further)")
    allow_random_init: bool = constrained(
        False, help="TESTS ONLY: a backbone without a path/weights gets random weights "
                    "instead of an error (all numbers are then meaningless)")
    clip: ClipFrameConfig = field(default_factory=ClipFrameConfig)
    viclip: ViClipConfig = field(default_factory=ViClipConfig)
    fvd: FvdConfig = field(default_factory=FvdConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    score: ScoreSettings = field(default_factory=ScoreSettings)

    def validate(self) -> None:
        known = registry.names()
        unknown = [f"metrics[{i}]: expected one of {', '.join(repr(n) for n in known)} "
                   f"(the registered metrics), got {json.dumps(m)}"
                   for i, m in enumerate(self.metrics) if m not in known]
        if unknown:
            raise ValueError("; ".join(unknown))
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics: listed twice in {self.metrics}")

    def build(self, key: str = CONFIG_KEY) -> Evaluator:
        """Load the backbones of the enabled metrics (errors name ``key.<section>.<field>``),
        each section once however many metrics read it."""
        self.validate()
        device = resolve_device(self.device)
        names = registry.in_table_order(self.metrics)
        backbones: dict[str | None, Any] = {None: None}
        scorers: dict[str, Scorer] = {}
        for name in names:
            metric = registry.get(name)
            if metric.section not in backbones:
                section = getattr(self, metric.section, None)
                if section is None:
                    raise ValueError(f"metric {name!r}: EvaluationConfig has no section "
                                     f"{metric.section!r} for its backbone")
                backbones[metric.section] = section.build(
                    device, self.allow_random_init, f"{key}.{metric.section}")
            scorers[name] = metric.build(backbones[metric.section])
        return Evaluator(names, self.benchmark, scorers,
                         video_batch_size=self.video_batch_size)


def _chunks(items: Iterable[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    chunk: list[EvalItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Evaluator:
    """The metrics of an :class:`EvaluationConfig`, backbones loaded.

    ``scorers``: metric name -> :class:`~ttm_ray.evaluation.metric.Scorer` for every name in
    ``metrics`` (what each needs and whether it is set-level comes from the registry).
    """

    def __init__(self, metrics: tuple[str, ...], benchmark: str,
                 scorers: dict[str, Scorer], *, video_batch_size: int = 8) -> None:
        missing = [m for m in metrics if scorers.get(m) is None]
        if missing:
            raise ValueError(f"metrics {missing} have no backbone")
        self.metrics, self.benchmark = tuple(metrics), benchmark
        self.specs: dict[str, Metric] = {m: registry.get(m) for m in self.metrics}
        self.scorers, self.video_batch_size = scorers, video_batch_size

    @property
    def backbones(self) -> dict[str, str]:
        return {m: self.scorers[m].name for m in self.metrics}

    @property
    def need_reference(self) -> list[str]:
        return [m for m in self.metrics if self.specs[m].needs_reference]

    @property
    def need_caption(self) -> list[str]:
        return [m for m in self.metrics if self.specs[m].needs_caption]

    def check_item(self, item: EvalItem) -> None:
        """Fields the enabled metrics need, checked before a chunk is scored."""
        if self.need_reference and item.reference is None:
            raise ValueError(f"{item.video_id}: no reference video, which "
                             f"{self.need_reference} need")
        need_caption = self.need_caption
        if need_caption and not (item.caption or "").strip():
            which = (f"{need_caption[0]} needs" if len(need_caption) == 1
                     else f"{need_caption} need")
            raise ValueError(f"{item.video_id}: no caption, which {which}")

    def evaluate(self, items: Iterable[EvalItem]) -> EvaluationResults:
        per_video: list[dict[str, Any]] = []
        # set-level metric -> one value per video (what its aggregate needs), in item order
        set_values: dict[str, list[Any]] = {m: [] for m in self.metrics
                                            if self.specs[m].set_level}
        for chunk in _chunks(items, self.video_batch_size):
            for item in chunk:
                self.check_item(item)
            rows, chunk_sets = self.score_chunk(chunk)
            per_video += rows
            for m, values in chunk_sets.items():
                set_values[m] += values
        return EvaluationResults(self.benchmark, self.metrics,
                                 self.aggregate(per_video, set_values),
                                 per_video, self.backbones)

    def score_chunk(self, chunk: list[EvalItem]
                     ) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
        # Decode once; every metric converts from uint8 as it needs.
        batch = Batch(
            video_ids=[it.video_id for it in chunk],
            videos=[to_uint8(it.video, name=it.video_id) for it in chunk],
            references=([to_uint8(it.reference, name=f"{it.video_id} reference")
                         for it in chunk] if self.need_reference else []),
            captions=[str(it.caption) for it in chunk])
        rows: list[dict[str, Any]] = [{"video_id": it.video_id, "subset": it.subset}
                                      for it in chunk]
        set_values: dict[str, list[Any]] = {}
        for m in self.metrics:
            values = list(self.scorers[m].score(batch))
            if len(values) != len(chunk):
                raise ValueError(f"metric {m}: {len(values)} values for {len(chunk)} videos")
            if self.specs[m].set_level:
                set_values[m] = values
            else:
                for row, v in zip(rows, values, strict=True):
                    row[m] = v
        return rows, set_values

    def aggregate(self, per_video: list[dict[str, Any]], set_values: dict[str, list[Any]]
                   ) -> dict[str, dict[str, Any]]:
        order = list(dict.fromkeys(r["subset"] for r in per_video if r["subset"] is not None))
        out: dict[str, dict[str, Any]] = {}
        for subset in [*order, SUBSET_ALL]:
            idx = [i for i, r in enumerate(per_video)
                   if subset == SUBSET_ALL or r["subset"] == subset]
            values: dict[str, Any] = {"n_videos": len(idx)}
            for m in self.metrics:
                kept = ([set_values[m][i] for i in idx] if self.specs[m].set_level
                        else [per_video[i].get(m) for i in idx])
                values[m] = self.scorers[m].aggregate(kept, subset)
            out[subset] = values
        return out


__all__ = ["EvalItem", "EvaluationConfig", "Evaluator", "ScoreSettings"]
