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
model hub. Loading and embedding are :mod:`ttm_ray.evaluation.clip_embed`'s (the CLIPFrame
metric's code, re-exported here as ``load_clip``, ``ClipEmbedder``, ``temporal_consistency``).
Frames are decoded in chunks and shrunk right away, so a 128-frame 1080p clip never
sits in memory whole; embeddings of several clips share forward passes of ``batch_size``.
Rejects: the shared reasons of :func:`~data_prep.rows.reason_for` (frames that do not read:
``unreadable_input`` / ``unreadable_video`` / ``remote_read_error``; the model running out of
memory: ``out_of_memory`` for the whole batch; a bug or a model error: ``stage_error``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from data_prep.rows import free_cuda_memory, is_rejected, reject_batch, reject_error
from ttm_ray.config import constrained
from ttm_ray.dataset.rle import decode_mask
from ttm_ray.dataset.video import Video

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ below provides them
    from ttm_ray.evaluation.clip_embed import (
        ClipEmbedder,
        load_clip,
        quiet_transformers,
        temporal_consistency,
    )

STAGE = "score"
CONFIG_KEY = "score"  # where ScoreConfig sits in the prep config (for error messages)

# The CLIP side of the omega score is the CLIPFrame metric's code (one implementation of
# "CLIP similarity of consecutive frames"), re-exported here under the names this stage has
# always had. It is imported on first use, not with this module: ttm_ray.evaluation imports
# torch, and the pipeline's CPU task workers import this module without ever needing torch
# (they stay at ~250 MB instead of ~1 GB; benchmarks/results/prep_throughput_cpu.md).
_SHARED_CLIP = ("ClipEmbedder", "load_clip", "quiet_transformers", "temporal_consistency")


def __getattr__(name: str) -> Any:
    """``score.load_clip`` etc. (PEP 562): :mod:`ttm_ray.evaluation.clip_embed`'s, imported on
    first access and then kept as plain module attributes (so a test's ``monkeypatch`` of
    ``score.load_clip`` replaces, and later restores, an ordinary attribute)."""
    if name in _SHARED_CLIP:
        from ttm_ray.evaluation import clip_embed

        value = getattr(clip_embed, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _clip_api(name: str) -> Any:
    """One of the shared CLIP functions, looked up through this module's namespace (a
    monkeypatched ``score.load_clip`` is the one the stage calls)."""
    return getattr(sys.modules[__name__], name)


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


# ----------------------------------------------------------------------------- pure scores
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


# ----------------------------------------------------------------------------- frames
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
            load_clip, embedder = _clip_api("load_clip"), _clip_api("ClipEmbedder")
            self.embedder = embedder(*load_clip(path, self.cfg.device, self.cfg.dtype))
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
                except Exception as exc:  # frames that do not read, a bug: this row only
                    if batcher is not None:
                        batcher.drop(k)
                    out[k] = reject_error(row, STAGE, exc)
            if batcher is not None:
                batcher.flush()
        except _ModelError as exc:
            # The model failed (OOM, broken checkpoint): no row of this batch has its scores.
            free_cuda_memory(exc.cause)
            return reject_batch(out, STAGE, exc.cause)
        if todo:  # rows waiting for embeddings imply a batcher (and torch already loaded)
            assert batcher is not None
            consistency = _clip_api("temporal_consistency")
            for k in todo:
                lo, mean = consistency(batcher.result(k))
                out[k] = dict(out[k], score_temporal_min=lo, score_temporal_mean=mean,
                              score_model=self.model_name)
        return out


class _ModelError(RuntimeError):
    """The CLIP forward pass raised ``cause``: the whole batch is without scores."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


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
            raise _ModelError(exc) from exc
        for key, e in zip(keys, emb, strict=True):
            self.done[key].append(e)

    def result(self, key: int) -> np.ndarray:
        rows = self.done.get(key) or []
        return np.stack(rows) if rows else np.zeros((0, 1), np.float32)


__all__ = ["ClipEmbedder", "ScoreConfig", "ScoreStage", "load_clip", "object_scores",
           "quiet_transformers", "temporal_consistency", "trajectory_scores"]
