"""ttm_ray.dataset.video: probing, sampling, decoding, resize + centre-crop, URIs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ttm_ray.dataset import video as vid
from ttm_ray.dataset.video import (
    CropBox,
    InputNotReadable,
    VideoInfo,
    VideoReadError,
    crop_box,
    probe_video,
    read_frames,
    resize_center_crop,
    sample_frame_indices,
    write_video,
)


def level(i: int) -> int:
    """The grey level of frame ``i`` in the fixture videos (frame order survives encoding)."""
    return 10 + (4 * i) % 240


def grey_frames(n: int, height: int, width: int) -> np.ndarray:
    return np.stack([np.full((height, width, 3), level(i), np.uint8) for i in range(n)])


# (name, height, width, frames, fps, writer kwargs): odd, non-square, portrait, NTSC rate.
VIDEOS = [
    ("wide_250x190", 190, 250, 48, 24.0, {}),
    ("qcif_176x144", 144, 176, 60, 30.0, {}),
    ("portrait_240x320", 320, 240, 20, 25.0, {"faststart": True}),
    ("odd_251x191", 191, 251, 12, 12.0, {"pix_fmt": "yuv444p"}),
    ("ntsc_64x48", 48, 64, 30, 30000 / 1001, {}),
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for name, h, w, n, fps, kwargs in VIDEOS:
        path = root / f"{name}.mp4"
        write_video(path, grey_frames(n, h, w), fps, **kwargs)
        out[name] = path
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 20)
    data = out["wide_250x190"].read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index (moov) is at the end
    out.update({k: root / f"{k}.mp4" for k in ("zero", "text", "truncated")})
    return out


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    ("src_fps", "start", "n", "target", "expected"),
    [
        (24, 0, 16, 8, list(range(0, 48, 3))),
        (24, 48, 3, 8, [48, 51, 54]),
        (30, 0, 5, 8, [0, 4, 8, 11, 15]),  # 3.75 source frames per sample; 7.5 rounds up
        (25, 5, 3, None, [5, 6, 7]),  # None: the source rate
        (4, 0, 4, 8, [0, 1, 1, 2]),  # upsampling repeats the nearest frame
        (30000 / 1001, 0, 4, 8, [0, 4, 7, 11]),
    ],
)
def test_sample_frame_indices(src_fps, start, n, target, expected):
    assert sample_frame_indices(src_fps, start, n, target) == expected


def test_sample_frame_indices_rejects_bad_fps():
    with pytest.raises(ValueError):
        sample_frame_indices(0, 0, 4, 8)
    with pytest.raises(ValueError):
        sample_frame_indices(24, 0, 4, -1)


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    ("src", "dst", "box"),
    [
        ((190, 250), (256, 256), CropBox(0, 30, 190, 190)),
        ((240, 320), (512, 512), CropBox(0, 40, 240, 240)),
        ((320, 240), (256, 256), CropBox(40, 0, 240, 240)),
        ((144, 176), (256, 512), CropBox(28, 0, 88, 176)),  # wide target: rows are cut
        ((100, 100), (50, 50), CropBox(0, 0, 100, 100)),
        ((191, 251), (512, 512), CropBox(0, 30, 191, 191)),  # odd leftover goes right
    ],
)
def test_crop_box(src, dst, box):
    assert crop_box(*src, *dst) == box


def test_crop_box_rejects_empty_sizes():
    with pytest.raises(ValueError):
        crop_box(0, 10, 5, 5)


@pytest.mark.parametrize("src", [(190, 250), (144, 176), (320, 240), (191, 251), (512, 512)])
@pytest.mark.parametrize("dst", [(512, 512), (256, 256), (256, 512), (96, 64)])
def test_resize_center_crop_shapes(src, dst):
    frames = np.random.default_rng(0).integers(0, 256, (2, *src, 3), dtype=np.uint8)
    out = resize_center_crop(frames, *dst)
    assert out.shape == (2, *dst, 3) and out.dtype == np.uint8


def test_resize_center_crop_keeps_kind_and_single_frames():
    frames = np.zeros((190, 250, 3), np.uint8)
    assert resize_center_crop(frames, 64, 64).shape == (64, 64, 3)
    t = torch.zeros((3, 190, 250, 3), dtype=torch.float32)
    out = resize_center_crop(t, 32, 48)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 32, 48, 3)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError):
        resize_center_crop(np.zeros((2, 2, 4, 4, 3), np.uint8), 8, 8)


def test_resize_center_crop_keeps_the_centre():
    # A white square in the middle of a wide frame stays in the middle of the square output.
    frame = np.zeros((200, 300, 3), np.uint8)
    frame[50:150, 100:200] = 255
    out = resize_center_crop(frame[None], 100, 100)[0, :, :, 0].astype(int)
    assert out[26:74, 26:74].min() >= 250  # the square, scaled by 0.5 (edges antialiased)
    assert out[:, :24].max() == 0 and out[:, 76:].max() == 0
    assert out[:24].max() == 0 and out[76:].max() == 0
    assert np.array_equal(out, out[::-1]) and np.array_equal(out, out[:, ::-1])  # centred


def test_resize_center_crop_cuts_both_ends_of_the_long_side():
    # Portrait source, wide target: the top and bottom bands must be cut away entirely.
    frame = np.zeros((240, 320, 3), np.uint8)
    frame[:, :, 1] = 200
    frame[:40] = (255, 0, 0)  # outside the crop (top 40 rows)
    frame[200:] = (0, 0, 255)  # outside the crop (bottom 40 rows)
    assert crop_box(240, 320, 64, 128) == CropBox(40, 0, 160, 320)
    out = resize_center_crop(frame[None], 64, 128)[0]
    assert out.shape == (64, 128, 3)
    assert out[..., 0].max() == 0 and out[..., 2].max() == 0 and out[..., 1].min() == 200


def test_resize_center_crop_splits_left_right_evenly():
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, 150:] = 255  # right half white: the boundary stays in the middle
    out = resize_center_crop(frame[None], 50, 50)[0, 25, :, 0].astype(int)
    assert out[:24].max() <= 5 and out[26:].min() >= 250


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize(("name", "h", "w", "n", "fps", "kwargs"), VIDEOS)
def test_probe(videos, name, h, w, n, fps, kwargs):
    info = probe_video(str(videos[name]))
    assert info == VideoInfo(fps=pytest.approx(fps, rel=1e-3), num_frames=n, height=h, width=w)


@pytest.mark.parametrize(("name", "h", "w", "n", "fps", "kwargs"), VIDEOS)
def test_read_frames(videos, name, h, w, n, fps, kwargs):
    indices = [0, 1, n // 2, n - 1]
    frames = read_frames(str(videos[name]), indices)
    assert frames.shape == (4, h, w, 3) and frames.dtype == np.uint8
    got = frames.reshape(4, -1).mean(axis=1)
    assert np.abs(got - [level(i) for i in indices]).max() < 3  # the right frames, in order


def test_read_through_file_and_remote_uris(videos, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv(vid.CACHE_ENV, str(tmp_path / "cache"))
    path = videos["qcif_176x144"]
    local = read_frames(str(path), [0, 59])
    assert np.array_equal(read_frames(path.as_uri(), [0, 59]), local)
    assert probe_video(path.as_uri()) == probe_video(str(path))
    # A non-local URI goes through pyarrow.fs/fsspec into the cache (memory:// needs no net).
    fs = fsspec.filesystem("memory")
    fs.pipe("/ttm-test/qcif.mp4", path.read_bytes())
    try:
        assert np.array_equal(read_frames("memory://ttm-test/qcif.mp4", [0, 59]), local)
        cached = list((tmp_path / "cache").iterdir())
        assert len(cached) == 1 and cached[0].suffix == ".mp4"
        read_frames("memory://ttm-test/qcif.mp4", [1])  # a hit: no second copy
        assert len(list((tmp_path / "cache").iterdir())) == 1
        with pytest.raises(InputNotReadable, match=r"memory://ttm-test/missing\.mp4"):
            probe_video("memory://ttm-test/missing.mp4")
    finally:
        fs.rm("/ttm-test", recursive=True)


def test_cache_evicts_least_recently_used(tmp_path, monkeypatch):
    monkeypatch.setattr(vid, "_EVICT_GRACE_S", 0.0)
    for i, name in enumerate(["old", "mid", "new"]):
        p = tmp_path / f"{name}.mp4"
        p.write_bytes(b"x" * 100)
        os.utime(p, (1000 + i, 1000 + i))
    vid._evict(tmp_path, keep_bytes=150)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.mp4"]


@pytest.mark.parametrize("name", ["zero", "text", "truncated"])
def test_unreadable_files_raise_with_the_uri(videos, name):
    with pytest.raises(VideoReadError, match=re.escape(str(videos[name]))) as info:
        probe_video(str(videos[name]))
    assert not isinstance(info.value, InputNotReadable)


def test_missing_file_is_input_not_readable(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(InputNotReadable, match=r"nope\.mp4"):
        read_frames(str(missing), [0])
    with pytest.raises(InputNotReadable):
        probe_video(str(tmp_path))  # a folder


def test_out_of_range_index_raises(videos):
    with pytest.raises(VideoReadError, match="frame index 48"):
        read_frames(str(videos["wide_250x190"]), [0, 48])
    assert read_frames(str(videos["wide_250x190"]), []).shape == (0, 190, 250, 3)


def test_write_video_checks_input(tmp_path):
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8), np.uint8), 8)
