"""The image-understanding front-end of inference: data prep's stages run on one image.

Two-stage generation needs, for an input image and its prompt, the motion prompt c_motion,
the per-object prompts c_local and the first-frame masks s0 (appendix sec. 9). Those are
exactly what the curation pipeline computes for a clip, so :class:`ImageAnnotator` runs the
same stage classes on a one-frame "clip" (an image opens as a one-frame video):

* prompts: given with the item ("manual") -> copied (manifest mode); else the LLM
  (:class:`~data_prep.stages.prompts.PromptStage`, the Fig. 11/12 templates, strict parsing,
  retries). ``want_llm`` asks the LLM even when prompts were given (the "GT + LLM" setting
  of the failure-case harness), stored as ``llm_c_motion`` / ``llm_c_local``.
* masks: ``sam2`` (Grounding DINO boxes on the image, then SAM2) or ``gt`` (an SA-V-format
  annotation given with the item: a user trajectory, or the benchmark's GT masklets).

It implements the request/response contract of :mod:`ttm_ray.inference.annotation`; a row
the stages reject comes back ``status: rejected`` with data prep's reason, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from data_prep.engines.base import TextEngine
from data_prep.engines.manifest_engine import MANIFEST
from data_prep.rows import is_rejected, new_row
from data_prep.stages.ground import GroundingConfig
from data_prep.stages.gt_masks import GtMasksConfig
from data_prep.stages.prompts import PromptConfig, PromptStage
from data_prep.stages.segment import SegmentConfig
from ttm_ray.config import constrained

RowStage = Any  # a callable list[dict] -> list[dict] (data prep's stage protocol)


@dataclass
class AnnotateConfig:
    """Section ``annotate:`` of the generate / evaluate jobs."""

    prompts: PromptConfig = field(default_factory=PromptConfig)
    mask_source: Literal["sam2", "gt"] = constrained(
        "sam2", help="sam2: Grounding DINO boxes + SAM2 on the image; gt: the SA-V-format "
                     "annotation given with each item (annotation / --trajectory)")
    ground: GroundingConfig = field(default_factory=GroundingConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    gt_masks: GtMasksConfig = field(default_factory=GtMasksConfig)

    def check_models(self, need_llm: bool) -> None:
        """Model folders the chosen front-end needs exist (ValueError naming the key)."""
        if self.mask_source == "sam2":
            self.ground.require_model_path()
            self.segment.require_checkpoint()
        if need_llm and self.prompts.engine.kind == MANIFEST:
            raise ValueError("annotate.prompts.engine.kind is 'manifest' but some items give "
                             "no prompts (or the gt_llm variant asks for LLM prompts): set it "
                             "to 'transformers' or 'vllm' with annotate.prompts.engine."
                             "model_path")


def request_to_row(req: dict[str, Any]) -> dict[str, Any]:
    """An annotation request -> a data-prep row of a one-"clip" video (the image)."""
    objects = req.get("object_prompts")
    motion = req.get("motion_prompt")
    if not motion and not req.get("need_motion", True):
        # Stage 1 will not run (a given trajectory): c_motion is never read, so the caption
        # stands in rather than asking an LLM for a prompt nobody uses.
        motion = req["caption"]
    return new_row(
        video_id=str(req["item_id"]), clip_id=str(req["item_id"]),
        source_uri=str(req["source_uri"]), frame_indices=list(req.get("frame_indices") or [0]),
        caption=req["caption"], given_caption=req["caption"],
        given_motion_prompt=motion,
        given_object_prompts=[dict(o) for o in objects] if objects is not None else None,
        annotation_uri=req.get("annotation_uri"))


def _has_given_prompts(req: dict[str, Any]) -> bool:
    motion = bool((req.get("motion_prompt") or "").strip()) or not req.get("need_motion", True)
    return motion and req.get("object_prompts") is not None


class ImageAnnotator:
    """Requests -> responses (see :mod:`ttm_ray.inference.annotation`). Models load lazily,
    once, on first use: an item set with given prompts never loads the LLM."""

    def __init__(self, cfg: AnnotateConfig, engine: TextEngine | None = None,
                 sam2_predictor: Any = None) -> None:
        """``engine`` / ``sam2_predictor``: already built models to reuse (as the stages
        themselves accept); by default they are built from the config on first use."""
        self.cfg = cfg
        self._engine = engine
        self._predictor = sam2_predictor
        manual = replace(cfg.prompts, engine=replace(cfg.prompts.engine, kind=MANIFEST))
        self._manual = PromptStage(manual)
        self._llm: PromptStage | None = None
        self._masks: list[RowStage] | None = None

    # ------------------------------------------------------------------ lazy stages
    def llm(self) -> PromptStage:
        if self._llm is None:
            if self.cfg.prompts.engine.kind == MANIFEST and self._engine is None:
                raise ValueError("annotate.prompts.engine.kind is 'manifest': items without "
                                 "given prompts need an LLM engine (transformers or vllm)")
            cfg = self.cfg.prompts
            if self._engine is not None and cfg.engine.kind == MANIFEST:
                # an injected engine stands for the model the config would name
                cfg = replace(cfg, engine=replace(cfg.engine, kind="transformers"))
            self._llm = PromptStage(cfg, engine=self._engine)
        return self._llm

    def mask_stages(self) -> list[RowStage]:
        if self._masks is None:
            if self.cfg.mask_source == "gt":
                from data_prep.stages.gt_masks import GtMasksStage

                self._masks = [GtMasksStage(self.cfg.gt_masks)]
            else:
                from data_prep.stages.ground import GroundingStage
                from data_prep.stages.segment import SegmentStage

                self._masks = [GroundingStage(self.cfg.ground),
                               SegmentStage(self.cfg.segment, predictor=self._predictor)]
        return self._masks

    # ------------------------------------------------------------------ the call
    def __call__(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = [request_to_row(r) for r in requests]
        given = [i for i, r in enumerate(requests) if _has_given_prompts(r)]
        asked = [i for i in range(len(rows)) if i not in set(given)]
        for indices, stage_fn in ((given, lambda: self._manual), (asked, self.llm)):
            if indices:
                done = stage_fn()([rows[i] for i in indices])
                for i, row in zip(indices, done, strict=True):
                    rows[i] = row
        llm_answers: dict[int, dict[str, Any]] = {}
        want = [i for i in given if requests[i].get("want_llm") and not is_rejected(rows[i])]
        if want:
            again = self.llm()([request_to_row(requests[i]) for i in want])
            llm_answers = dict(zip(want, again, strict=True))
        ok = [i for i, r in enumerate(rows) if not is_rejected(r)]
        batch = [rows[i] for i in ok]
        for stage in (self.mask_stages() if batch else []):
            batch = stage(batch)
        for i, row in zip(ok, batch, strict=True):
            rows[i] = row
        return [self._response(req, row, llm_answers.get(i), i in set(given))
                for i, (req, row) in enumerate(zip(requests, rows, strict=True))]

    @staticmethod
    def _response(req: dict[str, Any], row: dict[str, Any], llm: dict[str, Any] | None,
                  given: bool) -> dict[str, Any]:
        out = {**req, "status": row["status"], "reject_reason": row.get("reject_reason"),
               "reject_detail": row.get("reject_detail"), "reject_stage": row.get("reject_stage"),
               "c_motion": row.get("c_motion"), "c_local": row.get("c_local"),
               "prompt_source": "given" if given else "llm", "masks": row.get("masks"),
               "mask_source": row.get("mask_source"),
               "prompts_model": row.get("prompts_model")}
        if llm is not None:
            out.update(llm_c_motion=llm.get("c_motion"), llm_c_local=llm.get("c_local"),
                       llm_status=llm["status"], llm_reject_reason=llm.get("reject_reason"))
        return out


__all__ = ["AnnotateConfig", "ImageAnnotator", "request_to_row"]
