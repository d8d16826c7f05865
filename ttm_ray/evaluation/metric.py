"""What an evaluation metric declares about itself, so one description drives everything.

A metric module (:mod:`~ttm_ray.evaluation.fvd`, :mod:`~ttm_ray.evaluation.clipframe`, ...)
defines one :class:`Metric` and :mod:`ttm_ray.evaluation.registry` lists it. The config's
name check, the :class:`~ttm_ray.evaluation.config.Evaluator` (what to load, what each video
must have, how to score and aggregate), the report (column, decimals) and the evaluate job
(which metrics need reference videos) all read these fields instead of naming metrics.

The metric's backbone is loaded by the ``EvaluationConfig`` section named by
:attr:`Metric.section` (``section.build(device, allow_random_init, key)``), once per
section: ViCLIP-T and ViCLIP-V share one loaded model. :attr:`Metric.build` turns that
backbone into a :class:`Scorer` - a thin adapter over the backbone's own API, which stays as
it is for direct use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Batch:
    """One chunk of a benchmark, decoded once for every metric (``[T, H, W, 3]`` uint8).

    ``references`` is empty unless an enabled metric needs them (decoding is not free);
    ``captions`` holds ``str(item.caption)`` for every item.
    """

    video_ids: list[str]
    videos: list[np.ndarray]
    references: list[np.ndarray]
    captions: list[str]


@runtime_checkable
class Scorer(Protocol):
    """A metric with its backbone loaded.

    ``score`` returns one value per item of the batch: the item's metric value for a
    per-item metric (written to the per-video table), or whatever the set-level aggregate
    needs (e.g. FVD's feature pairs). ``aggregate`` reduces the values of one subset to the
    table's number (None: not defined, e.g. FVD below two videos).
    """

    name: str  # the backbone that computed it, listed under every table

    def score(self, batch: Batch) -> Sequence[Any]: ...

    def aggregate(self, values: list[Any], subset: str) -> float | None: ...


def mean_of(values: list[Any]) -> float | None:
    """Mean over the items that have a value (a one-frame video has no CLIPFrame or AD)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


@dataclass
class PerItemScorer:
    """A per-item :class:`Scorer` from a batch function; the subset value is the mean."""

    name: str
    fn: Callable[[Batch], Sequence[float | None]]

    def score(self, batch: Batch) -> list[float | None]:
        return [None if v is None else float(v) for v in self.fn(batch)]

    def aggregate(self, values: list[Any], subset: str) -> float | None:
        return mean_of(values)


@dataclass(frozen=True)
class Metric:
    """An evaluation metric's self-description (see the module docstring)."""

    name: str  # config value, CSV column, JSON / MLflow key
    label: str  # report column and backbone listing, e.g. "FVD"
    decimals: int  # Markdown tables; CSV keeps full precision
    # None: neither direction is better (AD measures the amount of motion).
    higher_is_better: bool | None
    # EvaluationConfig field whose .build(device, allow_random_init, key) loads the
    # backbone; None: the metric needs no backbone (build gets None).
    section: str | None
    build: Callable[[Any], Scorer]  # loaded backbone -> scorer
    needs_reference: bool = False  # every item needs a reference video
    needs_caption: bool = False  # every item needs a non-empty caption
    # Aggregated over a whole subset (FVD compares two distributions): no per-video value.
    set_level: bool = False

    @property
    def column(self) -> str:
        """Table header: the label with an arrow saying which way is better."""
        if self.higher_is_better is None:
            return self.label
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"

    def format(self, value: Any) -> str:
        return "–" if value is None else f"{value:.{self.decimals}f}"


__all__ = ["Batch", "Metric", "PerItemScorer", "Scorer", "mean_of"]
