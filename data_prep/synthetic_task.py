"""The learning task: generated clips that only a model using its conditions can solve.

``ttm-ray synth --task motion`` writes these, in the corpus format of
:mod:`data_prep.synthetic` (mp4 + SA-V annotation per video, ``manifest.parquet``), so they go
through ``ttm-ray prep`` (GT masks, manifest prompts) and ``ttm-ray train`` like any corpus.

Each clip shows 1-3 flat-coloured shapes (unique shapes within a clip) over a flat gray
background, ``NUM_FRAMES`` frames at ``FPS`` fps, ``SIZE`` x ``SIZE`` pixels:

* **Motion (stage 1).** Every object of a clip does the one motion the motion prompt names:
  ``left``, ``right``, ``up``, ``down`` (a ``TRAVEL`` px shift), ``grow`` or ``shrink`` (scale
  ``GROW`` / ``SHRINK``), or ``stay``. The first frame does not tell which: only the prompt
  does. (One motion per clip, not one per object: binding a verb to a shape name in the
  motion prompt is a harder task than the tiny CPU models can be asked to learn in minutes;
  per-object binding is what stage 2's local prompts test.)
* **Appearance (stage 2).** Every object starts in a colour of ``START_COLORS`` and turns,
  linearly over the clip, into its own colour of ``TARGET_COLORS`` (all different within a
  clip). Only the object's local prompt says which ("The white square turns red and moves to
  the left."); the global caption names every change without saying which object makes it
  ("... One turns blue and one turns red.", in shuffled order), and the first frame cannot
  give it away. A model without the masked layers can only guess.

Splits (``split``), the same seed giving the same clips:

* ``train``: 1-2 objects; start centres in the even cells of a checkerboard of ``CELL`` px;
  shape x colour combinations (start and target colour) off the held-out diagonal
  (:func:`heldout_combo`).
* ``heldout``: start centres in the odd cells (positions never seen in training); every clip
  has at least one object of a held-out shape x colour combination; 1-3 objects (3 is never
  seen in training).

Motions cycle through :data:`MOTIONS` by clip index, so every split has them in equal shares.
``<out>/task.jsonl`` (beside the manifest) holds each clip's labels, its motion and its
objects' target colours (:func:`task_labels`): what the evaluation scores direction and
binding against.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from data_prep.synthetic import (
    OBJECT_COLORS,
    VIDEO_DIR,
    encode_mp4,
    write_manifest,
)
from ttm_ray.dataset.rle import encode_frames_objects
from ttm_ray.dataset.sav_format import SavAnnotation, write_sav_annotation

MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "stay")
#: The prompt-swap pairs of the evaluation (``stay`` has no opposite).
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink",
            "shrink": "grow"}
SHAPES = ("circle", "square", "triangle", "diamond")
START_COLORS = ("white", "orange", "purple", "cyan")
TARGET_COLORS = ("red", "green", "blue", "yellow")
SIZE = 64
NUM_FRAMES = 8
FPS = 8
TRAVEL = 20.0  # px over the clip (left/right/up/down)
GROW, SHRINK = 1.6, 0.55
RADIUS = (9.0, 11.0)  # px at scale 1
CELL = 8  # checkerboard of start positions
BACKGROUND = (115, 115, 115)
GAP = 3.0  # px between objects' bounding circles at their largest
Split = Literal["train", "heldout"]

_VERBS = {  # (singular, plural)
    "left": ("moves to the left", "move to the left"),
    "right": ("moves to the right", "move to the right"),
    "up": ("moves up", "move up"), "down": ("moves down", "move down"),
    "grow": ("grows larger", "grow larger"), "shrink": ("shrinks", "shrink"),
    "stay": ("stays still", "stay still"),
}


@dataclass(frozen=True)
class TaskObject:
    shape: str
    start_color: str
    target_color: str
    radius: float
    centre: tuple[float, float]  # (x, y) at the first frame

    @property
    def name(self) -> str:
        """The grounding phrase: start colour and shape (unique within a clip)."""
        return f"{self.start_color} {self.shape}"


@dataclass(frozen=True)
class TaskClip:
    video_id: str
    split: str
    motion: str
    objects: tuple[TaskObject, ...]
    color_order: tuple[int, ...]  # order the caption names the colour changes in

    def motion_prompt(self, motion: str | None = None) -> str:
        """One sentence of motion only; ``motion`` replaces the clip's (prompt swaps)."""
        verb = _VERBS[motion or self.motion][len(self.objects) > 1]
        return f"{_names([f'the {o.name}' for o in self.objects]).capitalize()} {verb}."

    @property
    def caption(self) -> str:
        things = _names([f"{_a(o.start_color)} {o.shape}" for o in self.objects])
        verb = _VERBS[self.motion][len(self.objects) > 1]
        if len(self.objects) == 1:
            return f"{things.capitalize()} {verb} and turns {self.objects[0].target_color}."
        changes = [f"one turns {self.objects[k].target_color}" for k in self.color_order]
        return f"{things.capitalize()} {verb}. {_names(changes).capitalize()}."

    def local_prompt(self, k: int) -> str:
        o = self.objects[k]
        # The colour first: a text encoder that truncates long prompts keeps it.
        return f"The {o.name} turns {o.target_color} and {_VERBS[self.motion][0]}."

    @property
    def object_prompts(self) -> list[dict[str, str]]:
        return [{"name": o.name, "prompt": self.local_prompt(k)}
                for k, o in enumerate(self.objects)]


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _names(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def heldout_combo(shape: str, color: str) -> bool:
    """The held-out diagonal: shape index + colour index = 0 mod 4 (start or target colour)."""
    palette = START_COLORS if color in START_COLORS else TARGET_COLORS
    return (SHAPES.index(shape) + palette.index(color)) % 4 == 0


def heldout_cell(x: float, y: float) -> bool:
    """Odd cells of the ``CELL``-px checkerboard hold the held-out start positions."""
    return (int(x // CELL) + int(y // CELL)) % 2 == 1


def _extent(motion: str) -> tuple[float, float, float]:
    """``(dx, dy, scale at the last frame)`` of a motion."""
    dx = {"left": -TRAVEL, "right": TRAVEL}.get(motion, 0.0)
    dy = {"up": -TRAVEL, "down": TRAVEL}.get(motion, 0.0)
    return dx, dy, {"grow": GROW, "shrink": SHRINK}.get(motion, 1.0)


def _fits(x: float, y: float, r: float, motion: str) -> bool:
    dx, dy, end_scale = _extent(motion)
    reach = r * max(1.0, end_scale) + 1
    return all(reach <= c <= SIZE - reach for c in (x, y, x + dx, y + dy))


def make_clip(seed: int, index: int, split: Split) -> TaskClip:
    """Clip ``index`` of ``split`` for ``seed`` (a pure function of the three)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    motion = MOTIONS[index % len(MOTIONS)]
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    counts = (1, 2) if split == "train" else (1, 2, 3)
    for _ in range(1000):
        n = int(rng.choice(counts))
        shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), n, replace=False)]
        starts = [START_COLORS[i] for i in rng.choice(len(START_COLORS), n, replace=False)]
        targets = [TARGET_COLORS[i] for i in rng.choice(len(TARGET_COLORS), n, replace=False)]
        unseen = [heldout_combo(s, a) or heldout_combo(s, b)
                  for s, a, b in zip(shapes, starts, targets, strict=True)]
        if any(unseen) != (split == "heldout"):  # train: none unseen; heldout: at least one
            continue
        objects: list[TaskObject] = []
        for k in range(n):
            r = float(rng.uniform(*RADIUS))
            for _ in range(200):
                x, y = (float(v) for v in rng.uniform(0, SIZE, 2))
                if heldout_cell(x, y) != (split == "heldout") or not _fits(x, y, r, motion):
                    continue
                big = max(1.0, _extent(motion)[2])
                if all(math.hypot(x - o.centre[0], y - o.centre[1])
                       >= (r + o.radius) * big + GAP for o in objects):
                    objects.append(TaskObject(shapes[k], starts[k], targets[k], r, (x, y)))
                    break
        if len(objects) == n:
            order = tuple(int(i) for i in rng.permutation(n))
            return TaskClip(f"task_{split}_s{seed}_{index:05d}", split, motion,
                            tuple(objects), order)
    raise RuntimeError(f"no layout for clip {index} of {split} (seed {seed})")


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    # triangle, pointing up: inside three half-planes (apothem r/2)
    out = np.ones(u.shape, bool)
    for i in range(3):
        phi = math.pi / 2 + 2 * math.pi * i / 3
        out &= u * math.cos(phi) + v * math.sin(phi) <= 0.5 * r
    return out


def pose(clip: TaskClip, k: int, t: int) -> tuple[float, float, float]:
    """``(x, y, scale)`` of object ``k`` at frame ``t``."""
    a = t / (NUM_FRAMES - 1)
    dx, dy, end_scale = _extent(clip.motion)
    x, y = clip.objects[k].centre
    return x + a * dx, y + a * dy, 1.0 + a * (end_scale - 1.0)


def render_clip(clip: TaskClip) -> tuple[np.ndarray, np.ndarray]:
    """``(frames [T, SIZE, SIZE, 3] uint8, object ids [T, SIZE, SIZE] uint8)``; id ``k + 1``
    is object ``k`` (objects never overlap: :func:`make_clip` keeps them apart)."""
    frames = np.empty((NUM_FRAMES, SIZE, SIZE, 3), np.uint8)
    frames[:] = BACKGROUND
    ids = np.zeros((NUM_FRAMES, SIZE, SIZE), np.uint8)
    centres = np.arange(SIZE, dtype=np.float32) + 0.5
    for t in range(NUM_FRAMES):
        a = t / (NUM_FRAMES - 1)
        for k, o in enumerate(clip.objects):
            x, y, scale = pose(clip, k, t)
            u, v = np.meshgrid((centres - x) / scale, (centres - y) / scale)
            inside = _inside(o.shape, u, v, o.radius)
            start = np.array(OBJECT_COLORS[o.start_color], np.float32)
            end = np.array(OBJECT_COLORS[o.target_color], np.float32)
            frames[t][inside] = np.round(start + a * (end - start)).astype(np.uint8)
            ids[t][inside] = k + 1
    return frames, ids


def task_labels(clip: TaskClip) -> dict:
    """What the evaluation scores against: the motion and each object's target colour."""
    return {"motion": clip.motion, "target_colors": [o.target_color for o in clip.objects],
            "split": clip.split}


def generate_task(out_dir: str | os.PathLike, num_clips: int, split: Split, seed: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``num_clips`` clips of ``split`` in the corpus format; returns the manifest path.
    ``<out>/task.jsonl`` holds :func:`task_labels` per video."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    out = Path(out_dir)
    folder = out / VIDEO_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for i in range(num_clips):
        clip = make_clip(seed, i, split)
        frames, ids = render_clip(clip)
        encode_mp4(frames, FPS, folder / f"{clip.video_id}.mp4")
        k = len(clip.objects)
        masks = ids[:, None] == np.arange(1, k + 1, dtype=np.uint8)[None, :, None, None]
        write_sav_annotation(SavAnnotation(
            video_id=clip.video_id, height=SIZE, width=SIZE, num_video_frames=NUM_FRAMES,
            fps=float(FPS), object_ids=list(range(k)), masklet=encode_frames_objects(masks),
            annotation_stride=1, environment="Synthetic", split=split,
        ), folder / f"{clip.video_id}_manual.json")
        rows.append({
            "video_id": clip.video_id, "path": f"{VIDEO_DIR}/{clip.video_id}.mp4",
            "caption": clip.caption, "motion_prompt": clip.motion_prompt(),
            "object_prompts": clip.object_prompts,
            "annotation": f"{VIDEO_DIR}/{clip.video_id}_manual.json", "fps": float(FPS),
            "num_frames": NUM_FRAMES, "height": SIZE, "width": SIZE, "num_objects": k,
            "corrupt": False, "corrupt_kind": None})
        labels.append({"video_id": clip.video_id, "index": i, "seed": seed,
                       **task_labels(clip)})
        if progress:
            progress(i + 1, num_clips)
    with open(out / "task.jsonl", "w", encoding="utf-8") as f:
        for row in labels:
            f.write(json.dumps(row) + "\n")
    return write_manifest(rows, out)


__all__ = ["MOTIONS", "OPPOSITE", "SHAPES", "START_COLORS", "TARGET_COLORS",
           "TaskClip", "TaskObject", "generate_task", "heldout_cell", "heldout_combo",
           "make_clip", "pose", "render_clip", "task_labels"]
