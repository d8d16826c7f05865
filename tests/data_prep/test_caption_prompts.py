"""Caption and prompt stages: retries, rejects, manifest mode, and the real tiny models.

A scripted engine (answers chosen per request) tests the stage logic; the tiny random models
test the same stages end to end through the real transformers engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data_prep.engines import ChatRequest, EngineConfig, EngineError
from data_prep.prompts import TemplateError, available_templates, load_template
from data_prep.rows import REJECT_REASONS, is_rejected, new_row, reject, to_table
from data_prep.stages.caption import (
    CaptionConfig,
    CaptionStage,
    frame_images,
    pick_frames,
)
from data_prep.stages.prompts import PromptConfig, PromptStage
from ttm_ray.config import ConfigError, from_dict

MODEL_CFG = EngineConfig(kind="transformers", model_path="/unused/scripted-model")


class ScriptedEngine:
    """A TextEngine whose answers come from ``answer(request, call_number)``."""

    name = "scripted"
    model_id = "scripted-1"

    def __init__(self, answer: Callable[[ChatRequest, int], str | EngineError]) -> None:
        self.answer = answer
        self.calls: list[list[ChatRequest]] = []

    def generate(self, requests: list[ChatRequest]) -> list[str | EngineError]:
        self.calls.append(list(requests))
        return [self.answer(r, len(self.calls)) for r in requests]


def is_motion(request: ChatRequest) -> bool:
    return "Motion-specific prompt:" in request.user


def clip_row(uri: Path | str, n: int = 12, **fields) -> dict:
    return new_row(video_id="v", source_uri=str(uri), clip_id="v:0",
                   frame_indices=list(range(n)), **fields)


def assert_valid_rows(rows: list[dict]) -> None:
    to_table(rows)  # every column fits ROW_SCHEMA
    for r in rows:
        if is_rejected(r):
            assert r["reject_reason"] in REJECT_REASONS and r["reject_detail"]


# ---------------------------------------------------------------------------- templates
def test_templates_are_versioned_package_data():
    assert {"caption_v1", "motion_v1", "local_v1"} <= set(available_templates())
    motion, local = load_template("motion_v1"), load_template("local_v1")
    assert motion.version == "v1" and motion.placeholders == {"caption"}
    assert local.placeholders == {"caption"}
    assert motion.tag.startswith("motion_v1@") and len(motion.fingerprint) == 8
    assert motion.text.startswith("Task: Extract a single motion-specific prompt")
    assert motion.text.endswith('Caption: "{caption}"\nMotion-specific prompt:')
    assert "[[Object 1: description of object 1] [Object 2: description of object 2] ...]" in (
        local.text)
    assert "[musician: A street musician plays lively tunes on an acoustic guitar]]" in local.text
    text = local.format(caption="A dog {runs} fast.")  # braces in values stay as they are
    assert text.endswith('Caption: "A dog {runs} fast."\nAnswer:')
    with pytest.raises(TemplateError, match="missing"):
        local.format()
    with pytest.raises(TemplateError, match="unknown prompt template 'motion_v9'"):
        load_template("motion_v9")


def test_config_validation_checks_templates():
    assert from_dict(PromptConfig, {}).max_objects == 4
    with pytest.raises(ConfigError, match="unknown prompt template 'local_v7'"):
        from_dict(PromptConfig, {"local_template": "local_v7"})
    with pytest.raises(ConfigError, match=r"must have exactly the field \{frames\}"):
        from_dict(CaptionConfig, {"template": "motion_v1"})
    with pytest.raises(ConfigError, match="frames: expected one of"):
        from_dict(CaptionConfig, {"frames": "mosaic"})
    with pytest.raises(ConfigError, match=r"engine.*model_path is required"):
        from_dict(CaptionConfig, {"engine": {"kind": "vllm"}})


# ----------------------------------------------------------------------- frame layouts
def test_frame_selection_and_layouts():
    assert pick_frames([3, 5, 7, 9, 11]) == [3, 7, 11]
    assert pick_frames([4]) == [4, 4, 4]
    frames = np.zeros((3, 48, 64, 3), np.uint8)
    grid = frame_images(frames, "grid", 32)
    assert len(grid) == 1 and grid[0].shape == (24, 96, 3) and grid[0].dtype == np.uint8
    separate = frame_images(frames, "separate", 32)
    assert [f.shape for f in separate] == [(24, 32, 3)] * 3


# ------------------------------------------------------------------------ caption stage
def test_caption_stage_writes_caption_and_provenance(tiny_video):
    engine = ScriptedEngine(lambda r, n: 'Caption: "A red square slides to the right."')
    stage = CaptionStage(CaptionConfig(engine=MODEL_CFG, image_size=64), engine=engine)
    done = reject(clip_row(tiny_video), "clip", "too_short", "x")
    rows = stage([clip_row(tiny_video), done])
    assert rows[0]["caption"] == "A red square slides to the right."
    assert rows[0]["caption_engine"] == "scripted" and rows[0]["caption_model"] == "scripted-1"
    assert rows[0]["caption_prompt_version"] == f"{load_template('caption_v1').tag}/grid"
    assert rows[1] == done  # rejected rows pass through untouched
    (request,) = engine.calls[0]
    assert len(request.images) == 1 and request.images[0].shape == (48, 64 * 3, 3)
    assert "side by side" in request.user and request.temperature == 0.0
    assert_valid_rows(rows)


def test_caption_stage_separate_frames(tiny_video):
    engine = ScriptedEngine(lambda r, n: "A square moves.")
    cfg = CaptionConfig(engine=MODEL_CFG, frames="separate", image_size=32)
    rows = CaptionStage(cfg, engine=engine)([clip_row(tiny_video)])
    assert rows[0]["caption"] == "A square moves."
    assert [im.shape for im in engine.calls[0][0].images] == [(24, 32, 3)] * 3
    assert rows[0]["caption_prompt_version"].endswith("/separate")


def test_caption_stage_retries_empty_answers_with_a_new_seed(tiny_video):
    engine = ScriptedEngine(lambda r, n: "  " if n == 1 else "A square moves.")
    cfg = CaptionConfig(engine=MODEL_CFG, max_attempts=2)
    rows = CaptionStage(cfg, engine=engine)([clip_row(tiny_video)])
    assert rows[0]["caption"] == "A square moves."
    retry = engine.calls[1][0]
    assert retry.temperature == MODEL_CFG.retry_temperature and retry.seed == MODEL_CFG.seed + 1


def test_caption_stage_rejects_after_all_attempts(tiny_video):
    engine = ScriptedEngine(
        lambda r, n: EngineError("scripted", "CUDA out of memory") if n == 1 else "")
    rows = CaptionStage(CaptionConfig(engine=MODEL_CFG, max_attempts=2), engine=engine)(
        [clip_row(tiny_video)])
    assert rows[0]["reject_reason"] == "caption_failed" and rows[0]["reject_stage"] == "caption"
    attempts = json.loads(rows[0]["reject_detail"])["attempts"]
    assert [a["error"] for a in attempts] == ["engine_error", "empty"]
    assert "CUDA out of memory" in attempts[0]["message"]
    assert_valid_rows(rows)


def test_caption_stage_unreadable_frames_reject_only_that_row(tiny_video, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 100)
    engine = ScriptedEngine(lambda r, n: "A square moves.")
    rows = CaptionStage(CaptionConfig(engine=MODEL_CFG), engine=engine)(
        [clip_row(tmp_path / "missing.mp4"), clip_row(corrupt), clip_row(tiny_video),
         clip_row(tiny_video, n=40), new_row(video_id="x", source_uri=str(tiny_video))])
    assert [r["reject_reason"] for r in rows] == [
        "unreadable_input", "unreadable_video", None, "unreadable_video", "stage_error"]
    assert rows[2]["caption"] == "A square moves." and len(engine.calls[0]) == 1
    assert_valid_rows(rows)


def test_caption_manifest_mode():
    stage = CaptionStage(CaptionConfig())  # default engine: manifest, no model
    rows = stage([new_row(video_id="a", given_caption="  A dog\nruns. "),
                  new_row(video_id="b"), new_row(video_id="c", given_caption="   ")])
    assert rows[0]["caption"] == "A dog runs." and rows[0]["caption_engine"] == "manifest"
    assert rows[0]["caption_model"] is None
    for r in rows[1:]:
        assert r["reject_reason"] == "caption_failed"
        assert "brought no caption" in r["reject_detail"]
        assert "caption.engine.kind" in r["reject_detail"]
    assert_valid_rows(rows)


def test_caption_stage_with_the_tiny_vlm(tiny_vlm_dir, tiny_video):
    cfg = CaptionConfig(engine=EngineConfig(kind="transformers", model_path=str(tiny_vlm_dir),
                                            max_new_tokens=6, device="cpu"), image_size=64)
    stage = CaptionStage(cfg)
    rows = stage([clip_row(tiny_video), clip_row(tiny_video, n=6)])
    for r in rows:
        assert not is_rejected(r), r["reject_detail"]
        assert isinstance(r["caption"], str) and r["caption"]
        assert r["caption_engine"] == "transformers"
        assert r["caption_model"] == Path(tiny_vlm_dir).name
    assert_valid_rows(rows)


# ------------------------------------------------------------------------- prompt stage
GOOD_MOTION = 'Motion-specific prompt: "The square slides to the right."'
GOOD_LOCAL = "Answer: [[square: A red square slides to the right.] [ball: A ball rolls.]]"


def captioned(caption: str = "A red square slides to the right while a ball rolls.") -> dict:
    return new_row(video_id="v", clip_id="v:0", caption=caption)


def test_prompt_stage_writes_prompts_and_provenance():
    engine = ScriptedEngine(lambda r, n: GOOD_MOTION if is_motion(r) else GOOD_LOCAL)
    done = reject(captioned(), "caption", "caption_failed", "x")
    rows = PromptStage(PromptConfig(engine=MODEL_CFG), engine=engine)([captioned(), done])
    r = rows[0]
    assert r["c_motion"] == "The square slides to the right."
    assert r["c_local"] == [{"name": "square", "prompt": "A red square slides to the right."},
                            {"name": "ball", "prompt": "A ball rolls."}]
    assert r["llm_raw_motion"] == GOOD_MOTION and r["llm_raw_local"] == GOOD_LOCAL
    assert r["llm_attempts"] == 1 and r["prompts_engine"] == "scripted"
    assert r["prompts_model"] == "scripted-1"
    assert r["motion_prompt_version"] == load_template("motion_v1").tag
    assert r["local_prompt_version"] == load_template("local_v1").tag
    assert rows[1] == done
    # One engine call for both prompts; the caption went into the Fig. 11/12 templates.
    (call,) = engine.calls
    assert len(call) == 2
    assert call[0].user.endswith(
        'Caption: "A red square slides to the right while a ball rolls."\n'
        "Motion-specific prompt:")
    assert call[1].user.endswith('Answer:')
    assert_valid_rows(rows)


def test_prompt_stage_retries_only_the_unparseable_prompt():
    def answer(r, n):
        if is_motion(r):
            return GOOD_MOTION
        return "I think there is a square and a ball." if n == 1 else GOOD_LOCAL

    engine = ScriptedEngine(answer)
    rows = PromptStage(PromptConfig(engine=MODEL_CFG), engine=engine)([captioned()])
    assert not is_rejected(rows[0]) and rows[0]["llm_attempts"] == 2
    assert [len(c) for c in engine.calls] == [2, 1]  # the motion prompt was not asked again
    retry = engine.calls[1][0]
    assert not is_motion(retry) and retry.temperature > 0 and retry.seed == MODEL_CFG.seed + 1
    assert rows[0]["llm_raw_local"] == GOOD_LOCAL


def test_prompt_stage_rejects_unparseable_keeping_raw_answers():
    def answer(r, n):
        return GOOD_MOTION if is_motion(r) else f"no brackets, attempt {n}"

    rows = PromptStage(PromptConfig(engine=MODEL_CFG, max_attempts=3),
                       engine=ScriptedEngine(answer))([captioned(), captioned("A cat.")])
    for r in rows:
        assert r["reject_reason"] == "unparseable_llm_output" and r["reject_stage"] == "prompts"
        assert r["llm_attempts"] == 3 and r["llm_raw_local"] == "no brackets, attempt 3"
        assert r["llm_raw_motion"] == GOOD_MOTION
        detail = json.loads(r["reject_detail"])
        assert detail["motion"]["ok"] and not detail["local"]["ok"]
        assert [a["raw"] for a in detail["local"]["attempts"]] == [
            f"no brackets, attempt {n}" for n in (1, 2, 3)]
        assert {a["error"] for a in detail["local"]["attempts"]} == {"no_brackets"}
    assert_valid_rows(rows)


def test_prompt_stage_reasons_no_objects_and_engine_failure():
    no_objects = ScriptedEngine(lambda r, n: GOOD_MOTION if is_motion(r) else "Answer: [[]]")
    rows = PromptStage(PromptConfig(engine=MODEL_CFG, max_attempts=2), engine=no_objects)(
        [captioned()])
    assert rows[0]["reject_reason"] == "no_objects"

    broken = ScriptedEngine(lambda r, n: EngineError("scripted", "prompt too long"))
    rows = PromptStage(PromptConfig(engine=MODEL_CFG, max_attempts=2), engine=broken)(
        [captioned()])
    assert rows[0]["reject_reason"] == "engine_error"  # the model never answered: transient
    assert "prompt too long" in rows[0]["reject_detail"] and rows[0]["llm_attempts"] == 2
    assert rows[0]["llm_raw_motion"] is None
    assert_valid_rows(rows)


def test_prompt_stage_object_cap():
    five = "[[a: A moves.] [b: B moves.] [c: C moves.] [d: D moves.] [e: E moves.]]"
    engine = ScriptedEngine(lambda r, n: GOOD_MOTION if is_motion(r) else five)
    rows = PromptStage(PromptConfig(engine=MODEL_CFG, max_attempts=1), engine=engine)(
        [captioned()])
    assert rows[0]["reject_reason"] == "unparseable_llm_output"
    assert "too_many_objects" in rows[0]["reject_detail"]
    cfg = PromptConfig(engine=MODEL_CFG, max_objects=3, on_too_many_objects="truncate")
    rows = PromptStage(cfg, engine=engine)([captioned()])
    assert [o["name"] for o in rows[0]["c_local"]] == ["a", "b", "c"]


def test_prompt_stage_needs_a_caption():
    engine = ScriptedEngine(lambda r, n: GOOD_MOTION)
    rows = PromptStage(PromptConfig(engine=MODEL_CFG), engine=engine)([captioned("  ")])
    assert rows[0]["reject_reason"] == "stage_error" and not engine.calls


def test_prompt_manifest_mode():
    objects = [{"name": "dog", "prompt": "A dog runs."}, {"name": "ball", "prompt": "A ball."}]
    stage = PromptStage(PromptConfig(max_objects=2))  # default engine: manifest
    rows = stage([
        captioned() | {"given_motion_prompt": "The dog runs.", "given_object_prompts": objects},
        captioned() | {"given_object_prompts": objects},
        captioned() | {"given_motion_prompt": "The dog runs.",
                       "given_object_prompts": [*objects, {"name": "cat", "prompt": "A cat."}]},
        captioned() | {"given_motion_prompt": "The dog runs.",
                       "given_object_prompts": [objects[0], objects[0]]},
        captioned() | {"given_motion_prompt": "The dog runs.", "given_object_prompts": []},
    ])
    ok = rows[0]
    assert ok["c_motion"] == "The dog runs." and ok["c_local"] == objects
    assert ok["prompts_engine"] == "manifest" and ok["llm_attempts"] == 0
    assert rows[1]["reject_reason"] == "prompts_failed"
    assert "prompts.engine.kind" in rows[1]["reject_detail"]
    assert rows[2]["reject_reason"] == "prompts_failed"
    assert "too_many_objects" in rows[2]["reject_detail"]
    assert "duplicate_name" in rows[3]["reject_detail"]
    assert rows[4]["reject_reason"] == "no_objects"
    assert_valid_rows(rows)


def test_prompt_stage_with_the_tiny_llama(tiny_llama_dir):
    """Random weights never answer in the format: every retry happens and raws are kept."""
    cfg = PromptConfig(engine=EngineConfig(kind="transformers", model_path=str(tiny_llama_dir),
                                           max_new_tokens=6, device="cpu"), max_attempts=2)
    rows = PromptStage(cfg)([captioned(), captioned("An eagle flies above the mountains.")])
    for r in rows:
        assert r["reject_reason"] == "unparseable_llm_output"
        assert r["llm_attempts"] == 2 and r["prompts_engine"] == "transformers"
        assert r["llm_raw_motion"] and r["llm_raw_local"]
        detail = json.loads(r["reject_detail"])
        assert len(detail["local"]["attempts"]) == 2
    assert_valid_rows(rows)

