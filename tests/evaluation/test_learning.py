"""The "it learns" metrics against hand-built masks with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttm_ray.evaluation.learning import (
    MOTION_CLASSES,
    binding,
    classify_motion,
    direction_accuracy,
    follows,
    mask_iou,
    static_trajectory,
    trajectory_iou,
)

H = W = 32


def square(row: int, col: int, size: int = 4) -> np.ndarray:
    """A bool [H, W] mask with a size x size square whose top-left corner is (row, col)."""
    m = np.zeros((H, W), dtype=bool)
    m[row : row + size, col : col + size] = True
    return m


def clip(*frames: np.ndarray) -> np.ndarray:
    """Stack frames into one object's [T, H, W] masks."""
    return np.stack(frames)


# --- IoU -------------------------------------------------------------------------------------


def test_mask_iou_shifted_squares() -> None:
    # 4x4 squares shifted by 2 columns: intersection 4*2 = 8, union 16 + 16 - 8 = 24.
    assert mask_iou(square(10, 10), square(10, 12)) == pytest.approx(8 / 24)
    # Diagonal shift by 1: intersection 3*3 = 9, union 32 - 9 = 23.
    assert mask_iou(square(10, 10), square(11, 11)) == pytest.approx(9 / 23)


def test_mask_iou_identical_disjoint_and_empty() -> None:
    assert mask_iou(square(5, 5), square(5, 5)) == 1.0
    assert mask_iou(square(0, 0), square(20, 20)) == 0.0
    empty = np.zeros((H, W), dtype=bool)
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(empty, square(0, 0)) == 0.0


def test_trajectory_iou_skips_first_frame() -> None:
    # Object 0: frame 0 perfect (IoU 1), frames 1 and 2 shifted by 2 columns (IoU 1/3).
    truth0 = clip(square(10, 10), square(10, 12), square(10, 14))
    pred0 = clip(square(10, 10), square(10, 14), square(10, 16))
    # Object 1: perfect everywhere.
    truth1 = clip(square(2, 2), square(3, 2), square(4, 2))
    pred = np.stack([pred0, truth1])
    truth = np.stack([truth0, truth1])

    skipped = trajectory_iou(pred, truth)
    assert skipped == pytest.approx([1 / 3, 1.0])
    everything = trajectory_iou(pred, truth, skip_first=False)
    assert everything == pytest.approx([(1 + 1 / 3 + 1 / 3) / 3, 1.0])


def test_trajectory_iou_shape_mismatch_names_both_shapes() -> None:
    pred = np.zeros((2, 3, H, W), dtype=bool)
    truth = np.zeros((2, 4, H, W), dtype=bool)
    with pytest.raises(ValueError) as err:
        trajectory_iou(pred, truth)
    assert "(2, 3, 32, 32)" in str(err.value)
    assert "(2, 4, 32, 32)" in str(err.value)


# --- static baseline -------------------------------------------------------------------------


def test_static_trajectory_repeats_frame_zero() -> None:
    truth = np.stack(
        [
            clip(square(10, 10), square(10, 12), square(10, 14)),
            clip(square(2, 2), *[square(2, 2)] * 2),
        ]
    )
    static = static_trajectory(truth)
    assert static.shape == truth.shape == (2, 3, H, W)
    assert static.dtype == truth.dtype
    for t in range(3):
        np.testing.assert_array_equal(static[:, t], truth[:, 0])
    # Against the moving truth: frames 1, 2 have IoU 1/3 and 0 for object 0; object 1 is static.
    assert trajectory_iou(static, truth) == pytest.approx([(1 / 3 + 0) / 2, 1.0])


def test_static_baseline_is_perfect_on_static_truth() -> None:
    truth = np.stack([clip(*[square(4, 4)] * 5), clip(*[square(20, 8, size=6)] * 5)])
    assert trajectory_iou(static_trajectory(truth), truth) == [1.0, 1.0]


# --- motion classes --------------------------------------------------------------------------

MOTION_CASES = {
    "left": clip(square(14, 14), square(14, 11), square(14, 8)),
    "right": clip(square(14, 14), square(14, 17), square(14, 20)),
    "up": clip(square(14, 14), square(11, 14), square(8, 14)),
    "down": clip(square(14, 14), square(17, 14), square(20, 14)),
    "grow": clip(square(14, 14, size=4), square(13, 13, size=6), square(12, 12, size=8)),
    "shrink": clip(square(12, 12, size=8), square(13, 13, size=6), square(14, 14, size=4)),
    "stay": clip(square(14, 14), square(14, 15), square(14, 14)),
}


@pytest.mark.parametrize("label", MOTION_CLASSES)
def test_classify_motion_each_class(label: str) -> None:
    assert classify_motion(MOTION_CASES[label], min_shift=2.0) == label


def test_motion_cases_cover_every_class() -> None:
    assert set(MOTION_CASES) == set(MOTION_CLASSES)
    assert len(MOTION_CLASSES) == 7


def test_classify_motion_y_points_down() -> None:
    # Smaller row index in the last frame = higher on screen = "up".
    assert classify_motion(clip(square(20, 10), square(5, 10)), min_shift=1.0) == "up"
    assert classify_motion(clip(square(5, 10), square(20, 10)), min_shift=1.0) == "down"


def test_classify_motion_lost_and_thresholds() -> None:
    empty = np.zeros((H, W), dtype=bool)
    assert classify_motion(clip(square(14, 14), empty), min_shift=2.0) == "lost"
    assert classify_motion(clip(empty, square(14, 14)), min_shift=2.0) == "lost"
    # A shift of exactly 3 px is "right" with min_shift 3, "stay" with min_shift 3.5.
    moved = clip(square(14, 14), square(14, 17))
    assert classify_motion(moved, min_shift=3.0) == "right"
    assert classify_motion(moved, min_shift=3.5) == "stay"
    # Dominant axis wins: 6 px right and 2 px up is "right".
    assert classify_motion(clip(square(14, 14), square(12, 20)), min_shift=1.0) == "right"
    # Area ratio 36/16 = 2.25 dominates a shift: "grow" even though the centroid moved.
    assert classify_motion(clip(square(2, 2), square(20, 20, size=6)), min_shift=1.0) == "grow"


def test_direction_accuracy_right_and_wrong_labels() -> None:
    pred = np.stack([MOTION_CASES["left"], MOTION_CASES["up"], MOTION_CASES["grow"]])
    assert direction_accuracy(pred, ["left", "up", "grow"], min_shift=2.0) == [True] * 3
    assert direction_accuracy(pred, ["right", "up", "shrink"], min_shift=2.0) == [
        False,
        True,
        False,
    ]


def test_direction_accuracy_lost_object_is_wrong() -> None:
    lost = clip(square(14, 14), np.zeros((H, W), dtype=bool), np.zeros((H, W), dtype=bool))
    assert direction_accuracy(lost[None], ["stay"], min_shift=2.0) == [False]


# --- binding ---------------------------------------------------------------------------------

RED, BLUE = (220, 20, 20), (20, 20, 220)
TARGETS = np.array([RED, BLUE], dtype=np.uint8)


def paint(masks: np.ndarray, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """A grey uint8 frame with each mask filled with the given colour."""
    frame = np.full((H, W, 3), 128, dtype=np.uint8)
    for mask, colour in zip(masks, colours, strict=True):
        frame[mask] = colour
    return frame


def test_binding_own_colour_true_swapped_false() -> None:
    masks = np.stack([square(4, 4, size=6), square(20, 20, size=6)])
    assert binding(paint(masks, [RED, BLUE]), masks, TARGETS) == [True, True]
    assert binding(paint(masks, [BLUE, RED]), masks, TARGETS) == [False, False]
    # Both painted red: object 0 bound correctly, object 1 took object 0's colour.
    assert binding(paint(masks, [RED, RED]), masks, TARGETS.astype(float)) == [True, False]


def test_binding_empty_mask_is_false() -> None:
    masks = np.stack([square(4, 4, size=6), np.zeros((H, W), dtype=bool)])
    assert binding(paint(masks, [RED, BLUE]), masks, TARGETS) == [True, False]


def test_binding_needs_two_objects() -> None:
    masks = square(4, 4)[None]
    with pytest.raises(ValueError, match="2"):
        binding(paint(masks, [RED]), masks, TARGETS[:1])


# --- follows ---------------------------------------------------------------------------------


def test_follows_fraction_and_empty() -> None:
    assert follows([True, False, True, True]) == 0.75
    assert isinstance(follows([True]), float)
    assert math.isnan(follows([]))
