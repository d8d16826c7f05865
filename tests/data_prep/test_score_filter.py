"""Score and filter: trajectory scores, the omega score through a tiny real CLIP, refiltering.

The CLIP is randomly initialised (hidden 32, 2 layers, 32 px images) and saved like a real
checkpoint, so the tests run the real loading, preprocessing and batching code. Random
weights still see a scene cut: the spliced clip's minimum neighbour similarity is far below
the smooth clip's, and omega is chosen between the two *computed* scores.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from data_prep import filtering
from data_prep.filtering import (
    FilterConfig,
    FilterStage,
    check_filter,
    evaluate_filter,
    refilter_rows,
)
from data_prep.rows import OK, REJECTED, new_row, reject
from data_prep.stages import score
from data_prep.stages.score import (
    ScoreConfig,
    ScoreStage,
    object_scores,
    temporal_consistency,
    trajectory_scores,
)
from ttm_ray.config import ConfigError, from_dict
from ttm_ray.dataset.rle import encode_masks
from ttm_ray.dataset.video import write_video

T, H, W = 16, 48, 64
DIAG = math.hypot(H, W)


# ----------------------------------------------------------------------------- fixtures
def _square_masks(x0: int, dx: int) -> np.ndarray:
    m = np.zeros((T, H, W), bool)
    for t in range(T):
        m[t, 16:32, x0 + dx * t:x0 + dx * t + 12] = True
    return m


def _smooth_frames() -> np.ndarray:
    """A white square moving one pixel a frame over a fixed gradient background."""
    yy, xx = np.mgrid[0:H, 0:W]
    bg = np.stack([xx * 4, yy * 5, np.full_like(xx, 60)], -1).clip(0, 255).astype(np.uint8)
    frames = np.repeat(bg[None], T, axis=0)
    frames[_square_masks(8, 1)] = 255
    return frames


def _other_scene() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    check = ((yy // 4 + xx // 4) % 2).astype(bool)
    frames = np.zeros((T, H, W, 3), np.uint8)
    frames[:, check] = (20, 200, 40)
    frames[:, ~check] = (240, 20, 200)
    return frames


@pytest.fixture(scope="session")
def clip_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """A smooth clip and a spliced clip (second half another scene), as mp4 clip rows."""
    folder = tmp_path_factory.mktemp("score_videos")
    smooth = _smooth_frames()
    spliced = np.concatenate([smooth[: T // 2], _other_scene()[T // 2:]])
    masks = [{"name": "square", "color_index": 0, "rle": encode_masks(_square_masks(8, 1))}]
    rows = []
    for name, frames in [("smooth", smooth), ("spliced", spliced)]:
        path = folder / f"{name}.mp4"
        write_video(path, frames, fps=8.0)
        rows.append(new_row(video_id=name, source_uri=str(path), clip_id=f"{name}-0",
                            frame_indices=list(range(T)), num_frames=T, src_height=H,
                            src_width=W, masks=masks))
    return rows


@pytest.fixture(scope="session")
def scored(tiny_clip_dir: Path, clip_rows: list[dict]) -> dict[str, dict]:
    # Small batch and read chunk: forward passes mix frames of both clips.
    stage = ScoreStage(ScoreConfig(clip_model_path=str(tiny_clip_dir), batch_size=5,
                                   read_chunk=3))
    return {r["video_id"]: r for r in stage(clip_rows)}


# ----------------------------------------------------------------------------- pure scores
def test_temporal_consistency() -> None:
    e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    lo, mean = temporal_consistency(e)
    assert lo == pytest.approx(0.0)
    assert mean == pytest.approx(2 / 3)
    assert temporal_consistency(np.ones((1, 4))) == (None, None)


def test_trajectory_scores_static_object() -> None:
    s = trajectory_scores(np.repeat(_square_masks(10, 0)[:1], T, axis=0))
    assert s == {"persistence": 1.0, "centroid_motion": 0.0, "motion_iou_gap": 0.0}


def test_trajectory_scores_half_visible() -> None:
    masks = _square_masks(10, 0)
    masks[T // 2:] = False
    assert trajectory_scores(masks)["persistence"] == 0.5


def test_trajectory_scores_known_translation() -> None:
    s = trajectory_scores(_square_masks(4, 2))  # 2 px a frame, 12 px wide: no first/last overlap
    assert s["centroid_motion"] == pytest.approx(2 / DIAG)
    assert s["motion_iou_gap"] == pytest.approx(1.0)
    # Hidden frames count as steps: visible at 0 and 3 only, moved 6 px -> 2 px a frame.
    masks = _square_masks(4, 2)
    masks[1:3] = False
    masks[4:] = False
    s = trajectory_scores(iter(masks))  # any iterable of frames
    assert s["centroid_motion"] == pytest.approx(2 / DIAG)
    assert s["persistence"] == pytest.approx(2 / T)
    # Partial overlap: 12 px wide, shifted 4 px -> IoU = 8 / 16.
    s = trajectory_scores(_square_masks(4, 4)[:2])
    assert s["motion_iou_gap"] == pytest.approx(0.5)


def test_trajectory_scores_need_two_visible_frames() -> None:
    masks = np.zeros((T, H, W), bool)
    assert trajectory_scores(masks) == {"persistence": 0.0, "centroid_motion": None,
                                        "motion_iou_gap": None}
    masks[3, 1:4, 1:4] = True
    assert trajectory_scores(masks)["centroid_motion"] is None


def test_object_scores_from_rle_keep_given_confidence() -> None:
    row = new_row(masks=[{"name": "a", "color_index": 0, "rle": encode_masks(_square_masks(4, 2))},
                         {"name": "b", "color_index": 1, "rle": encode_masks(_square_masks(4, 0))}],
                  object_scores=[{"name": "a", "track_confidence": 0.9}])
    a, b = object_scores(row)
    assert a["name"] == "a" and a["track_confidence"] == 0.9
    assert a["centroid_motion"] == pytest.approx(2 / DIAG)
    assert b["track_confidence"] is None and b["centroid_motion"] == 0.0
    assert object_scores(new_row(masks=None)) is None
    assert object_scores(new_row(masks=[])) == []


# ----------------------------------------------------------------------------- CLIP scores
def test_missing_model_path_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"score\.clip_model_path"):
        ScoreStage(ScoreConfig())
    with pytest.raises(ValueError, match=r"score\.clip_model_path.*no config\.json"):
        ScoreStage(ScoreConfig(clip_model_path=str(tmp_path)))
    # Trajectory scores alone need no model.
    row = new_row(masks=[{"name": "a", "color_index": 0, "rle": encode_masks(_square_masks(4, 1))}])
    (out,) = ScoreStage(ScoreConfig(temporal=False))([row])
    assert out["object_scores"][0]["persistence"] == 1.0
    assert out["score_temporal_min"] is None


def test_spliced_clip_scores_lower(scored: dict[str, dict], tiny_clip_dir: Path) -> None:
    smooth, spliced = scored["smooth"], scored["spliced"]
    for row in (smooth, spliced):
        assert row["status"] == OK
        assert -1.0 <= row["score_temporal_min"] <= row["score_temporal_mean"] <= 1.0 + 1e-6
        assert row["score_model"] == f"clip:{tiny_clip_dir.name}"
        (obj,) = row["object_scores"]
        assert obj["name"] == "square" and obj["persistence"] == 1.0
        assert obj["centroid_motion"] == pytest.approx(1 / DIAG)
    assert spliced["score_temporal_min"] < smooth["score_temporal_min"]


def test_batching_does_not_change_scores(
    scored: dict[str, dict], tiny_clip_dir: Path, clip_rows: list[dict]
) -> None:
    stage = ScoreStage(ScoreConfig(clip_model_path=str(tiny_clip_dir), model_name="tiny"))
    for row in clip_rows:
        (alone,) = stage([row])
        assert alone["score_model"] == "tiny"
        assert alone["score_temporal_min"] == pytest.approx(
            scored[row["video_id"]]["score_temporal_min"], abs=1e-5)


def test_bad_rows_are_rejected_and_rejects_pass_through(
    tiny_clip_dir: Path, clip_rows: list[dict], tmp_path: Path
) -> None:
    missing = dict(clip_rows[0], video_id="missing", source_uri=str(tmp_path / "nope.mp4"))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    broken = dict(clip_rows[0], video_id="broken", source_uri=str(garbage))
    earlier = reject(clip_rows[1], "caption", "caption_failed", "x")
    no_masks = dict(clip_rows[0], masks=None)
    stage = ScoreStage(ScoreConfig(clip_model_path=str(tiny_clip_dir), batch_size=4))
    out = stage([missing, broken, earlier, no_masks])
    assert out[0]["reject_reason"] == "unreadable_input" and out[0]["reject_stage"] == "score"
    assert out[1]["reject_reason"] == "unreadable_video"
    assert out[2] is earlier
    assert out[3]["status"] == OK and out[3]["object_scores"] is None
    assert out[3]["score_temporal_min"] is not None


def test_vision_only_checkpoint_loads(tiny_clip_dir: Path, tmp_path: Path) -> None:
    model, processor = score.load_clip(tiny_clip_dir, "cpu")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, _ = score.load_clip(tmp_path, "cpu")
    assert again.config.projection_dim == 16


# ----------------------------------------------------------------------------- filtering
def test_omega_between_computed_scores_keeps_smooth_rejects_spliced(
    scored: dict[str, dict],
) -> None:
    smooth, spliced = scored["smooth"], scored["spliced"]
    omega = (smooth["score_temporal_min"] + spliced["score_temporal_min"]) / 2
    kept, dropped = FilterStage(FilterConfig(omega=omega))([smooth, spliced])
    assert kept["status"] == OK and kept["filter_failed"] == []
    assert dropped["status"] == REJECTED
    assert dropped["reject_reason"] == "filtered" and dropped["reject_stage"] == "filter"
    assert dropped["filter_failed"] == ["omega"]
    assert "omega" in dropped["reject_detail"] and "score_temporal_min=" in dropped["reject_detail"]
    # Scores stay on the reject, for refiltering later.
    assert dropped["score_temporal_min"] == spliced["score_temporal_min"]
    assert dropped["object_scores"] == spliced["object_scores"]


def test_refilter_changes_the_kept_set_without_any_model(
    scored: dict[str, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("refiltering must not load a model")

    monkeypatch.setattr(score, "load_clip", no_model)
    monkeypatch.setattr(score.ScoreStage, "__init__", no_model)
    monkeypatch.setattr(score, "iter_frames", no_model)
    smooth, spliced = scored["smooth"], scored["spliced"]
    strict = (smooth["score_temporal_min"] + spliced["score_temporal_min"]) / 2
    loose = spliced["score_temporal_min"] - 1e-3
    other = reject(smooth, "clip", "unreadable_video", "bad frame")
    first = FilterStage(FilterConfig(omega=strict))([smooth, spliced, other])
    assert [r["status"] for r in first] == [OK, REJECTED, REJECTED]

    kept, rejected = refilter_rows(first, FilterConfig(omega=loose))
    assert {r["video_id"] for r in kept} == {"smooth", "spliced"}
    back = next(r for r in kept if r["video_id"] == "spliced")
    assert back["status"] == OK and back["filter_failed"] == []
    assert back["reject_stage"] is None and back["reject_reason"] is None
    assert back["reject_detail"] is None
    assert rejected == [other]  # another reason: stays rejected, untouched

    kept, rejected = refilter_rows(first, FilterConfig(omega=min(smooth["score_temporal_min"]
                                                                 + 1e-3, 1.0)))
    assert kept == []
    assert {r["video_id"] for r in rejected if r["reject_reason"] == "filtered"} == {
        "smooth", "spliced"}
    assert first[1]["status"] == REJECTED  # inputs are not modified


def _row(temporal: float | None = 0.99, **objects: dict) -> dict:
    return new_row(score_temporal_min=temporal, score_temporal_mean=temporal,
                   object_scores=[{"name": n, "track_confidence": None, **s}
                                  for n, s in objects.items()])


def test_object_thresholds() -> None:
    still = {"persistence": 1.0, "centroid_motion": 0.0, "motion_iou_gap": 0.0}
    moving = {"persistence": 0.5, "centroid_motion": 0.02, "motion_iou_gap": 0.8}
    row = _row(a=still, b=moving)
    assert evaluate_filter(row, FilterConfig()) == []
    cfg = FilterConfig(min_persistence=0.8, min_motion=0.01, max_motion=0.05)
    assert evaluate_filter(row, cfg) == ["min_persistence"]  # some object moves enough
    assert evaluate_filter(_row(a=still), cfg) == ["min_motion"]
    assert evaluate_filter(row, FilterConfig(max_motion=0.01)) == ["max_motion"]
    assert evaluate_filter(row, FilterConfig(min_objects=3, max_objects=3)) == ["min_objects"]
    assert evaluate_filter(row, FilterConfig(max_objects=1)) == ["max_objects"]
    (failure,) = check_filter(row, FilterConfig(min_persistence=0.8))
    assert "'b' persistence=0.5 < 0.8" in failure.detail


def test_missing_scores() -> None:
    unscored = _row(None)
    assert evaluate_filter(unscored, FilterConfig(min_objects=0)) == ["omega"]
    assert evaluate_filter(unscored, FilterConfig(min_objects=0, on_missing="pass")) == []
    no_objects = new_row(score_temporal_min=0.99, object_scores=None)
    assert evaluate_filter(no_objects, FilterConfig()) == ["min_objects"]
    assert evaluate_filter(no_objects, FilterConfig(min_objects=0)) == []
    one_frame = _row(a={"persistence": 1 / T, "centroid_motion": None, "motion_iou_gap": None})
    assert evaluate_filter(one_frame, FilterConfig(min_motion=0.01)) == ["min_motion"]
    assert FilterStage(FilterConfig(enabled=False))([unscored]) == [unscored]


def test_filter_config_bounds() -> None:
    assert from_dict(FilterConfig, {}).omega == 0.955
    with pytest.raises(ConfigError, match="omega"):
        from_dict(FilterConfig, {"omega": 1.5})
    with pytest.raises(ConfigError, match="max_motion"):
        from_dict(FilterConfig, {"min_motion": 0.1, "max_motion": 0.01})
    assert from_dict(FilterConfig, {"omega": None}).omega is None
    assert filtering.FILTERED == "filtered"
