"""The generated corpus: exact masks, decodable videos, broken inputs, manifest, determinism."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import decord
import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from data_prep.parsing import parse_motion_prompt, validate_object_prompts
from data_prep.synthetic import (
    BACKGROUND_COLORS,
    CORRUPT_KINDS,
    FRAME_SIZES,
    MANIFEST_SCHEMA,
    OBJECT_COLORS,
    generate_corpus,
    make_spec,
    render_video,
)
from ttm_ray.dataset.sav_format import read_sav_annotation

SEED = 5
NUM_VIDEOS = 6
NUM_CORRUPT = len(CORRUPT_KINDS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    calls: list[tuple[int, int]] = []
    manifest = generate_corpus(tmp_path_factory.mktemp("corpus"), NUM_VIDEOS, SEED,
                               num_corrupt=NUM_CORRUPT, progress=lambda d, t: calls.append((d, t)))
    total = NUM_VIDEOS + NUM_CORRUPT
    assert calls == [(i, total) for i in range(1, total + 1)]
    return manifest


@pytest.fixture(scope="module")
def rows(corpus: Path) -> list[dict]:
    return pq.read_table(corpus).to_pylist()


def valid(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["corrupt"]]


def one_hot(ids: np.ndarray, k: int) -> np.ndarray:
    """[T, H, W] id map -> [T, K, H, W] masks (object k is id k + 1)."""
    return ids[:, None] == np.arange(1, k + 1, dtype=ids.dtype)[None, :, None, None]


def test_manifest_lists_everything(corpus: Path, rows: list[dict]) -> None:
    root = corpus.parent
    assert corpus.name == "manifest.parquet"
    assert pq.read_schema(corpus).remove_metadata() == MANIFEST_SCHEMA
    with open(root / "manifest.jsonl") as f:
        assert [json.loads(line) for line in f] == rows
    assert len(rows) == NUM_VIDEOS + NUM_CORRUPT
    assert len({r["video_id"] for r in rows}) == len(rows)
    listed = {r["path"] for r in rows} | {r["annotation"] for r in rows if r["annotation"]}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.parquet", "manifest.jsonl"} == listed
    assert [r["corrupt_kind"] for r in rows if r["corrupt"]] == list(CORRUPT_KINDS)
    for r in valid(rows):
        assert r["corrupt_kind"] is None
        assert r["annotation"] == r["path"].removesuffix(".mp4") + "_manual.json"
        assert r["num_objects"] == len(r["object_prompts"]) >= 1
        assert r["height"] % 2 == 0 and r["width"] % 2 == 0
        assert 2.5 <= r["num_frames"] / r["fps"] <= 4.0 + 1 / r["fps"]
    for r in rows:
        if r["corrupt"]:
            assert r["annotation"] is None


def test_prompts(rows: list[dict]) -> None:
    colour_words = set(" ".join([*OBJECT_COLORS, *BACKGROUND_COLORS]).split())
    for r in valid(rows):
        spec = make_spec(SEED, int(r["video_id"].rsplit("_", 1)[1]))
        assert r["caption"] == spec.caption and r["caption"].endswith("background.")
        motion = r["motion_prompt"]
        words = set(re.findall(r"[a-z]+", motion.lower()))
        assert not words & (colour_words | {"background", "striped", "checkered", "dotted",
                                            "speckled", "small", "large", "big"}), motion
        assert parse_motion_prompt(motion) == motion  # one sentence the parser takes as is
        names = [o["name"] for o in r["object_prompts"]]
        checked = validate_object_prompts([(o["name"], o["prompt"])
                                           for o in r["object_prompts"]])
        assert [o.name for o in checked] == names
        for o, obj in zip(r["object_prompts"], spec.objects, strict=True):
            assert o["name"] == f"{obj.color_name} {obj.shape}"
            assert obj.shape in r["caption"] and f"the {obj.shape}" in motion.lower()


def test_many_specs_have_short_unambiguous_prompts() -> None:
    for i in range(300):
        spec = make_spec(11, i)
        assert len(spec.motion_prompt) <= 300
        assert len({o.shape for o in spec.objects}) == len(spec.objects)
        assert len({o.color_name for o in spec.objects}) == len(spec.objects)
        assert 1 <= len(spec.objects) <= 4
    sizes = {(make_spec(11, i).height, make_spec(11, i).width) for i in range(60)}
    assert sizes == set(FRAME_SIZES)
    assert any(h != w for h, w in sizes) and any(h % 16 or w % 16 for h, w in sizes)


def test_masks_are_the_exact_visible_pixels(corpus: Path, rows: list[dict]) -> None:
    occluded = 0
    for r in valid(rows):
        spec = make_spec(SEED, int(r["video_id"].rsplit("_", 1)[1]))
        frames, ids = render_video(spec)
        k = len(spec.objects)
        assert frames.shape == (r["num_frames"], r["height"], r["width"], 3)
        assert frames.dtype == np.uint8 and ids.shape == frames.shape[:3]
        ann = read_sav_annotation(corpus.parent / r["annotation"])
        assert ann.annotation_stride == 1 and ann.num_annotated_frames == r["num_frames"]
        assert ann.fps == r["fps"] and ann.num_objects == k
        masks = ann.all_masks()
        np.testing.assert_array_equal(masks, one_hot(ids, k))
        assert masks.sum(axis=1).max() <= 1  # visible pixels: no overlaps
        for j in range(k):
            # Each object is drawn where its mask is: its pixels differ from the background.
            alone = dataclasses.replace(spec, objects=spec.objects, z_order=(j,))
            alone_frames, alone_ids = render_video(alone)
            assert masks[:, j].any(axis=(1, 2)).mean() >= 0.6  # visible most of the time
            # Occlusion: the mask is the unoccluded silhouette minus what objects in front hide.
            assert (masks[:, j] <= (alone_ids == j + 1)).all()
            np.testing.assert_array_equal(frames[masks[:, j]], alone_frames[masks[:, j]])
            occluded += int((masks[:, j] != (alone_ids == j + 1)).any())
    assert occluded > 0  # the corpus does show occlusions


def test_masks_decode_with_pycocotools(corpus: Path, rows: list[dict]) -> None:
    for r in valid(rows):
        data = json.loads((corpus.parent / r["annotation"]).read_text())
        assert data["video_height"] == float(r["height"]) and data["masklet_num"] == \
            r["num_objects"]
        for frame in data["masklet"][:: max(1, len(data["masklet"]) // 5)]:
            for rle in frame:
                m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
                assert m.shape == (r["height"], r["width"])


def test_videos_decode_close_to_the_render(corpus: Path, rows: list[dict]) -> None:
    for r in valid(rows):
        vr = decord.VideoReader(str(corpus.parent / r["path"]), num_threads=1)
        assert len(vr) == r["num_frames"]
        assert vr.get_avg_fps() == pytest.approx(r["fps"])
        decoded = vr.get_batch(list(range(len(vr)))).asnumpy()
        assert decoded.shape == (r["num_frames"], r["height"], r["width"], 3)
        frames, _ = render_video(make_spec(SEED, int(r["video_id"].rsplit("_", 1)[1])))
        err = np.abs(decoded.astype(np.int16) - frames.astype(np.int16))
        assert err.mean() < 12, (r["video_id"], err.mean())
        assert err.reshape(len(vr), -1).mean(axis=1).max() < 12


def test_broken_inputs_do_not_decode(corpus: Path, rows: list[dict]) -> None:
    for r in rows:
        if not r["corrupt"]:
            continue
        path = str(corpus.parent / r["path"])
        if r["corrupt_kind"] == "single_frame":
            vr = decord.VideoReader(path, num_threads=1)
            assert len(vr) == 1 == r["num_frames"]
            assert vr[0].shape == (r["height"], r["width"], 3)
            continue
        with pytest.raises(Exception):  # noqa: B017 - decord raises its own error types
            vr = decord.VideoReader(path, num_threads=1)
            vr.get_batch(list(range(len(vr))))
    kinds = {r["corrupt_kind"]: (corpus.parent / r["path"]) for r in rows if r["corrupt"]}
    assert kinds["zero_bytes"].stat().st_size == 0
    assert kinds["bad_container"].read_bytes()[4:8] == b"ftyp"
    assert kinds["text_file"].read_text().startswith("This is not a video")


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = generate_corpus(tmp_path / "a", 3, seed=7, num_corrupt=NUM_CORRUPT)
    b = generate_corpus(tmp_path / "b", 3, seed=7, num_corrupt=NUM_CORRUPT)
    c = generate_corpus(tmp_path / "c", 3, seed=8)
    assert _digest(a.parent) == _digest(b.parent)
    assert make_spec(7, 1) == make_spec(7, 1)
    # Another seed, other videos.
    assert _digest(c.parent)["videos/synth_s8_00000.mp4"] != \
        _digest(a.parent)["videos/synth_s7_00000.mp4"]


def test_annotation_stride(tmp_path: Path) -> None:
    manifest = generate_corpus(tmp_path, 2, seed=1, annotation_stride=4)
    for r in pq.read_table(manifest).to_pylist():
        ann = read_sav_annotation(manifest.parent / r["annotation"])
        assert ann.annotation_stride == 4
        assert ann.num_annotated_frames == -(-r["num_frames"] // 4)
        _, ids = render_video(make_spec(1, int(r["video_id"].rsplit("_", 1)[1])))
        np.testing.assert_array_equal(ann.masks_at_video_frame(8, exact=True),
                                      one_hot(ids[8:9], ann.num_objects)[0])
