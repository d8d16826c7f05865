"""``EvaluationConfig`` -> ``Evaluator``: the paper's metrics over a benchmark's videos.

``Evaluator.evaluate(items)`` takes :class:`EvalItem` s (a generated video, its reference
video, caption and subset) from any iterable - a generator keeps memory at
``video_batch_size`` videos - and returns :class:`~ttm_ray.evaluation.report.EvaluationResults`:

* per video: CLIPFrame, ViCLIP-T (needs ``caption``), ViCLIP-V (needs ``reference``), AD;
  averaged per subset and over all videos;
* per subset and over all: FVD of the generated set against the reference set (needs
  ``reference``; None below two videos, where a covariance does not exist).

Every backbone is loaded in ``build()``, so a missing path fails before any video is read,
with the config key and the fix in the message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ttm_ray.config import constrained
from ttm_ray.evaluation.clipframe import ClipFrame, ClipFrameConfig
from ttm_ray.evaluation.displacement import Displacement, FlowConfig
from ttm_ray.evaluation.fvd import Fvd, FvdConfig, fvd_from_features
from ttm_ray.evaluation.report import METRICS, SUBSET_ALL, EvaluationResults
from ttm_ray.evaluation.viclip import ViClip, ViClipConfig
from ttm_ray.evaluation.video import VideoLike, to_uint8
from ttm_ray.evaluation.weights import CONFIG_KEY, resolve_device

log = logging.getLogger(__name__)

Metric = Literal["fvd", "clipframe", "viclip_t", "viclip_v", "ad"]
_NEED_REFERENCE = ("fvd", "viclip_v")


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
class EvaluationConfig:
    """Which metrics, on which device, with which backbones (each loaded from a local path)."""

    metrics: list[Metric] = constrained(  # noqa: RUF009 - returns a dataclasses.field
        default_factory=lambda: list(METRICS), nonempty=True,
        help="any of fvd, clipframe, viclip_t, viclip_v, ad; only the backbones of these are "
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

    def validate(self) -> None:
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics: listed twice in {self.metrics}")

    def build(self, key: str = CONFIG_KEY) -> Evaluator:
        """Load the backbones of the enabled metrics (errors name ``key.<section>.<field>``)."""
        self.validate()
        device = resolve_device(self.device)
        wanted = set(self.metrics)
        rand = self.allow_random_init
        clipframe = (self.clip.build(device, rand, f"{key}.clip")
                     if "clipframe" in wanted else None)
        viclip = (self.viclip.build(device, rand, f"{key}.viclip")
                  if wanted & {"viclip_t", "viclip_v"} else None)
        fvd = self.fvd.build(device, rand, f"{key}.fvd") if "fvd" in wanted else None
        ad = self.flow.build(device, rand, f"{key}.flow") if "ad" in wanted else None
        metrics = tuple(m for m in METRICS if m in wanted)
        return Evaluator(metrics, self.benchmark, clipframe=clipframe, viclip=viclip, fvd=fvd,
                         displacement=ad, video_batch_size=self.video_batch_size)


def _chunks(items: Iterable[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    chunk: list[EvalItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


class Evaluator:
    """The metrics of an :class:`EvaluationConfig`, backbones loaded."""

    def __init__(self, metrics: tuple[str, ...], benchmark: str, *,
                 clipframe: ClipFrame | None = None, viclip: ViClip | None = None,
                 fvd: Fvd | None = None, displacement: Displacement | None = None,
                 video_batch_size: int = 8) -> None:
        needed = {"clipframe": clipframe, "viclip_t": viclip, "viclip_v": viclip, "fvd": fvd,
                  "ad": displacement}
        missing = [m for m in metrics if needed.get(m) is None]
        if missing:
            raise ValueError(f"metrics {missing} have no backbone")
        self.metrics, self.benchmark = metrics, benchmark
        self.clipframe, self.viclip, self.fvd = clipframe, viclip, fvd
        self.displacement, self.video_batch_size = displacement, video_batch_size

    @property
    def backbones(self) -> dict[str, str]:
        named = {"fvd": self.fvd, "clipframe": self.clipframe, "viclip_t": self.viclip,
                 "viclip_v": self.viclip, "ad": self.displacement}
        return {m: named[m].name for m in self.metrics}  # type: ignore[union-attr]

    @property
    def need_reference(self) -> list[str]:
        return [m for m in self.metrics if m in _NEED_REFERENCE]

    def _check(self, item: EvalItem) -> None:
        """Fields the enabled metrics need, checked before a chunk is scored."""
        if self.need_reference and item.reference is None:
            raise ValueError(f"{item.video_id}: no reference video, which "
                             f"{self.need_reference} need")
        if "viclip_t" in self.metrics and not (item.caption or "").strip():
            raise ValueError(f"{item.video_id}: no caption, which viclip_t needs")

    def evaluate(self, items: Iterable[EvalItem]) -> EvaluationResults:
        per_video: list[dict[str, Any]] = []
        gen_feats: list[torch.Tensor] = []
        ref_feats: list[torch.Tensor] = []
        for chunk in _chunks(items, self.video_batch_size):
            for item in chunk:
                self._check(item)
            rows, gen, ref = self._score_chunk(chunk)
            per_video += rows
            gen_feats += gen
            ref_feats += ref
        return EvaluationResults(self.benchmark, self.metrics,
                                 self._aggregate(per_video, gen_feats, ref_feats),
                                 per_video, self.backbones)

    def _score_chunk(self, chunk: list[EvalItem]
                     ) -> tuple[list[dict[str, Any]], list[torch.Tensor], list[torch.Tensor]]:
        # Decode once; every metric converts from uint8 as it needs.
        videos = [to_uint8(it.video, name=it.video_id) for it in chunk]
        refs = ([to_uint8(it.reference, name=f"{it.video_id} reference") for it in chunk]
                if self.need_reference else [])
        rows: list[dict[str, Any]] = [{"video_id": it.video_id, "subset": it.subset}
                                      for it in chunk]
        if self.clipframe is not None:
            for row, v in zip(rows, videos, strict=True):
                row["clipframe"] = self.clipframe(v)
        if self.displacement is not None:
            for row, v in zip(rows, videos, strict=True):
                row["ad"] = self.displacement(v)
        if self.viclip is not None and "viclip_t" in self.metrics:
            sims = self.viclip.text_similarity(videos, [str(it.caption) for it in chunk])
            for row, s in zip(rows, sims, strict=True):
                row["viclip_t"] = float(s)
        if self.viclip is not None and "viclip_v" in self.metrics:
            sims = self.viclip.video_similarity(videos, refs)
            for row, s in zip(rows, sims, strict=True):
                row["viclip_v"] = float(s)
        gen: list[torch.Tensor] = []
        ref: list[torch.Tensor] = []
        if self.fvd is not None:
            gen = list(self.fvd.features(videos))
            ref = list(self.fvd.features(refs))
        return rows, gen, ref

    def _aggregate(self, per_video: list[dict[str, Any]], gen: list[torch.Tensor],
                   ref: list[torch.Tensor]) -> dict[str, dict[str, Any]]:
        order = list(dict.fromkeys(r["subset"] for r in per_video if r["subset"] is not None))
        out: dict[str, dict[str, Any]] = {}
        for subset in [*order, SUBSET_ALL]:
            idx = [i for i, r in enumerate(per_video)
                   if subset == SUBSET_ALL or r["subset"] == subset]
            values: dict[str, Any] = {"n_videos": len(idx)}
            for m in self.metrics:
                if m == "fvd":
                    values[m] = self._set_fvd([gen[i] for i in idx], [ref[i] for i in idx],
                                              subset)
                else:
                    values[m] = _mean([per_video[i].get(m) for i in idx])
            out[subset] = values
        return out

    @staticmethod
    def _set_fvd(gen: list[torch.Tensor], ref: list[torch.Tensor], subset: str
                 ) -> float | None:
        if len(gen) < 2:
            log.warning("FVD of subset %r: %d video(s), at least 2 are needed", subset,
                        len(gen))
            return None
        return fvd_from_features(torch.stack(gen), torch.stack(ref))


__all__ = ["EvalItem", "EvaluationConfig", "Evaluator", "Metric"]
