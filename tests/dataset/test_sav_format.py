"""The SA-V annotation format against the real example file (read, validate, write back)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ttm_ray.dataset.rle import decode_mask, encode_frames_objects
from ttm_ray.dataset.sav_format import (
    SAV_KEYS,
    SavAnnotation,
    read_sav_annotation,
    sav_annotation_path,
    write_sav_annotation,
)

SAV_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sav_example"
SAV_EXAMPLE = SAV_DIR / "sav_000001_manual.json"


@pytest.fixture(scope="module")
def raw() -> dict:
    return json.loads(SAV_EXAMPLE.read_text())


@pytest.fixture(scope="module")
def ann() -> SavAnnotation:
    return read_sav_annotation(SAV_EXAMPLE)


def assert_same_json(a: Any, b: Any, where: str = "$") -> None:
    """Equal values *and* equal JSON types (483.0 is not 483 here)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys differ"
        for k in a:
            assert_same_json(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_json(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_reads_the_real_file(ann: SavAnnotation) -> None:
    assert ann.video_id == "sav_000001"
    assert (ann.height, ann.width) == (848, 480)
    assert ann.num_objects == 5 and ann.object_ids == [0, 1, 2, 3, 4]
    assert ann.num_annotated_frames == 121
    assert ann.num_video_frames == 483
    assert ann.fps == 24.0
    assert ann.annotation_stride == 4  # derived: ceil(483 / 121)
    assert ann.environment == "Indoor" and ann.split == "train"
    masks = ann.masks(0)
    assert masks.shape == (5, 848, 480) and masks.dtype == bool
    np.testing.assert_array_equal(ann.mask(7, 2), ann.masks(7)[2])
    assert ann.object_masks(3).shape == (121, 848, 480)
    # Object 3 first appears at annotated frame 113 (the file says so).
    assert not ann.object_masks(3)[:113].any() and ann.mask(113, 3).any()


def test_frame_indexing_rule(ann: SavAnnotation) -> None:
    assert ann.video_frame_index(0) == 0
    assert ann.video_frame_index(120) == 480
    # Nearest annotated frame; the halfway frame goes to the earlier one; after the last
    # annotated frame, the last.
    expected = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 6: 1, 7: 2, 480: 120, 481: 120, 482: 120}
    for video_frame, annotated in expected.items():
        assert ann.annotated_frame_for(video_frame) == annotated, video_frame
    np.testing.assert_array_equal(ann.masks_at_video_frame(8), ann.masks(2))
    np.testing.assert_array_equal(ann.masks_at_video_frame(9), ann.masks(2))
    assert ann.masks_at_video_frame(12, exact=True).shape == (5, 848, 480)
    with pytest.raises(ValueError, match="not annotated"):
        ann.masks_at_video_frame(9, exact=True)
    for bad in (-1, 483):
        with pytest.raises(IndexError):
            ann.annotated_frame_for(bad)
    with pytest.raises(IndexError):
        ann.video_frame_index(121)
    with pytest.raises(IndexError):
        ann.mask(0, 5)


def test_write_reproduces_the_real_file(ann: SavAnnotation, raw: dict, tmp_path: Path) -> None:
    out = write_sav_annotation(ann, tmp_path / "sav_000001_manual.json")
    written = json.loads(out.read_text())
    assert tuple(written) == SAV_KEYS == tuple(raw)
    assert_same_json(written, raw)
    assert out.read_bytes() == SAV_EXAMPLE.read_bytes()  # even the bytes
    again = read_sav_annotation(out)
    assert again == ann


def test_computed_metadata_matches_sav(ann: SavAnnotation, raw: dict) -> None:
    """Left to be computed, the per-object fields come out as SA-V's own (bar manual edits)."""
    fresh = dataclasses.replace(
        ann, duration=None, resolution=None, size_rel=None, size_abs=None, size_bucket=None,
        visibility_changes=None, first_appeared_frame=None, frame_count=None,
        edited_frame_count=None, masklet_type=None, stability_score=None,
    ).to_dict()
    for key in SAV_KEYS:
        if key != "masklet_edited_frame_count":  # how many frames a human edited: unknowable
            assert_same_json(fresh[key], raw[key], key)


def test_reads_a_dict(raw: dict) -> None:
    assert read_sav_annotation(raw).num_objects == 5


def _broken(raw: dict, path: Path, edit) -> Path:
    data = copy.deepcopy(raw)
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("key", "edit"), [
    ("video_height", lambda d: d.pop("video_height")),
    ("video_width", lambda d: d.__setitem__("video_width", "wide")),
    ("video_duration", lambda d: d.__setitem__("video_duration", 0)),
    ("masklet_num", lambda d: d.__setitem__("masklet_num", 4)),
    ("masklet_id", lambda d: d.__setitem__("masklet_id", None)),
    ("masklet_size_abs", lambda d: d["masklet_size_abs"].pop()),
    ("masklet_type[1]", lambda d: d["masklet_type"].__setitem__(1, 3)),
    ("masklet[3]", lambda d: d["masklet"][3].pop()),
    ("masklet[0][2]", lambda d: d["masklet"][0][2].__setitem__("size", [480, 848])),
    ("masklet[5][0]", lambda d: d["masklet"][5][0].__setitem__("counts", 7)),
    ("masklet", lambda d: d.__setitem__("masklet", [])),
    ("masklet", lambda d: d.__setitem__("video_frame_count", 2000.0)),  # stride mismatch
])
def test_malformed_input_names_file_and_key(raw: dict, tmp_path: Path, key: str, edit) -> None:
    path = _broken(raw, tmp_path / "bad_manual.json", edit)
    with pytest.raises(ValueError) as info:
        read_sav_annotation(path)
    message = str(info.value)
    assert str(path) in message and repr(key) in message, message


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "x_manual.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"x_manual\.json"):
        read_sav_annotation(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_sav_annotation(path)


@pytest.mark.parametrize(("frames", "stride"), [(10, 1), (31, 1), (24, 4), (25, 3), (40, 2)])
def test_own_files_round_trip_with_their_stride(tmp_path: Path, frames: int, stride: int) -> None:
    rng = np.random.default_rng(frames * 10 + stride)
    annotated = -(-frames // stride)
    masks = rng.random((annotated, 2, 18, 26)) < 0.3
    masks[:3, 1] = False  # object 1 appears late
    ann = SavAnnotation(video_id="v", height=18, width=26, num_video_frames=frames, fps=12.0,
                        object_ids=[0, 1], masklet=encode_frames_objects(masks),
                        annotation_stride=stride, environment="Synthetic")
    path = write_sav_annotation(ann, tmp_path / "v_manual.json")
    data = json.loads(path.read_text())
    assert tuple(data) == SAV_KEYS
    assert isinstance(data["video_frame_count"], float) and isinstance(data["masklet_num"], int)
    assert data["masklet_first_appeared_frame"][1] == 3.0
    back = read_sav_annotation(path)
    assert back.annotation_stride == stride and back.fps == 12.0
    np.testing.assert_array_equal(back.all_masks(), masks)
    last = frames - 1
    np.testing.assert_array_equal(back.masks_at_video_frame(last),
                                  masks[min((last + (stride - 1) // 2) // stride,
                                            annotated - 1)])
    assert decode_mask(back.masklet[0][0]).shape == (18, 26)


def test_write_refuses_an_unrecoverable_stride() -> None:
    ann = SavAnnotation(video_id="v", height=2, width=2, num_video_frames=9, fps=8.0,
                        object_ids=[], masklet=[[], [], []], annotation_stride=4)
    with pytest.raises(ValueError, match="stride"):  # 9 frames / 3 annotated reads as 3
        ann.to_dict()


def test_annotation_path_beside_video() -> None:
    assert sav_annotation_path("/d/videos/abc.mp4") == Path("/d/videos/abc_manual.json")
