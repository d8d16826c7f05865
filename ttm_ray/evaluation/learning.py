"""Pure-numpy metrics for the "it learns" benchmark: does a trained model move objects where
they were told to go, better than doing nothing?

The benchmark renders synthetic clips whose ground truth is known exactly: ``K`` objects, each
with a mask per frame (``[K, T, H, W]`` bool), an expected motion label and a target colour.
The model is given frame 0 (and the conditioning); everything after it is generated. These
functions score the generated clip against that ground truth:

* :func:`mask_iou` / :func:`trajectory_iou` -- **localisation**. Per object, the mean over
  frames of the intersection-over-union of predicted and true masks. Frame 0 is skipped by
  default because the model is handed it, so scoring it would only inflate the number.
* :func:`static_trajectory` -- the **static baseline**: every object stays exactly where it
  is in frame 0. A model that has learned anything about motion must beat this baseline's
  trajectory IoU; a model that just copies the first frame ties it.
* :func:`classify_motion` / :func:`direction_accuracy` -- **direction**. IoU rewards overlap,
  so a small object that barely moves scores well by standing still; the coarse motion class
  (left/right/up/down/grow/shrink/stay, first vs last frame) checks instead that it went the
  right way. Image coordinates: x grows to the right, y grows *down*, so a mask moving to a
  smaller row index is moving "up". An object whose mask vanishes is "lost", which matches
  no expected label.
* :func:`binding` -- **attribute binding**. With two or more objects, the pixels inside each
  object's mask should carry that object's colour rather than another object's (the classic
  failure of swapping attributes between objects). Judged by nearest target colour.
* :func:`follows` -- the fraction of ``True`` in a list of per-object checks (``nan`` when
  there is nothing to count, so an empty subset is not reported as 0 %).

No torch, Ray or project imports: masks come from whatever segmented the generated frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "MOTION_CLASSES",
    "binding",
    "classify_motion",
    "direction_accuracy",
    "follows",
    "mask_iou",
    "static_trajectory",
    "trajectory_iou",
]

MOTION_CLASSES: tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink", "stay")
LOST = "lost"


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks of equal shape; 1.0 when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: pred {pred.shape} vs truth {truth.shape}")
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, truth).sum()) / union


def trajectory_iou(pred: np.ndarray, truth: np.ndarray, skip_first: bool = True) -> list[float]:
    """Per object, the mean per-frame IoU of ``pred`` and ``truth`` (bool ``[K, T, H, W]``).

    With ``skip_first`` frame 0 is left out (it is given to the model), so frames 1..T-1 count.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"trajectory shapes differ: pred {pred.shape} vs truth {truth.shape}")
    if pred.ndim != 4:
        raise ValueError(f"expected [K, T, H, W] masks, got shape {pred.shape}")
    start = 1 if skip_first else 0
    if pred.shape[1] <= start:
        raise ValueError(f"no frames to score: T={pred.shape[1]}, skip_first={skip_first}")
    return [
        float(np.mean([mask_iou(p, t) for p, t in zip(pk[start:], tk[start:], strict=True)]))
        for pk, tk in zip(pred, truth, strict=True)
    ]


def static_trajectory(truth: np.ndarray) -> np.ndarray:
    """The static baseline: each object's frame-0 mask repeated over all ``T`` frames."""
    truth = np.asarray(truth)
    if truth.ndim != 4:
        raise ValueError(f"expected [K, T, H, W] masks, got shape {truth.shape}")
    return np.repeat(truth[:, :1], truth.shape[1], axis=1)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of a non-empty mask: x = column, y = row (pointing down)."""
    rows, cols = np.nonzero(mask)
    return float(cols.mean()), float(rows.mean())


def classify_motion(
    masks: np.ndarray, min_shift: float, grow_ratio: float = 1.4, shrink_ratio: float = 0.7
) -> str:
    """Coarse motion class of one object's masks (bool ``[T, H, W]``), first vs last frame.

    Area ratio last/first ``>= grow_ratio`` -> "grow", ``<= shrink_ratio`` -> "shrink";
    otherwise the centroid shift: below ``min_shift`` pixels on both axes -> "stay", else the
    dominant axis gives "left"/"right" or "up"/"down" (y points down). An empty first or last
    frame -> "lost".
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[0] < 1:
        raise ValueError(f"expected [T, H, W] masks of one object, got shape {masks.shape}")
    first, last = masks[0], masks[-1]
    area0, area1 = int(first.sum()), int(last.sum())
    if area0 == 0 or area1 == 0:
        return LOST
    ratio = area1 / area0
    if ratio >= grow_ratio:
        return "grow"
    if ratio <= shrink_ratio:
        return "shrink"
    x0, y0 = _centroid(first)
    x1, y1 = _centroid(last)
    dx, dy = x1 - x0, y1 - y0
    if max(abs(dx), abs(dy)) < min_shift:
        return "stay"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def direction_accuracy(pred: np.ndarray, motions: Sequence[str], min_shift: float) -> list[bool]:
    """Per object (``pred`` bool ``[K, T, H, W]``): does its motion class equal its label?"""
    pred = np.asarray(pred, dtype=bool)
    if pred.ndim != 4:
        raise ValueError(f"expected [K, T, H, W] masks, got shape {pred.shape}")
    if len(motions) != pred.shape[0]:
        raise ValueError(f"{len(motions)} motion labels for {pred.shape[0]} objects")
    return [
        classify_motion(masks, min_shift) == label
        for masks, label in zip(pred, motions, strict=True)
    ]


def binding(frame: np.ndarray, masks: np.ndarray, target_rgb: np.ndarray) -> list[bool]:
    """Per object: is the mean colour inside its mask nearest its own target colour?

    ``frame`` uint8 ``[H, W, 3]``, ``masks`` bool ``[K, H, W]``, ``target_rgb`` ``[K, 3]``.
    Strictly closer (Euclidean, RGB) to ``target_rgb[k]`` than to every other object's target;
    an empty mask is False. Needs ``K >= 2``: with one object there is nothing to confuse.
    """
    frame = np.asarray(frame, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    targets = np.asarray(target_rgb, dtype=np.float64)
    if masks.ndim != 3:
        raise ValueError(f"expected [K, H, W] masks, got shape {masks.shape}")
    k = masks.shape[0]
    if k < 2:
        raise ValueError(f"binding needs at least 2 objects to compare colours, got K={k}")
    if frame.shape != (*masks.shape[1:], 3):
        raise ValueError(f"frame shape {frame.shape} does not match masks {masks.shape}")
    if targets.shape != (k, 3):
        raise ValueError(f"target_rgb shape {targets.shape}, expected ({k}, 3)")
    result: list[bool] = []
    for i in range(k):
        if not masks[i].any():
            result.append(False)
            continue
        mean = frame[masks[i]].mean(axis=0)
        dist = np.linalg.norm(targets - mean, axis=1)
        others = np.delete(dist, i)
        result.append(bool(np.all(dist[i] < others)))
    return result


def follows(values: Sequence[bool]) -> float:
    """Fraction of ``True`` in ``values`` as a float; ``nan`` when there are none."""
    if len(values) == 0:
        return float("nan")
    return float(np.mean(np.asarray(values, dtype=bool)))
