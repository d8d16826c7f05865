"""What one generated item leaves on disk, written so a reader never sees half of it::

    <out>/<item_id>/
        video.mp4            the generated clip (stage 2)
        trajectory.mp4       the colour-coded mask trajectory stage 2 was conditioned on
        overlay.mp4          the trajectory blended over the generated clip (preview)
        first_frame.png      x0 at stage 2's size
        generation.json      everything used: prompts, objects, seed, steps, scales, models

The folder is written under a temporary name and renamed into place, ``generation.json``
inside it, so :func:`is_done` (the file exists) means the item is complete: batch runs skip
such items on a rerun and redo anything else. A writer killed mid-item (SIGKILL, a lost node)
leaves its temporary folder behind; the next write of that item removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ttm_ray.conditioning.trajectory import overlay
from ttm_ray.dataset.video import write_video
from ttm_ray.inference.generate import GenerationOutput
from ttm_ray.inference.items import safe_name

RECORD = "generation.json"


def item_dir(out_dir: str | Path, item_id: str) -> Path:
    """The item's folder (ids are made filesystem-safe; ``..`` cannot escape ``out_dir``)."""
    return Path(out_dir) / safe_name(item_id)


def is_done(out_dir: str | Path, item_id: str) -> bool:
    return (item_dir(out_dir, item_id) / RECORD).is_file()


def read_record(out_dir: str | Path, item_id: str) -> dict[str, Any]:
    return json.loads((item_dir(out_dir, item_id) / RECORD).read_text())


def _mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    h, w = frames.shape[1:3]
    # yuv420p (what players expect) needs even sizes; odd ones keep full chroma.
    write_video(path, frames, fps, pix_fmt="yuv420p" if h % 2 == 0 and w % 2 == 0
                else "yuv444p")


def _temp_dirs(final: Path) -> list[Path]:
    """Temporary folders of this item, finished or abandoned (``.<item>.tmp-<hex>``)."""
    return list(final.parent.glob(f".{final.name}.tmp-*"))


def write_outputs(out_dir: str | Path, output: GenerationOutput, fps: float,
                  overlay_alpha: float = 0.5, extra: dict[str, Any] | None = None) -> Path:
    """Write one item atomically; returns its folder. An existing folder is replaced."""
    from PIL import Image

    final = item_dir(out_dir, output.item_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A plan hands an item to one writer, so any temporary folder of it is a killed writer's.
    for stale in _temp_dirs(final):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _mp4(tmp / "video.mp4", output.video, fps)
        _mp4(tmp / "trajectory.mp4", output.trajectory, fps)
        _mp4(tmp / "overlay.mp4", overlay(output.video, output.trajectory, overlay_alpha), fps)
        Image.fromarray(output.image).save(tmp / "first_frame.png")
        record = {**output.record, "fps": fps,
                  "files": ["video.mp4", "trajectory.mp4", "overlay.mp4", "first_frame.png"],
                  **(extra or {})}
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str))
        if final.exists():  # a rerun of a failed or forced item
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


__all__ = ["RECORD", "is_done", "item_dir", "read_record", "write_outputs"]
