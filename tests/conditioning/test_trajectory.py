"""The trajectory colour table, rendering, RLE path, overlap rule and the inverse mapping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ttm_ray.conditioning.trajectory import (
    BACKGROUND_ID,
    COLOUR_TABLE,
    COLOUR_TABLE_VERSION,
    NUM_COLOURS,
    masks_from_rle,
    overlay,
    render_from_rle,
    render_trajectory,
    resize_masks,
    trajectory_to_object_ids,
)
from ttm_ray.dataset.rle import encode_masks

T, H, W = 6, 24, 32


def _moving_box(t0: int, y: int, size: int, dx: int) -> np.ndarray:
    """A ``size`` square starting at column ``t0`` and moving ``dx`` pixels per frame."""
    m = np.zeros((T, H, W), bool)
    for t in range(T):
        x = t0 + dx * t
        m[t, y:y + size, x:x + size] = True
    return m


@pytest.fixture
def two_objects() -> list[np.ndarray]:
    # Object 0 moves right across object 1's path, so they overlap in the middle frames.
    return [_moving_box(0, 4, 8, 4), _moving_box(12, 6, 8, 0)]


def test_colour_table_is_fixed_and_well_separated() -> None:
    assert NUM_COLOURS >= 16
    assert COLOUR_TABLE_VERSION
    assert COLOUR_TABLE[0] == (255, 0, 0)
    colours = np.asarray([(0, 0, 0), *COLOUR_TABLE], float)  # black is the background
    assert len({tuple(c) for c in colours}) == len(colours)
    dist = min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2))
    assert dist >= 120


def test_each_object_keeps_one_colour_in_every_frame(two_objects: list[np.ndarray]) -> None:
    video = render_trajectory(two_objects)
    assert video.shape == (T, H, W, 3) and video.dtype == np.uint8
    only0 = two_objects[0] & ~two_objects[1]
    only1 = two_objects[1] & ~two_objects[0]
    for t in range(T):
        assert (video[t][only0[t]] == COLOUR_TABLE[0]).all()
        assert (video[t][only1[t]] == COLOUR_TABLE[1]).all()
    background = ~(two_objects[0] | two_objects[1])
    assert (video[background] == 0).all()


def test_explicit_colour_indices(two_objects: list[np.ndarray]) -> None:
    video = render_trajectory(two_objects, color_indices=[7, 3])
    assert (video[two_objects[1] & ~two_objects[0]] == COLOUR_TABLE[3]).all()
    assert (video[two_objects[0] & ~two_objects[1]] == COLOUR_TABLE[7]).all()


def test_overlap_lower_colour_index_is_on_top(two_objects: list[np.ndarray]) -> None:
    both = two_objects[0] & two_objects[1]
    assert both.any()
    # The rule follows the indices, not the list order.
    a = render_trajectory(two_objects, color_indices=[2, 5])
    b = render_trajectory(two_objects[::-1], color_indices=[5, 2])
    assert (a[both] == COLOUR_TABLE[2]).all()
    np.testing.assert_array_equal(a, b)
    c = render_trajectory(two_objects, color_indices=[9, 4])
    assert (c[both] == COLOUR_TABLE[4]).all()


def test_bad_indices_and_shapes_are_refused(two_objects: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match="outside the colour table"):
        render_trajectory(two_objects, color_indices=[0, NUM_COLOURS])
    with pytest.raises(ValueError, match="duplicate"):
        render_trajectory(two_objects, color_indices=[1, 1])
    with pytest.raises(ValueError, match="shape"):
        render_trajectory([two_objects[0], two_objects[1][:, :10]])
    with pytest.raises(ValueError, match="num_frames"):
        render_trajectory([])
    assert not render_trajectory([], num_frames=2, height=3, width=4).any()


def test_rle_path_equals_mask_path(two_objects: list[np.ndarray]) -> None:
    objects = [{"name": f"o{k}", "color_index": ci, "rle": encode_masks(m)}
               for k, (m, ci) in enumerate(zip(two_objects, [4, 1], strict=True))]
    direct = render_trajectory(two_objects, color_indices=[4, 1])
    np.testing.assert_array_equal(render_from_rle(objects), direct)
    masks, indices = masks_from_rle(objects)
    assert indices == [4, 1]
    np.testing.assert_array_equal(masks[0], two_objects[0])


def test_rle_path_at_training_size_matches_resized_masks(two_objects: list[np.ndarray]) -> None:
    objects = [{"color_index": k, "rle": encode_masks(m)} for k, m in enumerate(two_objects)]
    small = render_from_rle(objects, height=12, width=12)
    assert small.shape == (T, 12, 12, 3)
    expected = render_trajectory([resize_masks(m, 12, 12) for m in two_objects])
    np.testing.assert_array_equal(small, expected)
    # The empty case still knows its shape.
    assert render_from_rle([], height=5, width=6, num_frames=2).shape == (2, 5, 6, 3)


def test_inverse_mapping_recovers_ids(two_objects: list[np.ndarray]) -> None:
    video = render_trajectory(two_objects, color_indices=[0, 11])
    ids = trajectory_to_object_ids(video)
    assert ids.shape == (T, H, W)
    expected = np.full((T, H, W), BACKGROUND_ID)
    expected[two_objects[1]] = 11
    expected[two_objects[0]] = 0  # on top where they overlap
    np.testing.assert_array_equal(ids, expected)


def test_inverse_mapping_tolerates_noise() -> None:
    masks = [np.zeros((1, H, W), bool) for _ in range(NUM_COLOURS)]
    for k, m in enumerate(masks):
        m[0, k, :] = True  # one row per colour
    video = render_trajectory(masks).astype(np.float32)
    noisy = video + np.random.default_rng(0).uniform(-30, 30, video.shape)
    ids = trajectory_to_object_ids(noisy)
    np.testing.assert_array_equal(ids[0, :NUM_COLOURS, 0], np.arange(NUM_COLOURS))
    assert (ids[0, NUM_COLOURS:] == BACKGROUND_ID).all()
    # Restricting candidates maps everything onto the allowed ids (or background).
    assert set(np.unique(trajectory_to_object_ids(noisy, color_indices=[0, 1]))) <= {-1, 0, 1}


def test_overlay_blends_only_object_pixels(two_objects: list[np.ndarray]) -> None:
    frames = np.full((T, H, W, 3), 100, np.uint8)
    traj = render_trajectory(two_objects)
    out = overlay(frames, traj, alpha=0.5)
    assert out.dtype == np.uint8
    background = ~(two_objects[0] | two_objects[1])
    assert (out[background] == 100).all()
    only0 = two_objects[0] & ~two_objects[1]
    assert (out[only0] == (178, 50, 50)).all()  # round(0.5*100 + 0.5*255) = 178 (half to even)
    np.testing.assert_array_equal(overlay(frames, traj, alpha=0.0), frames)
    with pytest.raises(ValueError):
        overlay(frames, traj, alpha=1.5)
