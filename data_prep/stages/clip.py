"""Clip: probe each video and fan it out into clip rows (spans only, no pixels).

A clip row says which source frames make the clip (``frame_indices``, sampled at ``clip_fps``
with :func:`~ttm_ray.dataset.video.sample_frame_indices`); later stages and training decode
exactly those frames with :func:`decode_clip` at any target resolution. Rows stay small, so
millions of clips fit in a few Parquet files.

Policies: ``fixed`` cuts clips of ``num_frames`` sampled frames every ``stride_frames``
sampled frames (non-overlapping by default); ``whole`` makes one clip of the whole video
(``min_frames`` .. ``max_frames`` sampled frames). ``resolutions`` names the training sizes
(U-Net 512x512, DiT 256x256) that :func:`decode_clip` crops for; with ``max_upscale`` set, a
video any of them would upscale by more than that is rejected ``too_small``. Sampling at
``fps`` above the source's rate repeats frames (a 4 fps video at 8 fps is a stop-motion clip
that teaches the model nothing about motion): by default a video whose clips would repeat
frames more than ``max_frame_repeat`` (1.5) times on average is rejected ``low_fps``. 1.5
keeps the common rates (24/25/30 fps, and 8 fps at fps 8) and catches 5 fps and below.

Broken files: decord indexes every packet when it opens a file, so a truncated file opens
with the frames really present (or not at all) and a too-short remainder is ``too_short``;
a file decord cannot open or whose first frame does not decode is ``unreadable_video``.
Packets can still hold undecodable data, so by default (``verify="last_frame"``) the last
sampled frame of every clip is decoded once (one batched read; per clip only when that
fails). A clip that fails becomes a per-clip reject (``clip_id`` set); the video's other clips
are kept. ``verify="all_frames"`` checks every sampled frame (about one decode of the video);
with the cheap check a clip can still hold a bad middle frame, and :func:`decode_clip` then
raises ``VideoReadError`` for the stage that reads it. (A clip ending a few frames before
damage can very rarely fail too: decord decodes ahead; see ``Video``.)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from data_prep.rows import map_rows, reject
from ttm_ray.config import constrained
from ttm_ray.dataset.video import (
    Video,
    VideoInfo,
    VideoReadError,
    crop_box,
    read_frames,
    resize_center_crop,
    sample_frame_indices,
)

STAGE = "clip"


@dataclass
class Resolution:
    """A training resolution clips are cut for (the paper: U-Net 512x512, DiT 256x256)."""

    name: str = constrained("unet", nonempty=True)
    height: int = constrained(512, gt=0)
    width: int = constrained(512, gt=0)


def _default_resolutions() -> list[Resolution]:
    return [Resolution("unet", 512, 512), Resolution("dit", 256, 256)]


@dataclass
class ClipConfig:
    mode: Literal["fixed", "whole"] = constrained(
        "fixed", help="fixed: clips of num_frames every stride_frames; whole: one clip a video")
    num_frames: int = constrained(16, gt=0, help="fixed mode: sampled frames per clip")
    fps: float | None = constrained(
        8.0, gt=0, help="sampling rate of clip frames; null: the source rate (every frame)")
    stride_frames: int | None = constrained(
        None, gt=0, help="fixed mode: sampled frames between clip starts; null: num_frames")
    max_clips_per_video: int | None = constrained(
        None, gt=0, help="keep only the first N clips of a video; null: all")
    min_frames: int = constrained(16, gt=0, help="whole mode: fewer sampled frames -> too_short")
    max_frames: int | None = constrained(
        None, gt=0, help="whole mode: keep at most the first N sampled frames; null: all")
    max_upscale: float | None = constrained(
        None, gt=0, help="reject (too_small) a video that any resolution would upscale by "
        "more than this factor; null: no limit")
    max_frame_repeat: float | None = constrained(
        1.5, ge=1, help="reject (low_fps) a video whose frame rate is so far below fps that "
        "clips would show each source frame more than this many times on average "
        "(fps / source fps); null: no limit")
    verify: Literal["last_frame", "all_frames", "none"] = constrained(
        "last_frame", help="decode check per clip: its last sampled frame (cheap), every "
        "sampled frame (about one decode of the video), or none")
    resolutions: list[Resolution] = constrained(  # noqa: RUF009 - returns a dataclasses.field
        default_factory=_default_resolutions, nonempty=True,
        help="target resolutions (name, height, width) clips are cropped for")

    def validate(self) -> None:
        names = [r.name for r in self.resolutions]
        if len(set(names)) != len(names):
            raise ValueError(f"resolutions: names must be unique, got {names}")
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise ValueError(f"max_frames ({self.max_frames}) < min_frames ({self.min_frames})")

    def resolution(self, name: str) -> Resolution:
        for r in self.resolutions:
            if r.name == name:
                return r
        raise KeyError(f"no resolution {name!r}; have {[r.name for r in self.resolutions]}")


class ClipSpan(NamedTuple):
    start_frame: int
    end_frame: int  # exclusive: last sampled source frame + 1
    frame_indices: list[int]


def _span(indices: list[int]) -> ClipSpan:
    return ClipSpan(indices[0], indices[-1] + 1, indices)


def plan_clips(info: VideoInfo, cfg: ClipConfig) -> list[ClipSpan]:
    """The clips ``cfg`` cuts from a video described by ``info`` (pure; no decoding)."""
    n = info.num_frames
    if n <= 0:
        return []
    step = 1.0 if cfg.fps is None else info.fps / cfg.fps  # source frames per sampled frame
    if cfg.mode == "whole":
        # Sampled frames that exist: indices grow monotonically, so keep the prefix below n.
        candidates = sample_frame_indices(info.fps, 0, math.ceil(n / step) + 1, cfg.fps)
        indices = [i for i in candidates if i < n]
        if cfg.max_frames is not None:
            indices = indices[: cfg.max_frames]
        return [_span(indices)] if len(indices) >= cfg.min_frames else []
    stride = cfg.stride_frames or cfg.num_frames
    spans: list[ClipSpan] = []
    # Clip c starts at sampled time c * stride; bounded so an absurd upsampling cannot spin.
    for c in range(math.ceil(n / (stride * step)) + 1):
        if cfg.max_clips_per_video is not None and len(spans) >= cfg.max_clips_per_video:
            break
        start = math.floor(c * stride * step + 0.5 + 1e-9)
        indices = sample_frame_indices(info.fps, start, cfg.num_frames, cfg.fps)
        if indices[-1] >= n:
            break
        if spans and spans[-1].start_frame == start:  # heavy upsampling: same clip again
            continue
        spans.append(_span(indices))
    return spans


def clip_id(video_id: str, span: ClipSpan) -> str:
    """Stable across reruns: the video, the span, and a digest of exactly which frames."""
    digest = hashlib.sha1(",".join(map(str, span.frame_indices)).encode()).hexdigest()[:6]
    return f"{video_id}-{span.start_frame:06d}-{span.end_frame:06d}-{digest}"


def frame_repeat(info: VideoInfo, cfg: ClipConfig) -> float:
    """How often a clip shows each source frame on average: ``clip.fps / source fps`` when
    sampling faster than the source (a 4 fps video at 8 fps shows each frame twice), else 1."""
    return 1.0 if cfg.fps is None else max(1.0, cfg.fps / info.fps)


def max_upscale_needed(info: VideoInfo, cfg: ClipConfig) -> float:
    """The largest resize factor any target resolution needs for this video."""
    factors = []
    for r in cfg.resolutions:
        box = crop_box(info.height, info.width, r.height, r.width)
        factors.append(max(r.height / box.height, r.width / box.width))
    return max(factors)


_VERIFY_CHUNK = 32  # frames per read when verifying whole clips (bounds memory at 1080p)


def _decodes(video: Video, indices: list[int]) -> str | None:
    """None if ``indices`` decode, else the error."""
    try:
        for i in range(0, len(indices), _VERIFY_CHUNK):
            video.read(indices[i:i + _VERIFY_CHUNK])
    except VideoReadError as exc:
        return exc.reason
    return None


def failed_clips(video: Video, spans: list[ClipSpan], verify: str) -> dict[int, str]:
    """``{clip number: error}`` for the clips whose checked frames do not decode."""
    if verify == "none":
        return {}
    if verify == "last_frame":
        checked = [[s.frame_indices[-1]] for s in spans]
    else:
        checked = [s.frame_indices for s in spans]
    # The common case: one pass over every checked frame, nothing fails.
    if _decodes(video, sorted({i for c in checked for i in c})) is None:
        return {}
    failed = {}
    for k, frames in enumerate(checked):
        error = _decodes(video, frames)
        if error is not None:
            failed[k] = error
    return failed


class ClipStage:
    """Rows in, clip rows out (one per clip); rejected rows pass through untouched."""

    def __init__(self, cfg: ClipConfig | None = None) -> None:
        self.cfg = cfg or ClipConfig()

    def _clips(self, row: dict) -> list[dict]:
        # Video() raises InputNotReadable / VideoReadError: map_rows gives their reasons.
        with Video(row["source_uri"]) as video:
            info = video.info
            row = dict(row, src_fps=info.fps, src_num_frames=info.num_frames,
                       src_height=info.height, src_width=info.width)
            cfg = self.cfg
            if cfg.max_upscale is not None:
                need = max_upscale_needed(info, cfg)
                if need > cfg.max_upscale:
                    return [reject(row, STAGE, "too_small",
                                   f"{info.width}x{info.height} needs {need:.2f}x upscaling for "
                                   f"{[(r.name, r.width, r.height) for r in cfg.resolutions]}; "
                                   f"max_upscale is {cfg.max_upscale}")]
            repeat = frame_repeat(info, cfg)
            if cfg.max_frame_repeat is not None and repeat > cfg.max_frame_repeat:
                return [reject(row, STAGE, "low_fps",
                               f"the source has {info.fps:.3f} fps and clip.fps is {cfg.fps}: "
                               f"each source frame would repeat {repeat:.2f}x, more than "
                               f"clip.max_frame_repeat ({cfg.max_frame_repeat}); lower clip.fps, "
                               f"or raise clip.max_frame_repeat (null disables the check)")]
            spans = plan_clips(info, cfg)
            if not spans:
                return [reject(row, STAGE, "too_short", self._too_short_detail(info))]
            failed = failed_clips(video, spans, cfg.verify)
        clip_fps = cfg.fps if cfg.fps is not None else info.fps
        out = []
        for k, span in enumerate(spans):
            # video_clips: a rerun skips the whole video once all its clips are done
            clip = dict(row, clip_id=clip_id(row["video_id"], span), clip_index=k,
                        video_clips=len(spans), start_frame=span.start_frame,
                        end_frame=span.end_frame,
                        frame_indices=list(span.frame_indices), clip_fps=float(clip_fps),
                        num_frames=len(span.frame_indices))
            if k in failed:
                clip = reject(clip, STAGE, "unreadable_video",
                              f"{row['source_uri']}: clip {k} does not decode: {failed[k]}")
            out.append(clip)
        return out

    def _too_short_detail(self, info: VideoInfo) -> str:
        cfg = self.cfg
        rate = cfg.fps if cfg.fps is not None else info.fps
        need = cfg.num_frames if cfg.mode == "fixed" else cfg.min_frames
        return (f"{info.num_frames} frames at {info.fps:.3f} fps "
                f"({info.num_frames / info.fps:.2f}s); mode {cfg.mode!r} needs {need} frames "
                f"sampled at {rate:.3f} fps (about {need / rate:.2f}s)")

    def __call__(self, rows: list[dict]) -> list[dict]:
        return map_rows(rows, STAGE, self._clips)


def decode_clip(row: dict, height: int, width: int, num_threads: int = 1) -> np.ndarray:
    """The frames of a clip row at ``height x width`` (resize + centre-crop), ``[T,H,W,3]``.

    Raises :class:`~ttm_ray.dataset.video.VideoReadError` if the frames do not decode.
    """
    frames = read_frames(row["source_uri"], row["frame_indices"], num_threads=num_threads)
    return resize_center_crop(frames, height, width)


__all__ = ["ClipConfig", "ClipSpan", "ClipStage", "Resolution", "clip_id", "decode_clip",
           "failed_clips", "frame_repeat", "max_upscale_needed", "plan_clips"]
