"""Mask-based motion trajectories: object masks <-> a colour-coded video.

The paper's trajectory ``s`` is a video of colour-coded object masks in which every object keeps
one constant colour in every frame, so a local prompt maps to its pixels in any frame. Data prep
(previews), both training stages (the condition video goes through the VAE like an RGB video)
and evaluation (mapping a generated trajectory back to objects) share this one table, so it is
versioned: datasets store :data:`COLOUR_TABLE_VERSION` and a change of colours is a new version.

Conventions (fixed; changing any of them means a new table version):

* Background is black ``(0, 0, 0)``.
* Object ``k`` (its ``color_index``) is drawn with ``COLOUR_TABLE[k]``; index 0 is the first
  object. The first entries are the most saturated, most separated colours, so clips with few
  objects (the common case) get the most distinct ones. Every pair of colours, black included,
  is at least 127 apart in RGB (Euclidean), which survives VAE round trips and video codecs.
* Overlap rule: where masks overlap, the object with the **lower** ``color_index`` is on top
  (wins the pixel). It depends only on the indices, never on list order, so the same masks
  render the same video wherever they come from.

Plain numpy (plus torch through :func:`~ttm_ray.dataset.video.resize_center_crop`); no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ttm_ray.dataset.rle import decode_masks
from ttm_ray.dataset.video import resize_center_crop

COLOUR_TABLE_VERSION = "ttm-colours/1"
BACKGROUND = (0, 0, 0)
#: The object id :func:`trajectory_to_object_ids` gives background pixels.
BACKGROUND_ID = -1

#: ``COLOUR_TABLE[color_index]`` is that object's RGB colour (see the module docstring).
COLOUR_TABLE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),      # 0 red
    (0, 255, 0),      # 1 green
    (0, 0, 255),      # 2 blue
    (255, 255, 0),    # 3 yellow
    (255, 0, 255),    # 4 magenta
    (0, 255, 255),    # 5 cyan
    (255, 128, 0),    # 6 orange
    (128, 0, 255),    # 7 violet
    (0, 255, 128),    # 8 spring green
    (255, 0, 128),    # 9 rose
    (128, 255, 0),    # 10 chartreuse
    (0, 128, 255),    # 11 azure
    (255, 255, 255),  # 12 white
    (128, 128, 128),  # 13 grey
    (128, 0, 0),      # 14 maroon
    (0, 128, 0),      # 15 dark green
    (0, 0, 128),      # 16 navy
    (128, 128, 0),    # 17 olive
    (128, 0, 128),    # 18 purple
    (0, 128, 128),    # 19 teal
)
NUM_COLOURS = len(COLOUR_TABLE)

_PALETTE = np.asarray(COLOUR_TABLE, dtype=np.uint8)


def colour(color_index: int) -> tuple[int, int, int]:
    """The RGB colour of ``color_index`` (raises ValueError outside the table)."""
    _check_indices([color_index])
    return COLOUR_TABLE[color_index]


def _check_indices(indices: Sequence[int]) -> None:
    bad = [i for i in indices if not 0 <= int(i) < NUM_COLOURS]
    if bad:
        raise ValueError(f"color_index {bad[0]} outside the colour table (0..{NUM_COLOURS - 1}, "
                         f"{COLOUR_TABLE_VERSION}); limit objects per clip to {NUM_COLOURS}")
    if len(set(int(i) for i in indices)) != len(indices):
        raise ValueError(f"duplicate color_index in {list(indices)}: one colour per object")


def render_trajectory(
    masks: Sequence[np.ndarray],
    color_indices: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
) -> np.ndarray:
    """Object masks -> the colour-coded trajectory video, ``uint8 [T, H, W, 3]``.

    ``masks``: one ``[T, H, W]`` boolean array per object (anything nonzero counts as inside).
    ``color_indices``: each object's colour slot; ``None`` means ``0, 1, 2, ...`` in list order.
    ``height``/``width``/``num_frames`` are only needed when there is no mask (an all-black
    video); when given alongside masks they must match. Overlaps: lower ``color_index`` wins.
    """
    indices = list(range(len(masks))) if color_indices is None else [int(i) for i in color_indices]
    if len(indices) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(indices)} color indices")
    _check_indices(indices)
    arrays = [np.asarray(m) for m in masks]
    if arrays:
        shape = arrays[0].shape
        for k, a in enumerate(arrays):
            if a.ndim != 3 or a.shape != shape:
                raise ValueError(f"mask {k} has shape {a.shape}; expected [T, H, W] {shape} "
                                 "like the first")
        expected = (num_frames, height, width)
        if any(e is not None and e != s for e, s in zip(expected, shape, strict=True)):
            raise ValueError(f"masks are {shape} but [T, H, W] = {list(expected)} was asked")
    elif None in (num_frames, height, width):
        raise ValueError("no masks: pass num_frames, height and width for the empty video")
    else:
        shape = (int(num_frames), int(height), int(width))
    out = np.zeros((*shape, 3), dtype=np.uint8)
    # Paint the highest index first, so lower indices overwrite it: lower color_index on top.
    for k in sorted(range(len(arrays)), key=lambda j: indices[j], reverse=True):
        out[arrays[k].astype(bool, copy=False)] = _PALETTE[indices[k]]
    return out


def masks_from_rle(
    objects: Sequence[Mapping[str, Any]],
    height: int | None = None,
    width: int | None = None,
) -> tuple[list[np.ndarray], list[int]]:
    """Decode the ``masks`` column (``[{color_index, rle: [COCO RLE per frame]}, ...]``).

    Returns ``(masks, color_indices)`` with one ``[T, H, W]`` bool array per object. Masks are
    stored at source resolution; with ``height``/``width`` they are mapped to that size with
    the frames' rule (:func:`~ttm_ray.dataset.video.resize_center_crop`: resize to cover, then
    centre-crop), area-weighted and thresholded at 0.5 so a pixel belongs to an object when the
    object covers at least half of it.
    """
    if (height is None) != (width is None):
        raise ValueError("pass both height and width, or neither")
    masks, indices = [], []
    lengths = {len(obj["rle"]) for obj in objects}
    if len(lengths) > 1:
        raise ValueError(f"objects have different frame counts {sorted(lengths)}")
    for obj in objects:
        frames = decode_masks(obj["rle"])
        if height is not None and width is not None:
            frames = resize_masks(frames, height, width)
        masks.append(frames)
        indices.append(int(obj["color_index"]))
    return masks, indices


def resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[T, H, W]`` bool masks -> ``[T, height, width]`` bool, aligned with resized frames."""
    masks = np.asarray(masks, dtype=bool)
    if masks.shape[1:] == (height, width):
        return masks
    area = resize_center_crop(masks[..., None].astype(np.float32), height, width)
    return area[..., 0] >= 0.5


def render_from_rle(
    objects: Sequence[Mapping[str, Any]],
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
) -> np.ndarray:
    """The ``masks`` column of a row -> trajectory video ``uint8 [T, H, W, 3]``.

    Same as decoding with :func:`masks_from_rle` and rendering with :func:`render_trajectory`
    (so both paths give identical pixels). Without ``height``/``width`` the video is at the
    masks' source resolution. An empty ``objects`` gives a black video and then needs all of
    ``num_frames``, ``height`` and ``width``.
    """
    masks, indices = masks_from_rle(objects, height, width)
    return render_trajectory(masks, indices, height=height, width=width, num_frames=num_frames)


def trajectory_to_object_ids(
    video: np.ndarray, color_indices: Iterable[int] | None = None
) -> np.ndarray:
    """The inverse of rendering: each pixel's nearest colour -> ``int64 [..., H, W]`` ids.

    ``video``: ``[T, H, W, 3]`` (or ``[H, W, 3]``) RGB on the 0..255 scale (uint8 or float,
    e.g. a decoded generation). A pixel gets the ``color_index`` whose colour is nearest, or
    :data:`BACKGROUND_ID` (-1) when black is nearest. ``color_indices`` restricts the
    candidates (e.g. to the objects a clip actually has), which makes noisy generations map
    more robustly. For checks and evaluation, not for training.
    """
    rgb = np.asarray(video)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected [..., H, W, 3] RGB, got shape {rgb.shape}")
    cand = list(range(NUM_COLOURS)) if color_indices is None else [int(i) for i in color_indices]
    _check_indices(cand)
    palette = np.concatenate([np.asarray([BACKGROUND]), _PALETTE[cand]]).astype(np.float32)
    ids = np.asarray([BACKGROUND_ID, *cand], dtype=np.int64)
    flat = rgb.reshape(-1, 3)
    out = np.empty(flat.shape[0], dtype=np.int64)
    # Chunked so a 128-frame 512x512 video does not build a [pixels, colours] float matrix at once.
    chunk = 1 << 16
    for start in range(0, flat.shape[0], chunk):
        px = flat[start:start + chunk].astype(np.float32)
        dist = ((px[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
        out[start:start + chunk] = ids[dist.argmin(axis=1)]
    return out.reshape(rgb.shape[:-1])


def overlay(frames: np.ndarray, trajectory: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a trajectory onto frames for previews: ``uint8``, same shape as ``frames``.

    Object pixels become ``(1 - alpha) * frame + alpha * colour``; background pixels (black in
    the trajectory) keep the frame unchanged, so the scene stays readable.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    frames = np.asarray(frames)
    trajectory = np.asarray(trajectory)
    if frames.shape != trajectory.shape:
        raise ValueError(f"frames {frames.shape} and trajectory {trajectory.shape} differ in shape")
    inside = trajectory.any(axis=-1, keepdims=True)
    blended = (1.0 - alpha) * frames.astype(np.float32) + alpha * trajectory.astype(np.float32)
    out = np.where(inside, np.clip(np.rint(blended), 0, 255), frames)
    return out.astype(np.uint8)


__all__ = [
    "BACKGROUND",
    "BACKGROUND_ID",
    "COLOUR_TABLE",
    "COLOUR_TABLE_VERSION",
    "NUM_COLOURS",
    "colour",
    "masks_from_rle",
    "overlay",
    "render_from_rle",
    "render_trajectory",
    "resize_masks",
    "trajectory_to_object_ids",
]
