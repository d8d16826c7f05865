"""Score: the quality scores the filters read, stored per clip so thresholds can change later.

Temporal consistency (the omega score, see the method notes): CLIP image embeddings of the
clip's sampled frames, cosine similarity of each consecutive pair; ``score_temporal_min`` is
the minimum (what ``filter.omega`` thresholds: it catches scene cuts and flashes that a mean
would dilute), ``score_temporal_mean`` the mean (the CLIPFrame metric), ``score_model`` which
model produced them.

Trajectory quality, per object of the ``masks`` column (at source resolution):
``persistence`` (fraction of sampled frames with a non-empty mask), ``centroid_motion`` (mean
centroid displacement per frame over the visible span, divided by the frame diagonal),
``motion_iou_gap`` (1 - IoU of the first and last visible masks) and ``track_confidence``
(kept from an earlier stage's ``object_scores``; null unless one gave it). No masks (null):
``object_scores`` stays null and only temporal scores are computed.

CLIP loads from a local folder (``clip_model_path``: a ``CLIPModel`` or
``CLIPVisionModelWithProjection`` checkpoint with its ``CLIPImageProcessor``); there is no
model hub. Frames are decoded in chunks and shrunk right away, so a 128-frame 1080p clip never
sits in memory whole; embeddings of several clips share forward passes of ``batch_size``.
Rejects: ``unreadable_input`` / ``unreadable_video`` (frames do not decode), ``stage_error``.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data_prep.rows import is_rejected, reject
from ttm_ray.config import constrained
from ttm_ray.dataset.rle import decode_mask
from ttm_ray.dataset.video import InputNotReadable, Video, VideoReadError, resize_center_crop

STAGE = "score"
CONFIG_KEY = "score"  # where ScoreConfig sits in the prep config (for error messages)


@dataclass
class ScoreConfig:
    enabled: bool = constrained(True, help="false: the stage passes rows through unscored")
    temporal: bool = constrained(
        True, help="compute the CLIP temporal scores (needs clip_model_path); false: only "
        "trajectory scores, no model")
    clip_model_path: str | None = constrained(
        None, help="local folder of a CLIP checkpoint (CLIPModel or "
        "CLIPVisionModelWithProjection) and its CLIPImageProcessor")
    model_name: str | None = constrained(
        None, help="recorded in score_model; null: 'clip:<folder name of clip_model_path>'")
    device: str = constrained(
        "auto", nonempty=True, help="torch device for CLIP; auto: cuda if available, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = constrained(
        "auto", help="CLIP weights/activations; auto: float16 on cuda, float32 on cpu")
    batch_size: int = constrained(64, gt=0, help="frames per CLIP forward pass")
    read_chunk: int = constrained(
        32, gt=0, help="frames decoded at once per clip (bounds memory for long 1080p clips)")

    def require_model_path(self) -> Path:
        """The CLIP folder, or a ValueError naming the config key (checked before any work)."""
        key = f"{CONFIG_KEY}.clip_model_path"
        if not self.clip_model_path:
            raise ValueError(
                f"{key} is not set: the temporal (omega) score needs a local CLIP checkpoint "
                f"folder; set {key}, or {CONFIG_KEY}.temporal: false to skip it")
        path = Path(self.clip_model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"{key}: {str(path)!r} is not a model folder (no config.json)")
        return path

    def score_model(self) -> str:
        if self.model_name:
            return self.model_name
        return f"clip:{Path(self.clip_model_path or '').expanduser().resolve().name}"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------- pure scores
def temporal_consistency(embeddings: Any) -> tuple[float | None, float | None]:
    """``(min, mean)`` cosine similarity of consecutive rows of ``embeddings`` ``[T, D]``.

    Fewer than two frames have no consecutive pair: ``(None, None)``.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"expected [T, D] embeddings, got shape {e.shape}")
    if e.shape[0] < 2:
        return None, None
    # Zero vectors would divide by zero; they have no direction, so count them as dissimilar.
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sims = (e[:-1] * e[1:]).sum(axis=1)
    return float(sims.min()), float(sims.mean())


def _centroid(mask: np.ndarray, area: int) -> tuple[float, float]:
    # Row/column sums instead of np.nonzero: no index arrays for large masks.
    ys = mask.sum(axis=1, dtype=np.int64)
    xs = mask.sum(axis=0, dtype=np.int64)
    return (float(ys @ np.arange(ys.size)) / area, float(xs @ np.arange(xs.size)) / area)


def trajectory_scores(masks: Iterable[np.ndarray]) -> dict[str, float | None]:
    """``persistence``, ``centroid_motion`` and ``motion_iou_gap`` of one object's masks.

    ``masks``: the object's mask in every sampled frame (a ``[T, H, W]`` array or any iterable
    of ``[H, W]`` arrays; consumed frame by frame, so a generator keeps memory at one frame).

    * persistence: visible frames / all frames (0.0 when there are no frames: None).
    * centroid_motion: the path length of the centroid over the visible frames (consecutive
      visible frames joined) divided by the number of frames between the first and the last
      visible one, over the frame diagonal. A frame gap counts as several steps, so an object
      hidden for a while is not credited with a jump.
    * motion_iou_gap: ``1 - IoU(first visible mask, last visible mask)``.

    The two motion scores need two visible frames; below that they are None.
    """
    frames = 0
    visible: list[int] = []
    path = 0.0
    prev: tuple[float, float] | None = None
    first: np.ndarray | None = None
    last: np.ndarray | None = None
    diag = 1.0
    for t, m in enumerate(masks):
        m = np.asarray(m).astype(bool, copy=False)
        frames += 1
        diag = math.hypot(*m.shape)
        area = int(m.sum())
        if not area:
            continue
        c = _centroid(m, area)
        if prev is not None:
            path += math.dist(prev, c)
        prev = c
        visible.append(t)
        if first is None:
            first = m.copy()
        last = m
    if not frames:
        return {"persistence": None, "centroid_motion": None, "motion_iou_gap": None}
    scores: dict[str, float | None] = {"persistence": len(visible) / frames,
                                       "centroid_motion": None, "motion_iou_gap": None}
    if len(visible) >= 2 and first is not None and last is not None:
        scores["centroid_motion"] = path / (visible[-1] - visible[0]) / diag
        union = int(np.logical_or(first, last).sum())
        scores["motion_iou_gap"] = 1.0 - int(np.logical_and(first, last).sum()) / union
    return scores


def object_scores(row: dict) -> list[dict] | None:
    """Per-object scores of a row's ``masks`` (RLE decoded one frame at a time)."""
    objects = row.get("masks")
    if objects is None:
        return None
    given = {s.get("name"): s.get("track_confidence") for s in row.get("object_scores") or []}
    out = []
    for obj in objects:
        rles = obj.get("rle") or []
        scores = trajectory_scores(decode_mask(r) for r in rles)
        out.append({"name": obj.get("name"), **scores,
                    "track_confidence": given.get(obj.get("name"))})
    return out


# ----------------------------------------------------------------------------- CLIP
def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_clip(path: str | Path, device: str, dtype: str = "auto") -> tuple[Any, Any]:
    """``(vision model with projection, image processor)`` from a local folder, in eval mode.

    A full ``CLIPModel`` checkpoint loads only its vision tower: the vision config does not
    carry the shared ``projection_dim``, so it is copied over (else the projection would be
    re-initialised at the default 512 width, or refuse to load).
    """
    import torch
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
    elif config.model_type == "clip_vision_model":
        vision = config
    else:
        raise ValueError(f"{path}: a CLIP checkpoint is needed, found model_type "
                         f"{config.model_type!r}")
    device = resolve_device(device)
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    # Loading the vision tower of a full CLIPModel leaves the text weights unused on purpose;
    # transformers would print a table of them per worker, so hush it for this one load.
    with quiet_transformers():
        model = CLIPVisionModelWithProjection.from_pretrained(
            path, config=vision, dtype=getattr(torch, dtype), local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


def _short_side(processor: Any) -> int:
    """The side the processor resizes to (``shortest_edge``, else its largest target side)."""
    size = processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    short = get("shortest_edge")
    if short:
        return int(short)
    return int(max(get("height") or 0, get("width") or 0)) or 224


class ClipEmbedder:
    """Frames -> L2-normalised CLIP image embeddings, ``float32 [N, D]`` numpy."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model, processor
        self.short = _short_side(processor)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def shrink(self, frames: np.ndarray) -> np.ndarray:
        """Downscale (aspect kept) so the shorter side is the processor's resize target.

        The processor then only crops and normalises: the same geometry as letting it resize,
        but an antialiased torch resize instead of resizing 1080p frames in the processor, and
        a chunk of small frames is all that is kept per clip.
        """
        h, w = frames.shape[1:3]
        if min(h, w) <= self.short:
            return frames
        scale = self.short / min(h, w)
        return resize_center_crop(frames, max(self.short, round(h * scale)),
                                  max(self.short, round(w * scale)))

    def pixels(self, frames: np.ndarray) -> Any:
        return self.processor(images=list(self.shrink(frames)), return_tensors="pt")[
            "pixel_values"]

    def embed(self, pixel_values: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
            emb = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        return emb.cpu().numpy()


def iter_frames(row: dict, chunk: int) -> Iterator[np.ndarray]:
    """The clip's sampled frames (source resolution), ``chunk`` frames at a time."""
    indices = [int(i) for i in row.get("frame_indices") or []]
    with Video(row["source_uri"]) as video:
        for i in range(0, len(indices), chunk):
            yield video.read(indices[i:i + chunk])


class ScoreStage:
    """Rows in, the same rows with scores out; rejected rows pass through untouched."""

    def __init__(self, cfg: ScoreConfig | None = None) -> None:
        self.cfg = cfg or ScoreConfig()
        self.embedder: ClipEmbedder | None = None
        if self.cfg.enabled and self.cfg.temporal:
            path = self.cfg.require_model_path()
            self.embedder = ClipEmbedder(*load_clip(path, self.cfg.device, self.cfg.dtype))
            self.model_name = self.cfg.score_model()

    def __call__(self, rows: list[dict]) -> list[dict]:
        if not self.cfg.enabled:
            return list(rows)
        out: list[dict] = list(rows)
        batcher = _Batcher(self.embedder, self.cfg.batch_size) if self.embedder else None
        todo: list[int] = []  # positions of rows waiting for their CLIP embeddings
        try:
            for k, row in enumerate(rows):
                if is_rejected(row):
                    continue
                try:
                    out[k] = dict(row, object_scores=object_scores(row))
                    if batcher is not None:
                        for frames in iter_frames(row, self.cfg.read_chunk):
                            batcher.add(k, batcher.embedder.pixels(frames))
                        todo.append(k)
                except _ModelError:
                    raise
                except Exception as exc:
                    if batcher is not None:
                        batcher.drop(k)
                    out[k] = _row_error(row, exc)
            if batcher is not None:
                batcher.flush()
        except _ModelError as exc:
            # The model failed (OOM, broken checkpoint): no row of this batch has its scores.
            for k, row in enumerate(rows):
                if not is_rejected(row) and not is_rejected(out[k]):
                    out[k] = reject(out[k], STAGE, "stage_error", exc.detail)
            return out
        for k in todo:
            lo, mean = temporal_consistency(batcher.result(k))  # type: ignore[union-attr]
            out[k] = dict(out[k], score_temporal_min=lo, score_temporal_mean=mean,
                          score_model=self.model_name)
        return out


def _row_error(row: dict, exc: Exception) -> dict:
    if isinstance(exc, InputNotReadable):
        return reject(row, STAGE, "unreadable_input", str(exc))
    if isinstance(exc, VideoReadError):
        return reject(row, STAGE, "unreadable_video", str(exc))
    # A bug: reject this clip only, keep the rest of the batch.
    return reject(row, STAGE, "stage_error", traceback.format_exc(limit=8))


class _ModelError(RuntimeError):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _Batcher:
    """Pixel chunks of several clips -> forward passes of ``batch_size`` frames.

    Short clips share passes (16-frame clips would leave a GPU mostly idle one by one), and at
    most ``batch_size`` + one read chunk of frames wait in memory, however long the clips.
    """

    def __init__(self, embedder: ClipEmbedder, batch_size: int) -> None:
        self.embedder, self.batch_size = embedder, batch_size
        self.pending: list[tuple[int, Any]] = []
        self.done: dict[int, list[np.ndarray]] = {}

    def add(self, key: int, pixels: Any) -> None:
        self.pending.append((key, pixels))
        self.done.setdefault(key, [])
        if sum(int(p.shape[0]) for _, p in self.pending) >= self.batch_size:
            self.flush()

    def drop(self, key: int) -> None:
        self.pending = [(k, p) for k, p in self.pending if k != key]
        self.done.pop(key, None)

    def flush(self) -> None:
        import torch

        if not self.pending:
            return
        keys = [k for k, p in self.pending for _ in range(int(p.shape[0]))]
        pixels = torch.cat([p for _, p in self.pending])
        self.pending = []
        try:
            emb = np.concatenate([self.embedder.embed(pixels[i:i + self.batch_size])
                                  for i in range(0, pixels.shape[0], self.batch_size)])
        except Exception as exc:
            raise _ModelError(traceback.format_exc(limit=8)) from exc
        for key, e in zip(keys, emb, strict=True):
            self.done[key].append(e)

    def result(self, key: int) -> np.ndarray:
        rows = self.done.get(key) or []
        return np.stack(rows) if rows else np.zeros((0, 1), np.float32)


__all__ = ["ClipEmbedder", "ScoreConfig", "ScoreStage", "load_clip", "object_scores",
           "temporal_consistency", "trajectory_scores"]
