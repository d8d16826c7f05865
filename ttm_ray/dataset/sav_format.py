"""The SA-V annotation format (``<video_id>_manual.json``), read, validated and written.

One JSON object per video (the format of Meta's SA-V release, see the shared example)::

    video_id, video_duration, video_frame_count, video_height, video_width,
    video_resolution, video_environment, video_split,
    masklet                      list over annotated frames of list over objects of RLE dicts
    masklet_id, masklet_size_rel, masklet_size_abs, masklet_size_bucket,
    masklet_visibility_changes, masklet_first_appeared_frame, masklet_frame_count,
    masklet_edited_frame_count, masklet_type, masklet_stability_score   (one entry per object)
    masklet_num                  number of objects

The real files store ``video_duration``, ``video_frame_count``, ``video_height``,
``video_width``, ``video_resolution`` and ``masklet_first_appeared_frame`` as floats;
:func:`write_sav_annotation` writes those types back so our files are indistinguishable.

Frame units. SA-V videos are 24 fps and annotated every 4th frame (6 fps), so annotated
frame ``i`` is video frame ``i * stride``. The format has no stride field, so the stride is
*derived*: ``stride = ceil(video_frame_count / len(masklet))``, which gives 4 for SA-V
(483 frames, 121 annotated: frames 0, 4, ..., 480) and 1 for our generated corpus (every frame
annotated). The derivation is checked to be consistent (``ceil(frames / stride)`` must equal
the number of annotated frames); pass ``annotation_stride=`` to override it. The fps is
``video_frame_count / video_duration`` (24.0 for SA-V). ``masklet_first_appeared_frame`` and
``masklet_frame_count`` are in annotated-frame units, as in SA-V.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ttm_ray.dataset.rle import Rle, decode_frames_objects, decode_mask, decode_masks, mask_areas

SAV_FPS = 24.0
SAV_ANNOTATION_STRIDE = 4
# COCO's size buckets (areas in pixels), which SA-V's masklet_size_bucket follows.
SMALL_AREA, MEDIUM_AREA = 32**2, 96**2

VIDEO_KEYS = ("video_id", "video_duration", "video_frame_count", "video_height",
              "video_width", "video_resolution", "video_environment", "video_split")
OBJECT_KEYS = ("masklet_id", "masklet_size_rel", "masklet_size_abs", "masklet_size_bucket",
               "masklet_visibility_changes", "masklet_first_appeared_frame",
               "masklet_frame_count", "masklet_edited_frame_count", "masklet_type",
               "masklet_stability_score")
# Key order of the real files.
SAV_KEYS = (*VIDEO_KEYS, "masklet", *OBJECT_KEYS, "masklet_num")


@dataclass
class SavAnnotation:
    """One video's masklets. Per-object fields left ``None`` are computed on write.

    ``masklet[i][k]`` is the RLE of object ``k`` (``object_ids[k]``) at annotated frame ``i``,
    which is video frame ``i * annotation_stride``.
    """

    video_id: str
    height: int
    width: int
    num_video_frames: int
    fps: float
    object_ids: list[int]
    masklet: list[list[Rle]]
    annotation_stride: int = SAV_ANNOTATION_STRIDE
    environment: str = ""
    split: str = "train"
    # Kept as read so a read/write round trip is exact; None: derived from the fields above.
    duration: float | None = None
    resolution: float | None = None
    size_rel: list[float] | None = None
    size_abs: list[float] | None = None
    size_bucket: list[str] | None = None
    visibility_changes: list[int] | None = None
    first_appeared_frame: list[float] | None = None
    frame_count: list[int] | None = None
    edited_frame_count: list[int] | None = None
    masklet_type: list[str] | None = None
    stability_score: list[float | None] | None = field(default=None)

    # ----------------------------------------------------------------------- shape
    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    @property
    def num_annotated_frames(self) -> int:
        return len(self.masklet)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    # ----------------------------------------------------------------------- frames
    def video_frame_index(self, annotated_frame: int) -> int:
        """Video frame shown by annotated frame ``annotated_frame``."""
        self._check_annotated(annotated_frame)
        return annotated_frame * self.annotation_stride

    def annotated_frame_for(self, video_frame: int, exact: bool = False) -> int:
        """The annotated frame used for video frame ``video_frame``.

        Rule: the nearest annotated frame in time; a tie (halfway between two, only with
        even strides) goes to the *earlier* one, so the mask never shows the future; frames
        after the last annotated one use the last. ``exact=True`` raises ``ValueError`` for
        a frame that is not annotated itself.
        """
        if not 0 <= video_frame < self.num_video_frames:
            raise IndexError(f"{self.video_id}: video frame {video_frame} outside "
                             f"[0, {self.num_video_frames})")
        s = self.annotation_stride
        if exact and video_frame % s:
            raise ValueError(f"{self.video_id}: video frame {video_frame} is not annotated "
                             f"(every {s}th frame is)")
        return min((video_frame + (s - 1) // 2) // s, self.num_annotated_frames - 1)

    # ----------------------------------------------------------------------- masks
    def mask(self, annotated_frame: int, obj: int) -> np.ndarray:
        """``[H, W]`` bool mask of object index ``obj`` at annotated frame ``annotated_frame``."""
        self._check_annotated(annotated_frame)
        if not 0 <= obj < self.num_objects:
            raise IndexError(f"{self.video_id}: object {obj} outside [0, {self.num_objects})")
        return decode_mask(self.masklet[annotated_frame][obj])

    def masks(self, annotated_frame: int) -> np.ndarray:
        """``[K, H, W]`` bool masks of every object at annotated frame ``annotated_frame``."""
        self._check_annotated(annotated_frame)
        return decode_masks(self.masklet[annotated_frame], size=self.size)

    def object_masks(self, obj: int) -> np.ndarray:
        """``[F, H, W]`` bool masks of object index ``obj`` over all annotated frames."""
        if not 0 <= obj < self.num_objects:
            raise IndexError(f"{self.video_id}: object {obj} outside [0, {self.num_objects})")
        return decode_masks([frame[obj] for frame in self.masklet], size=self.size)

    def all_masks(self) -> np.ndarray:
        """``[F, K, H, W]`` bool: every object at every annotated frame (can be large)."""
        return decode_frames_objects(self.masklet, size=self.size)

    def masks_at_video_frame(self, video_frame: int, exact: bool = False) -> np.ndarray:
        """``[K, H, W]`` masks for a *video* frame (rule: :meth:`annotated_frame_for`)."""
        return self.masks(self.annotated_frame_for(video_frame, exact=exact))

    def _check_annotated(self, i: int) -> None:
        if not 0 <= i < self.num_annotated_frames:
            raise IndexError(f"{self.video_id}: annotated frame {i} outside "
                             f"[0, {self.num_annotated_frames})")

    # ----------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The SA-V JSON object (same keys, order and value types as the real files).

        Raises ``ValueError`` when a reader could not derive ``annotation_stride`` back from
        the frame counts (the format has no stride key; see the module doc).
        """
        frames, annotated = self.num_video_frames, self.num_annotated_frames
        if annotated == 0 or math.ceil(frames / math.ceil(frames / annotated)) != annotated \
                or math.ceil(frames / annotated) != self.annotation_stride:
            raise ValueError(
                f"{self.video_id}: {annotated} annotated frames of {frames} video frames do "
                f"not encode an annotation stride of {self.annotation_stride} (a reader would "
                f"derive {math.ceil(frames / annotated) if annotated else None}); use another "
                "stride or length")
        stats = _masklet_stats(self.masklet, self.num_objects, self.height * self.width)
        duration = self.duration if self.duration is not None else self.num_video_frames / self.fps

        def per_object(value: list | None, key: str) -> list:
            return list(value) if value is not None else stats[key]

        out: dict[str, Any] = {
            "video_id": self.video_id,
            "video_duration": float(duration),
            "video_frame_count": float(self.num_video_frames),
            "video_height": float(self.height),
            "video_width": float(self.width),
            "video_resolution": float(self.resolution if self.resolution is not None
                                      else self.height * self.width),
            "video_environment": self.environment,
            "video_split": self.split,
            "masklet": [[{"size": list(r["size"]), "counts": r["counts"]} for r in frame]
                        for frame in self.masklet],
            "masklet_id": [int(i) for i in self.object_ids],
            "masklet_size_rel": per_object(self.size_rel, "masklet_size_rel"),
            "masklet_size_abs": per_object(self.size_abs, "masklet_size_abs"),
            "masklet_size_bucket": per_object(self.size_bucket, "masklet_size_bucket"),
            "masklet_visibility_changes": per_object(self.visibility_changes,
                                                     "masklet_visibility_changes"),
            "masklet_first_appeared_frame": [
                float(v) for v in per_object(self.first_appeared_frame,
                                             "masklet_first_appeared_frame")],
            "masklet_frame_count": per_object(self.frame_count, "masklet_frame_count"),
            "masklet_edited_frame_count": per_object(self.edited_frame_count,
                                                     "masklet_edited_frame_count"),
            "masklet_type": per_object(self.masklet_type, "masklet_type"),
            "masklet_stability_score": per_object(self.stability_score,
                                                  "masklet_stability_score"),
            "masklet_num": self.num_objects,
        }
        return out


def _masklet_stats(masklet: list[list[Rle]], num_objects: int, pixels: int) -> dict[str, list]:
    """Per-object metadata the way SA-V computes it (checked against the real example).

    ``size_abs`` is the mean area over the frames where the object is visible, ``size_rel``
    that over the frame area (both rounded to 10 decimals like SA-V), ``visibility_changes``
    counts visible<->hidden switches after the first appearance, ``first_appeared_frame``
    and ``frame_count`` are in annotated frames.
    """
    areas = np.array([mask_areas(frame) for frame in masklet], dtype=np.int64)
    areas = areas.reshape(len(masklet), num_objects)
    out: dict[str, list] = {k: [] for k in OBJECT_KEYS if k != "masklet_id"}
    for k in range(num_objects):
        a = areas[:, k]
        visible = a > 0
        seen = np.flatnonzero(visible)
        first = int(seen[0]) if seen.size else 0
        size_abs = round(float(a[visible].mean()), 10) if seen.size else 0.0
        after = visible[first:]
        bucket = ("small" if size_abs < SMALL_AREA else
                  "medium" if size_abs < MEDIUM_AREA else "large")
        out["masklet_size_rel"].append(round(size_abs / pixels, 10) if pixels else 0.0)
        out["masklet_size_abs"].append(size_abs)
        out["masklet_size_bucket"].append(bucket)
        out["masklet_visibility_changes"].append(int(np.count_nonzero(after[1:] != after[:-1])))
        out["masklet_first_appeared_frame"].append(float(first))
        out["masklet_frame_count"].append(len(masklet))
        # Generated ground truth is exact everywhere: every annotated frame counts as edited.
        out["masklet_edited_frame_count"].append(len(masklet))
        out["masklet_type"].append("manual")
        out["masklet_stability_score"].append(None)
    return out


# --------------------------------------------------------------------------- reading
class _Checker:
    """Validation with errors naming the file and the key (``ValueError``)."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self.data, self.source = data, source

    def fail(self, key: str, problem: str) -> ValueError:
        return ValueError(f"{self.source}: bad SA-V annotation key {key!r}: {problem}")

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise self.fail(key, "missing")
        return self.data[key]

    def number(self, key: str, integral: bool = False, positive: bool = True) -> float:
        v = self.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(key, f"expected a number, got {v!r:.80}")
        if integral and v != int(v):
            raise self.fail(key, f"expected a whole number, got {v!r}")
        if positive and v <= 0:
            raise self.fail(key, f"must be > 0, got {v!r}")
        return v

    def string(self, key: str) -> str:
        v = self.get(key)
        if not isinstance(v, str):
            raise self.fail(key, f"expected a string, got {v!r:.80}")
        return v

    def per_object(self, key: str, n: int, types: tuple[type, ...],
                   nullable: bool = False) -> list:
        v = self.get(key)
        if not isinstance(v, list) or len(v) != n:
            got = f"{len(v)} entries" if isinstance(v, list) else repr(v)[:80]
            raise self.fail(key, f"expected a list of {n} entries (one per object), got {got}")
        for i, item in enumerate(v):
            if item is None and nullable:
                continue
            if isinstance(item, bool) or not isinstance(item, types):
                raise self.fail(f"{key}[{i}]", f"expected {'/'.join(t.__name__ for t in types)}"
                                f", got {item!r:.80}")
        return list(v)

    def masklet(self, n_obj: int, h: int, w: int) -> list[list[Rle]]:
        v = self.get("masklet")
        if not isinstance(v, list) or not v:
            raise self.fail("masklet", "expected a non-empty list over annotated frames")
        for i, frame in enumerate(v):
            if not isinstance(frame, list) or len(frame) != n_obj:
                got = f"{len(frame)} entries" if isinstance(frame, list) else repr(frame)[:80]
                raise self.fail(f"masklet[{i}]", f"expected {n_obj} RLEs (one per object), "
                                f"got {got}")
            for k, rle in enumerate(frame):
                if (not isinstance(rle, dict) or not isinstance(rle.get("counts"), str)
                        or rle.get("size") != [h, w]):
                    raise self.fail(f"masklet[{i}][{k}]", "expected {'size': "
                                    f"[{h}, {w}], 'counts': str}}, got {rle!r:.120}")
        return v


def _stride(frames: int, annotated: int, given: int | None, check: _Checker) -> int:
    stride = given if given is not None else math.ceil(frames / annotated)
    if stride < 1 or math.ceil(frames / stride) != annotated:
        raise check.fail("masklet", f"{annotated} annotated frames do not fit "
                         f"{frames} video frames at an annotation stride of {stride} "
                         f"(expected ceil({frames}/{stride}) = {math.ceil(frames / stride)})")
    return stride


def read_sav_annotation(source: str | os.PathLike | Mapping[str, Any],
                        annotation_stride: int | None = None) -> SavAnnotation:
    """Read and validate one SA-V annotation (a path to the JSON or the parsed dict).

    Raises ``ValueError`` naming the file and the offending key for malformed input
    (missing keys, wrong types, per-object lists of the wrong length, RLEs of another size).
    """
    if isinstance(source, Mapping):
        data, name = source, f"<dict video_id={source.get('video_id')!r}>"
    else:
        name = os.fspath(source)
        try:
            data = json.loads(Path(name).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{name}: expected a JSON object, got {type(data).__name__}")
    c = _Checker(data, name)
    h = int(c.number("video_height", integral=True))
    w = int(c.number("video_width", integral=True))
    frames = int(c.number("video_frame_count", integral=True))
    duration = float(c.number("video_duration"))
    ids = c.get("masklet_id")
    if not isinstance(ids, list):
        raise c.fail("masklet_id", f"expected a list of object ids, got {ids!r:.80}")
    object_ids = c.per_object("masklet_id", len(ids), (int,))
    n = len(object_ids)
    if c.number("masklet_num", integral=True, positive=False) != n:
        raise c.fail("masklet_num", f"{c.get('masklet_num')!r} but masklet_id lists {n}")
    masklet = c.masklet(n, h, w)
    real = (int, float)
    return SavAnnotation(
        video_id=c.string("video_id"),
        height=h,
        width=w,
        num_video_frames=frames,
        fps=round(frames / duration, 6),
        object_ids=object_ids,
        masklet=masklet,
        annotation_stride=_stride(frames, len(masklet), annotation_stride, c),
        environment=c.string("video_environment"),
        split=c.string("video_split"),
        duration=duration,
        resolution=float(c.number("video_resolution")),
        size_rel=c.per_object("masklet_size_rel", n, real),
        size_abs=c.per_object("masklet_size_abs", n, real),
        size_bucket=c.per_object("masklet_size_bucket", n, (str,)),
        visibility_changes=c.per_object("masklet_visibility_changes", n, (int,)),
        first_appeared_frame=c.per_object("masklet_first_appeared_frame", n, real),
        frame_count=c.per_object("masklet_frame_count", n, (int,)),
        edited_frame_count=c.per_object("masklet_edited_frame_count", n, (int,)),
        masklet_type=c.per_object("masklet_type", n, (str,)),
        stability_score=c.per_object("masklet_stability_score", n, real, nullable=True),
    )


def write_sav_annotation(ann: SavAnnotation, path: str | os.PathLike) -> Path:
    """Write ``ann`` as SA-V JSON (``json.dumps`` defaults, like the release files)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ann.to_dict()), encoding="utf-8")
    return out


def sav_annotation_path(video_path: str | os.PathLike) -> Path:
    """Where a video's annotation lives: ``<dir>/<video_id>_manual.json`` beside the video."""
    p = Path(video_path)
    return p.with_name(f"{p.stem}_manual.json")


__all__ = [
    "OBJECT_KEYS",
    "SAV_ANNOTATION_STRIDE",
    "SAV_FPS",
    "SAV_KEYS",
    "VIDEO_KEYS",
    "SavAnnotation",
    "read_sav_annotation",
    "sav_annotation_path",
    "write_sav_annotation",
]
