"""COCO RLE helpers: exact round trips (random, empty, full, odd sizes) and the batch forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ttm_ray.dataset.rle import (
    decode_frames_objects,
    decode_mask,
    decode_masks,
    encode_frames_objects,
    encode_mask,
    encode_masks,
    mask_area,
    mask_areas,
)

SAV_EXAMPLE = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sav_example"
               / "sav_000001_manual.json")
SIZES = [(1, 1), (1, 7), (7, 1), (3, 5), (17, 31), (190, 250), (144, 176), (848, 480)]


def _random_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.random((h, w)) < rng.uniform(0.05, 0.95)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_random_empty_full(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    for mask in (_random_mask(rng, *size), np.zeros(size, bool), np.ones(size, bool)):
        rle = encode_mask(mask)
        assert rle["size"] == list(size)
        assert isinstance(rle["counts"], str)
        json.loads(json.dumps(rle))  # JSON-ready: plain str and ints
        back = decode_mask(rle)
        assert back.dtype == bool and back.shape == size
        np.testing.assert_array_equal(back, mask)
        assert mask_area(rle) == int(mask.sum())


def test_accepts_uint8_and_integer_masks() -> None:
    m = np.zeros((5, 6), np.uint8)
    m[1:3, 2:5] = 255  # nonzero counts as inside
    assert encode_mask(m) == encode_mask(m.astype(bool)) == encode_mask(m.astype(np.int64))
    with pytest.raises(TypeError):
        encode_mask(m.astype(np.float32))
    with pytest.raises(ValueError):
        encode_mask(np.zeros((2, 3, 4), bool))


def test_batch_round_trip_and_areas() -> None:
    rng = np.random.default_rng(0)
    stack = rng.random((6, 33, 21)) < 0.3
    stack[2] = False
    stack[4] = True
    rles = encode_masks(stack)
    assert rles == [encode_mask(m) for m in stack]  # same as one by one
    assert encode_masks(list(stack)) == rles
    np.testing.assert_array_equal(decode_masks(rles), stack)
    assert mask_areas(rles) == [int(m.sum()) for m in stack]
    assert encode_masks(np.zeros((0, 4, 4), bool)) == [] == encode_masks([])
    assert decode_masks([], size=(4, 5)).shape == (0, 4, 5)
    with pytest.raises(ValueError, match="size"):
        decode_masks([])
    with pytest.raises(ValueError, match="different sizes"):
        decode_masks([encode_mask(np.zeros((2, 2), bool)), encode_mask(np.zeros((3, 2), bool))])


def test_frames_objects_layout() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((4, 3, 9, 11)) < 0.5  # frames x objects
    masklet = encode_frames_objects(masks)
    assert len(masklet) == 4 and all(len(frame) == 3 for frame in masklet)
    assert masklet[2][1] == encode_mask(masks[2, 1])
    np.testing.assert_array_equal(decode_frames_objects(masklet), masks)
    assert decode_frames_objects([[], []], size=(9, 11)).shape == (2, 0, 9, 11)
    with pytest.raises(ValueError):
        decode_frames_objects([masklet[0], masklet[1][:2]])


def test_bytes_and_uncompressed_counts_decode() -> None:
    mask = np.zeros((4, 3), bool)
    mask[1:3, 1] = True
    rle = encode_mask(mask)
    np.testing.assert_array_equal(
        decode_mask({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    # Uncompressed COCO RLE: column-major run lengths starting with background.
    np.testing.assert_array_equal(decode_mask({"size": [4, 3], "counts": [5, 2, 5]}), mask)
    with pytest.raises(ValueError):
        decode_mask({"counts": rle["counts"]})


def test_matches_pycocotools_and_real_sav_counts() -> None:
    """Re-encoding SA-V's own masks gives SA-V's exact counts strings."""
    data = json.loads(SAV_EXAMPLE.read_text())
    for frame in (data["masklet"][0], data["masklet"][60], data["masklet"][-1]):
        for rle in frame:
            mask = decode_mask(rle)
            assert mask.shape == (848, 480)
            ref = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            np.testing.assert_array_equal(mask, ref.astype(bool))
            assert encode_mask(mask) == rle
