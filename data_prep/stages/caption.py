"""Caption: the global prompt ``c`` of each clip, from its first, middle and last frames.

The paper captions SA-V clips with Llama-3.2-11B-Vision from those three frames; the
production config serves Qwen2.5-VL-7B-Instruct on vLLM instead, since current vLLM no longer
serves Llama-3.2-Vision (which stays available through the transformers engine). By default
the frames go side by side in one image (``frames: grid``), because Llama-3.2-Vision is
trained on one image per prompt and the production config allows one image per prompt;
``separate`` sends three images (for VLMs and limits that take several).

Manifest mode (``engine.kind: manifest``) copies ``given_caption`` instead. Rejects:
``caption_failed`` (the model answered but never usably, or no given caption: permanent),
``engine_error`` (the engine failed on every attempt: transient), and the shared reasons of
:func:`~data_prep.rows.reason_for` when the frames cannot be read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from data_prep.engines import EngineConfig, build_engine
from data_prep.engines.base import ChatRequest, EngineError, TextEngine, generate_safely
from data_prep.engines.manifest_engine import MANIFEST, ManifestMissing, given_caption
from data_prep.parsing import LlmParseError, parse_caption
from data_prep.prompts import Template, load_template
from data_prep.rows import is_rejected, reject, reject_error
from ttm_ray.config import constrained
from ttm_ray.dataset.video import read_frames

STAGE = "caption"
FrameLayout = Literal["grid", "separate"]

#: What the model is told about the images (the template's ``{frames}``). Part of the prompt,
#: so the layout is recorded with the template in ``caption_prompt_version``.
LAYOUT_TEXT: dict[str, str] = {
    "grid": "The image shows three frames of one video clip side by side, from left to "
            "right: the first, the middle and the last frame.",
    "separate": "The three images are the first, the middle and the last frame of one video "
                "clip, in this order.",
}
_RAW_KEEP = 1500  # characters of each raw answer kept in reject_detail


@dataclass
class CaptionConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    template: str = constrained("caption_v1", nonempty=True, help="prompt template file stem")
    frames: Literal["grid", "separate"] = constrained(
        "grid", help="grid: first/middle/last frame side by side in one image; separate: 3 images"
    )
    image_size: int = constrained(
        448, ge=32, help="each frame is resized so its longer side has this many pixels"
    )
    max_attempts: int = constrained(
        2, ge=1, help="tries per clip; retries (after an empty answer or an engine error) "
        "sample with a new seed"
    )

    def validate(self) -> None:
        template = load_template(self.template)  # TemplateError is a ValueError
        if template.placeholders != {"frames"}:
            raise ValueError(
                f"template {self.template!r} must have exactly the field {{frames}}, "
                f"has {sorted(template.placeholders)}"
            )


def pick_frames(frame_indices: list[int]) -> list[int]:
    """First, middle and last of the clip's sampled frames (source frame indices)."""
    idx = [int(i) for i in frame_indices]
    return [idx[0], idx[len(idx) // 2], idx[-1]]


def fit_long_side(frame: np.ndarray, size: int) -> np.ndarray:
    """``frame`` resized (aspect kept) so its longer side is ``size`` pixels."""
    from PIL import Image

    h, w = frame.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new == (w, h):
        return frame
    return np.asarray(Image.fromarray(frame).resize(new, Image.Resampling.BICUBIC))


def frame_images(frames: np.ndarray, layout: FrameLayout, size: int) -> list[np.ndarray]:
    """The images sent to the VLM: one grid (frames left to right) or one image per frame."""
    resized = [fit_long_side(f, size) for f in frames]
    if layout == "grid":
        return [np.ascontiguousarray(np.concatenate(resized, axis=1))]
    return resized


class CaptionStage:
    """Rows -> rows with ``caption`` (+ engine, model, prompt version) or a reject."""

    def __init__(self, cfg: CaptionConfig, engine: TextEngine | None = None) -> None:
        """``engine``: an already built engine (tests); by default built from ``cfg.engine``."""
        self.cfg = cfg
        self.manifest = cfg.engine.kind == MANIFEST
        self.engine: TextEngine | None = None
        self.template: Template | None = None
        self.prompt = ""
        if not self.manifest:
            self.template = load_template(cfg.template)
            self.prompt = self.template.format(frames=LAYOUT_TEXT[cfg.frames])
            self.engine = engine if engine is not None else build_engine(cfg.engine)

    @property
    def prompt_version(self) -> str | None:
        return f"{self.template.tag}/{self.cfg.frames}" if self.template else None

    def __call__(self, rows: list[dict]) -> list[dict]:
        out = list(rows)
        todo = [i for i, r in enumerate(out) if not is_rejected(r)]
        if self.manifest:
            for i in todo:
                out[i] = self._from_manifest(out[i])
        elif todo:
            self._caption(out, todo)
        return out

    def _from_manifest(self, row: dict) -> dict:
        try:
            caption = given_caption(row)
        except ManifestMissing as exc:
            return reject(row, STAGE, "caption_failed", str(exc))
        return {**row, "caption": caption, "caption_engine": MANIFEST, "caption_model": None,
                "caption_prompt_version": None}

    def _images(self, row: dict) -> list[np.ndarray]:
        return clip_images(row, self.cfg)

    def _caption(self, out: list[dict], todo: list[int]) -> None:
        assert self.engine is not None
        images: dict[int, list[np.ndarray]] = {}
        for i in todo:
            row = out[i]
            missing = missing_clip_reason(row)
            if missing:
                out[i] = reject(row, STAGE, "stage_error", missing)
                continue
            try:
                images[i] = self._images(row)
            except Exception as exc:  # one odd row must not take the batch down with it
                out[i] = reject_error(row, STAGE, exc, limit=6)

        history: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
        pending = list(images)
        for attempt in range(self.cfg.max_attempts):
            if not pending:
                break
            temperature, seed = self.cfg.engine.sampling_for(attempt)
            requests = [ChatRequest(user=self.prompt, images=images[i], temperature=temperature,
                                    seed=seed) for i in pending]
            answers = generate_safely(self.engine, requests)
            still = []
            for i, answer in zip(pending, answers, strict=True):
                caption = caption_attempt(history[i], attempt, answer)
                if caption is None:
                    still.append(i)
                else:
                    out[i] = self._done(out[i], caption)
            pending = still
        for i in pending:
            reason, detail = caption_failure(history[i])
            out[i] = reject(self._done(out[i], None), STAGE, reason, detail)

    def _done(self, row: dict, caption: str | None) -> dict:
        assert self.engine is not None
        return caption_fields(row, caption, self.engine.name, self.engine.model_id,
                              self.prompt_version)


# The pure steps of one clip's captioning, shared by CaptionStage and the Ray Data LLM
# processor (data_prep.engines.ray_llm), so both write the same fields and reject reasons.
def caption_prompt(cfg: CaptionConfig) -> tuple[str, str]:
    """``(user prompt, prompt version)`` for ``cfg``'s template and frame layout."""
    template = load_template(cfg.template)
    return template.format(frames=LAYOUT_TEXT[cfg.frames]), f"{template.tag}/{cfg.frames}"


def missing_clip_reason(row: dict) -> str | None:
    """Why ``row`` cannot be captioned (no clip yet), or None."""
    if not row.get("frame_indices") or not row.get("source_uri"):
        return ("row has no source_uri/frame_indices: the clip stage must run before the "
                "caption stage")
    return None


def clip_images(row: dict, cfg: CaptionConfig) -> list[np.ndarray]:
    """The images the VLM sees for ``row``'s clip (first, middle, last frame)."""
    frames = read_frames(row["source_uri"], pick_frames(row["frame_indices"]))
    return frame_images(frames, cfg.frames, cfg.image_size)


def caption_attempt(history: list[dict[str, Any]], attempt: int,
                    answer: str | EngineError) -> str | None:
    """The caption in ``answer`` (attempt ``attempt``, 0-based), or None after logging why
    it is unusable in ``history``."""
    if isinstance(answer, EngineError):
        history.append({"attempt": attempt + 1, "error": "engine_error", "message": str(answer)})
        return None
    try:
        return parse_caption(answer)
    except LlmParseError as exc:
        history.append({"attempt": attempt + 1, "error": exc.reason_code,
                        "message": exc.message, "raw": answer[:_RAW_KEEP]})
        return None


def caption_failure(history: list[dict[str, Any]]) -> tuple[str, str]:
    """``(reject reason, detail)`` of a clip no attempt captioned."""
    detail = json.dumps({"attempts": history}, ensure_ascii=False)
    # The model never answered: a fault of the run (transient). It answered, but nothing
    # usable: a rerun samples the same seeds again (permanent).
    never = all(h["error"] == "engine_error" for h in history)
    return ("engine_error" if never else "caption_failed"), detail


def caption_fields(row: dict, caption: str | None, engine: str, model: str,
                   prompt_version: str | None) -> dict:
    return {**row, "caption": caption, "caption_engine": engine, "caption_model": model,
            "caption_prompt_version": prompt_version}
