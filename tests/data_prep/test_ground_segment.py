"""Ground (Grounding DINO), segment (SAM2) and GT mask stages.

Random weights give arbitrary boxes and masks, so the model tests check the plumbing: every
name is grounded at threshold 0 and none above 1, masks have one RLE per object per sampled
frame at source resolution, windows stitch, failures become the right rejects and rejected
rows pass through untouched. The GT stage is checked exactly against the generator.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.rows import REJECT_REASONS, is_rejected, new_row, reject, to_table
from data_prep.stages.ground import (
    GroundingConfig,
    GroundingStage,
    box_iou,
    build_text,
    match_boxes,
    phrase,
    to_source_box,
    token_groups,
)
from data_prep.stages.gt_masks import GtMasksConfig, GtMasksStage, mask_box
from data_prep.stages.segment import (
    SegmentConfig,
    SegmentStage,
    init_state_from_frames,
    preprocess_frames,
)
from data_prep.synthetic import make_spec, render_video
from ttm_ray.config import ConfigError, from_dict
from ttm_ray.dataset.rle import decode_mask, decode_masks
from ttm_ray.dataset.sav_format import read_sav_annotation
from ttm_ray.dataset.video import read_frames

# The fixtures (tiny models, generated corpus) live in a plugin module beside this file.

FRAMES = [0, 5, 10, 15, 20, 25]  # sampled source frames of the test clips (6 frames)


def load_manifest(corpus: Path) -> list[dict]:
    with open(corpus / "manifest.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def corpus_row(corpus: Path, entry: dict, frame_indices: list[int], **fields) -> dict:
    """A clip row as the prompts stage leaves it (manifest mode: c_local = given prompts)."""
    row = new_row(
        video_id=entry["video_id"], clip_id=f"{entry['video_id']}-clip",
        source_uri=str(corpus / entry["path"]),
        annotation_uri=str(corpus / entry["annotation"]) if entry.get("annotation") else None,
        given_object_prompts=entry["object_prompts"], c_local=entry["object_prompts"],
        frame_indices=list(frame_indices), num_frames=len(frame_indices),
        src_height=entry["height"], src_width=entry["width"], src_fps=entry["fps"],
        src_num_frames=entry["num_frames"],
    )
    row.update(fields)
    return row


def _rejected_row() -> dict:
    return reject(new_row(source_uri="/nowhere.mp4", frame_indices=[0]), "clip", "too_short",
                  "earlier stage")


def _gt_boxes(corpus: Path, entry: dict, frame: int = 0) -> list[dict]:
    ann = read_sav_annotation(corpus / entry["annotation"])
    masks = ann.masks_at_video_frame(frame)
    return [{"name": o["name"], "box": mask_box(m), "score": 1.0}
            for o, m in zip(entry["object_prompts"], masks, strict=True)]


def _check_reasons(rows: list[dict]) -> None:
    for r in rows:
        if is_rejected(r):
            assert r["reject_reason"] in REJECT_REASONS
    to_table(rows)  # every column fits ROW_SCHEMA


# ----------------------------------------------------------------------------- ground: pure
def test_phrase_and_text_format():
    assert phrase("  Red   Circle. ") == "red circle"
    text, spans = build_text(["red circle", "blue square"])
    assert text == "red circle. blue square."
    assert [text[s:e] for s, e in spans] == ["red circle", "blue square"]


def test_token_groups_follow_character_spans():
    # [CLS] red circle . blue square . [SEP] with offsets as a BERT tokenizer gives them.
    offsets = [(0, 0), (0, 3), (4, 10), (10, 11), (12, 16), (17, 23), (23, 24), (0, 0)]
    assert token_groups(offsets, [(0, 10), (12, 23)]) == [[1, 2], [4, 5]]


def test_match_boxes_one_box_per_name_and_thresholds():
    # 3 queries x 4 tokens; name 0 owns tokens 0-1, name 1 owns token 2.
    probs = np.array([[0.9, 0.1, 0.8, 0.0],   # best for both names
                      [0.2, 0.7, 0.1, 0.0],
                      [0.1, 0.1, 0.6, 0.0]])
    found = match_boxes(probs, [[0, 1], [2]], box_threshold=0.3, text_threshold=0.25)
    assert found == {0: (0, pytest.approx(0.9)), 1: (2, pytest.approx(0.6))}
    assert match_boxes(probs, [[0, 1], [2]], 0.95, 0.0) == {}
    assert match_boxes(probs, [[0, 1], [2]], 0.0, 0.95) == {}
    assert match_boxes(probs, [[0, 1], []], 0.0, 0.0) == {0: (0, pytest.approx(0.9))}
    # Query 2's box is a near-duplicate of query 0's: not a box for name 1 with dedup on.
    boxes = [[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 11]]
    assert match_boxes(probs, [[0, 1], [2]], 0.3, 0.25, boxes=boxes, dedup_iou=0.8) == {
        0: (0, pytest.approx(0.9))}
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0


def test_to_source_box_scales_and_clips():
    assert to_source_box(np.array([0.5, 0.5, 0.5, 0.5]), 100, 200) == [50.0, 25.0, 150.0, 75.0]
    assert to_source_box(np.array([0.0, 0.0, 0.5, 0.5]), 100, 200) == [0.0, 0.0, 50.0, 25.0]
    assert to_source_box(np.array([1.2, 0.5, 0.1, 0.5]), 100, 200) is None  # outside


def test_grounding_config_checks():
    with pytest.raises(ValueError, match=r"ground\.model_path is not set"):
        GroundingConfig().require_model_path()
    with pytest.raises(ValueError, match=r"ground\.model_path: .*no config\.json"):
        GroundingStage(GroundingConfig(model_path="/no/such/grounding_dino"))
    with pytest.raises(ConfigError, match="box_threshold"):
        from_dict(GroundingConfig, {"box_threshold": -0.1})


# ----------------------------------------------------------------------------- ground: model
def test_grounding_every_name_gets_a_box_at_threshold_zero(tiny_grounding_dino_dir, mask_corpus):
    entries = load_manifest(mask_corpus)
    extra = [{"name": "Red  Circle.", "prompt": "dup"}, {"name": "red circle", "prompt": "x"},
             {"name": "...", "prompt": "empty"}]
    rows = [corpus_row(mask_corpus, e, FRAMES) for e in entries]
    # Names that collide once made phrases, an empty one, more than max_objects.
    rows.append(corpus_row(mask_corpus, entries[0], FRAMES,
                           c_local=[*extra, *entries[1]["object_prompts"]]))
    rejected = _rejected_row()
    stage = GroundingStage(GroundingConfig(model_path=str(tiny_grounding_dino_dir),
                                           box_threshold=0.0, text_threshold=0.0,
                                           max_objects=2, batch_size=2, device="cpu"))
    out = stage([rows[0], rejected, *rows[1:]])
    assert out[1] is rejected
    _check_reasons(out)
    for row in (out[0], out[2]):
        assert not is_rejected(row), row["reject_detail"]
        names = [o["name"] for o in row["c_local"]]
        assert [b["name"] for b in row["boxes"]] == names
        assert row["dropped_objects"] == []
        assert row["grounding_model"] == tiny_grounding_dino_dir.name
        for b in row["boxes"]:
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 < x1 <= row["src_width"] and 0 <= y0 < y1 <= row["src_height"]
            assert 0.0 <= b["score"] <= 1.0
    mixed = out[3]
    assert [b["name"] for b in mixed["boxes"]] == ["Red  Circle.",
                                                   entries[1]["object_prompts"][0]["name"]]
    assert {(d["name"], d["reason"]) for d in mixed["dropped_objects"]} == {
        ("red circle", "duplicate_name"), ("...", "empty_name"),
        (entries[1]["object_prompts"][1]["name"], "max_objects")}


def test_grounding_above_one_drops_everything(tiny_grounding_dino_dir, mask_corpus):
    entry = load_manifest(mask_corpus)[0]
    stage = GroundingStage(GroundingConfig(model_path=str(tiny_grounding_dino_dir),
                                           box_threshold=1.01, device="cpu"))
    no_objects = corpus_row(mask_corpus, entry, FRAMES, c_local=[])
    missing = corpus_row(mask_corpus, entry, FRAMES, source_uri="/no/such/video.mp4")
    out = stage([corpus_row(mask_corpus, entry, FRAMES), no_objects, missing])
    _check_reasons(out)
    assert [r["reject_reason"] for r in out] == ["no_object_grounded", "no_object_grounded",
                                                 "unreadable_input"]
    assert out[0]["reject_stage"] == "ground"
    assert out[0]["boxes"] == []
    assert [d["reason"] for d in out[0]["dropped_objects"]] == ["no_box"] * 2


# ----------------------------------------------------------------------------- segment
def test_segment_config_checks():
    with pytest.raises(ValueError, match=r"segment\.checkpoint is not set"):
        SegmentConfig().require_checkpoint()
    with pytest.raises(ValueError, match=r"segment\.checkpoint: .*not a file"):
        SegmentConfig(checkpoint="/no/such/sam2.pt").require_checkpoint()
    assert SegmentConfig(allow_random_weights=True).require_checkpoint() is None
    with pytest.raises(ConfigError, match="multiple of 32"):
        from_dict(SegmentConfig, {"image_size": 200})
    with pytest.raises(ConfigError, match="window"):
        from_dict(SegmentConfig, {"window": 1})


def test_state_from_memory_matches_sam2_init_state(random_sam2, mask_corpus, tmp_path):
    from PIL import Image

    _, predictor = random_sam2
    entry = load_manifest(mask_corpus)[0]
    frames = read_frames(str(mask_corpus / entry["path"]), [0, 1])
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{i}.jpg", quality=100)
    jpeg = np.stack([np.asarray(Image.open(tmp_path / f"{i}.jpg")) for i in range(2)])
    reference = predictor.init_state(str(tmp_path))
    state = init_state_from_frames(
        predictor, preprocess_frames(jpeg, predictor.image_size, predictor.device),
        frames.shape[1], frames.shape[2])
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        if key == "images":
            diff = (state["images"] - value).abs()
            assert state["images"].shape == value.shape
            assert float(diff.mean()) < 0.01  # torch bicubic vs PIL bicubic resize
        elif key != "cached_features":
            assert state[key] == value, key
    assert state["cached_features"].keys() == reference["cached_features"].keys()


def test_segment_from_grounded_boxes(tiny_grounding_dino_dir, random_sam2, mask_corpus):
    cfg, predictor = random_sam2
    entries = load_manifest(mask_corpus)
    ground = GroundingStage(GroundingConfig(model_path=str(tiny_grounding_dino_dir),
                                            box_threshold=0.0, text_threshold=0.0,
                                            device="cpu"))
    rejected = _rejected_row()
    rows = ground([corpus_row(mask_corpus, entries[0], FRAMES), rejected])
    out = SegmentStage(cfg, predictor=predictor)(rows)
    assert out[1] is rejected
    _check_reasons(out)
    row = out[0]
    assert not is_rejected(row), row["reject_detail"]
    assert row["mask_source"] == "sam2"
    assert row["mask_model"] == "sam2:sam2.1_hiera_t@256:random-weights"
    assert [m["name"] for m in row["masks"]] == [b["name"] for b in row["boxes"]]
    assert [m["color_index"] for m in row["masks"]] == list(range(len(row["masks"])))
    h, w = entries[0]["height"], entries[0]["width"]
    for m in row["masks"]:
        assert len(m["rle"]) == len(FRAMES)
        assert decode_masks(m["rle"]).shape == (len(FRAMES), h, w)
    scores = row["object_scores"]
    assert [s["name"] for s in scores] == [m["name"] for m in row["masks"]]
    assert all(0.0 <= s["track_confidence"] <= 1.0 for s in scores)


def test_segment_windows_stitch(random_sam2, mask_corpus):
    cfg, predictor = random_sam2
    entry = load_manifest(mask_corpus)[1]
    row = corpus_row(mask_corpus, entry, FRAMES, boxes=_gt_boxes(mask_corpus, entry))
    whole = SegmentStage(cfg, predictor=predictor)([row])[0]
    windowed = SegmentStage(dataclasses.replace(cfg, window=3),
                            predictor=predictor)([row])[0]
    for out in (whole, windowed):
        assert not is_rejected(out), out["reject_detail"]
        assert [len(m["rle"]) for m in out["masks"]] == [len(FRAMES)] * len(out["masks"])
    # Windows [0, 3), [2, 5), [4, 6): the first window is the same computation as the whole
    # clip's first three frames.
    for a, b in zip(whole["masks"], windowed["masks"], strict=True):
        assert a["rle"][:3] == b["rle"][:3]


def test_segment_failures_become_rejects(random_sam2, mask_corpus):
    cfg, predictor = random_sam2
    entry = load_manifest(mask_corpus)[0]
    good = corpus_row(mask_corpus, entry, FRAMES[:3], boxes=_gt_boxes(mask_corpus, entry))

    def broken(uri: str, indices: list[int]) -> np.ndarray:
        raise RuntimeError("frame source exploded")

    out = SegmentStage(cfg, read_frames_fn=broken, predictor=predictor)([good])
    # An exception while tracking is no fact about the input: the shared fallback (transient).
    assert out[0]["reject_reason"] == "stage_error"
    assert "frame source exploded" in out[0]["reject_detail"]

    stage = SegmentStage(cfg, predictor=predictor)
    missing = dict(good, source_uri="/no/such/video.mp4")
    no_boxes = dict(good, boxes=[])
    out = stage([missing, no_boxes, good])
    _check_reasons(out)
    assert [r["reject_reason"] for r in out] == ["unreadable_input", "segmentation_failed", None]
    assert out[0]["reject_stage"] == "segment"

    empty = SegmentStage(dataclasses.replace(cfg, mask_threshold=1e9),
                         predictor=predictor)([good])[0]
    assert empty["reject_reason"] == "segmentation_failed"
    assert "every mask is empty" in empty["reject_detail"]
    assert {d["reason"] for d in empty["dropped_objects"]} == {"empty_mask"}


# ----------------------------------------------------------------------------- GT masks
def test_gt_masks_reproduce_the_generator(mask_corpus):
    stage = GtMasksStage()
    rejected = _rejected_row()
    entries = load_manifest(mask_corpus)
    # c_local in another order than the annotation: masks follow c_local.
    rows = [corpus_row(mask_corpus, e, FRAMES, c_local=e["object_prompts"][::-1])
            for e in entries]
    out = stage([rows[0], rejected, rows[1]])
    assert out[1] is rejected
    _check_reasons(out)
    for index, row in zip(range(len(entries)), (out[0], out[2]), strict=True):
        assert not is_rejected(row), row["reject_detail"]
        entry = entries[index]
        ann = read_sav_annotation(mask_corpus / entry["annotation"])
        _, id_map = render_video(make_spec(0, index))
        given = [o["name"] for o in entry["object_prompts"]]
        assert [m["name"] for m in row["masks"]] == given[::-1]
        assert row["mask_source"] == "gt" and row["mask_model"] is None
        for m, box in zip(row["masks"], row["boxes"], strict=True):
            k = given.index(m["name"])
            for rle, f in zip(m["rle"], FRAMES, strict=True):
                mask = decode_mask(rle)
                assert np.array_equal(mask, ann.masks_at_video_frame(f, exact=True)[k])
                assert np.array_equal(mask, id_map[f] == k + 1)  # the rendered truth
            assert box["name"] == m["name"]
            assert box["box"] == mask_box(id_map[FRAMES[0]] == k + 1)


def test_gt_masks_nearest_annotated_frame(mask_corpus_stride4):
    entry = load_manifest(mask_corpus_stride4)[0]
    ann = read_sav_annotation(mask_corpus_stride4 / entry["annotation"])
    assert ann.annotation_stride == 4
    frames = [0, 1, 2, 3, 5, 6, 7]
    expected = [0, 0, 0, 1, 1, 1, 2]  # nearest annotated frame; a tie goes to the earlier
    row = corpus_row(mask_corpus_stride4, entry, frames)
    out = GtMasksStage()([row])[0]
    assert not is_rejected(out), out["reject_detail"]
    for k, m in enumerate(out["masks"]):
        assert m["rle"] == [ann.masklet[a][k] for a in expected]
    exact = GtMasksStage(GtMasksConfig(exact_frames=True))([row])[0]
    assert exact["reject_reason"] == "no_gt_masks"
    assert "not annotated" in exact["reject_detail"]


def test_gt_masks_rejects_and_object_choice(mask_corpus, tmp_path):
    entry = load_manifest(mask_corpus)[0]
    base = corpus_row(mask_corpus, entry, FRAMES)
    names = [o["name"] for o in entry["object_prompts"]]
    bad_json = tmp_path / "bad_manual.json"
    bad_json.write_text(json.dumps({"video_id": "x"}))
    rows = [
        dict(base, annotation_uri=None),
        dict(base, annotation_uri=str(tmp_path / "missing.json")),
        dict(base, annotation_uri=str(bad_json)),
        dict(base, src_height=entry["height"] + 2),  # annotation does not fit the video
        dict(base, c_local=[{"name": "pink star", "prompt": ""}]),
        dict(base, c_local=[{"name": "pink star", "prompt": ""}, entry["object_prompts"][1]]),
        dict(base, given_object_prompts=None),
    ]
    out = GtMasksStage()(rows)
    _check_reasons(out)
    assert [r["reject_reason"] for r in out] == ["no_gt_masks"] * 5 + [None, "no_gt_masks"]
    assert [m["name"] for m in out[5]["masks"]] == [names[1]]
    assert out[5]["dropped_objects"] == [{"name": "pink star", "reason": "not_in_annotation"}]

    every = GtMasksStage(GtMasksConfig(objects="all"))(
        [dict(base, c_local=[]), dict(base, given_object_prompts=None)])
    assert [m["name"] for m in every[0]["masks"]] == names
    assert [m["name"] for m in every[1]["masks"]] == [f"masklet_{i}" for i in range(len(names))]
