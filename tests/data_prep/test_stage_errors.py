"""Stages raising: every affected row ends with the shared reason (data_prep.rows.reason_for).

Each stage used to carry its own copy of "InputNotReadable -> unreadable_input, VideoReadError
-> unreadable_video, anything else -> ..."; now they all go through one vocabulary, so the
same fault gets the same reason (and class: transient faults are retried by a later run)
whichever stage meets it.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from data_prep.engines import ChatRequest, EngineConfig
from data_prep.rows import is_rejected, new_row, reject, reject_class
from data_prep.stages import gt_masks, ingest, segment
from data_prep.stages.caption import CaptionConfig, CaptionStage
from data_prep.stages.ground import GroundingConfig, GroundingStage
from data_prep.stages.gt_masks import GtMasksStage
from data_prep.stages.ingest import IngestStage, uri_video_id
from data_prep.stages.prompts import PromptConfig, PromptStage
from data_prep.stages.score import ScoreConfig, ScoreStage
from data_prep.stages.segment import SegmentConfig, SegmentStage

MODEL_CFG = EngineConfig(kind="transformers", model_path="/unused/scripted-model")


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (matched by class name)."""


def clip_rows(video: Path, n: int = 3) -> list[dict]:
    """``n`` clip rows of ``video`` plus one row an earlier stage rejected."""
    rows = [new_row(video_id=f"v{i}", source_uri=str(video), clip_id=f"v{i}-0",
                    frame_indices=list(range(8)), num_frames=8, caption="A square moves.",
                    c_local=[{"name": "square", "prompt": "A red square moves."}],
                    boxes=[{"name": "square", "box": [2.0, 10.0, 18.0, 26.0], "score": 1.0}])
            for i in range(n)]
    return [*rows, reject(rows[0], "clip", "too_short", "earlier")]


def check_all_rejected(out: list[dict], rows: list[dict], stage: str, reason: str) -> None:
    assert out[-1] is rows[-1]  # the earlier reject passes through untouched
    for r in out[:-1]:
        assert is_rejected(r), r
        assert (r["reject_stage"], r["reject_reason"]) == (stage, reason), r["reject_detail"]
        assert r["reject_detail"]


class RaisingEngine:
    name, model_id = "raising", "raising-1"

    def generate(self, requests: list[ChatRequest]) -> list[str]:
        raise OutOfMemoryError("CUDA out of memory")


@pytest.mark.parametrize("stage_cls", [CaptionStage, PromptStage])
def test_engine_raising_rejects_every_row_as_engine_error(tiny_video, stage_cls):
    cfg = (CaptionConfig if stage_cls is CaptionStage else PromptConfig)(
        engine=MODEL_CFG, max_attempts=2)
    rows = clip_rows(tiny_video)
    out = stage_cls(cfg, engine=RaisingEngine())(rows)
    check_all_rejected(out, rows, stage_cls.__module__.rsplit(".", 1)[1], "engine_error")
    assert reject_class("engine_error") == "transient"
    assert "CUDA out of memory" in out[0]["reject_detail"]


def test_ground_forward_pass_out_of_memory(tiny_grounding_dino_dir, tiny_video, monkeypatch):
    stage = GroundingStage(GroundingConfig(model_path=str(tiny_grounding_dino_dir),
                                           device="cpu", batch_size=2))
    calls = []

    def detect(jobs):
        calls.append(len(jobs))
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(stage, "_detect", detect)
    rows = clip_rows(tiny_video)
    out = stage(rows)
    check_all_rejected(out, rows, "ground", "out_of_memory")
    assert calls == [2, 1, 1, 1]  # the batch, then row by row: each row failed on its own
    assert "Traceback" in out[0]["reject_detail"] and "20.00 GiB" in out[0]["reject_detail"]


def test_segment_tracking_out_of_memory(tiny_video, monkeypatch):
    def track(*args, **kwargs):
        raise OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(segment, "track_objects", track)
    predictor = types.SimpleNamespace(device=types.SimpleNamespace(type="cpu"))
    stage = SegmentStage(SegmentConfig(allow_random_weights=True), predictor=predictor)
    rows = clip_rows(tiny_video)
    check_all_rejected(stage(rows), rows, "segment", "out_of_memory")


def test_score_model_failure_rejects_the_batch(tiny_clip_dir, tiny_video):
    stage = ScoreStage(ScoreConfig(clip_model_path=str(tiny_clip_dir), batch_size=4))

    def embed(pixels):
        raise OutOfMemoryError("CUDA out of memory")

    stage.embedder.embed = embed
    rows = clip_rows(tiny_video)
    check_all_rejected(stage(rows), rows, "score", "out_of_memory")


def test_frames_that_do_not_read_get_the_same_reason_in_every_stage(tiny_clip_dir, tmp_path):
    missing = tmp_path / "gone.mp4"
    rows = clip_rows(missing, n=1)
    caption = CaptionStage(CaptionConfig(engine=MODEL_CFG), engine=RaisingEngine())
    score = ScoreStage(ScoreConfig(clip_model_path=str(tiny_clip_dir)))
    for stage, name in ((caption, "caption"), (score, "score")):
        check_all_rejected(stage(rows), rows, name, "unreadable_input")


def test_ingest_missing_vs_read_hiccup(tmp_path, monkeypatch):
    rows = [new_row(source_uri=str(tmp_path / "gone.mp4")), new_row(source_uri="s3://b/x.mp4")]

    def stat(uri):
        if uri.startswith("s3://"):
            raise ConnectionResetError(104, "Connection reset by peer")
        raise FileNotFoundError(f"{uri}: no such file")

    monkeypatch.setattr(ingest, "stat", stat)
    out = IngestStage()(rows)
    assert [r["reject_reason"] for r in out] == ["unreadable_input", "remote_read_error"]
    assert [reject_class(r["reject_reason"]) for r in out] == ["permanent", "transient"]
    assert out[1]["video_id"] == uri_video_id("s3://b/x.mp4")
    assert out[1]["reject_detail"] == "ConnectionResetError: [Errno 104] Connection reset by peer"
    bad_uri = IngestStage()([new_row(source_uri="file://host/x.mp4")])[0]
    assert bad_uri["reject_reason"] == "unreadable_input"  # ValueError: ingest's own mapping


def test_gt_annotation_missing_vs_read_hiccup(monkeypatch):
    def load(uri):
        if uri.endswith("flaky.json"):
            raise OSError("curl error 28: timeout")
        raise FileNotFoundError(uri)

    monkeypatch.setattr(gt_masks, "load_annotation", load)
    rows = [new_row(video_id=f"v{i}", clip_id=f"c{i}", annotation_uri=f"s3://b/{name}",
                    frame_indices=[0]) for i, name in enumerate(["gone.json", "flaky.json"])]
    out = GtMasksStage()(rows)
    assert [r["reject_reason"] for r in out] == ["no_gt_masks", "remote_read_error"]
