"""data_prep.rows: reject classes, the shared error vocabulary, and to_table's bad values."""

from __future__ import annotations

import errno

import pyarrow as pa
import pytest

from data_prep.engines import EngineError
from data_prep.rows import (
    ERRORS,
    REJECT_REASONS,
    ROW_SCHEMA,
    TRANSIENT_REASONS,
    is_out_of_memory,
    is_rejected,
    is_transient_reject,
    map_rows,
    new_row,
    reason_for,
    reject,
    reject_batch,
    reject_class,
    reject_error,
    to_table,
)
from ttm_ray.dataset.video import InputNotReadable, Video, VideoReadError

PERMANENT = {"bad_manifest_entry", "duplicate_input", "unreadable_input", "unreadable_video",
             "too_short", "too_small", "low_fps", "caption_failed", "unparseable_llm_output",
             "no_objects", "prompts_failed", "no_object_grounded", "segmentation_failed",
             "no_gt_masks", "filtered", "unencodable_value"}
TRANSIENT = {"remote_read_error", "engine_error", "out_of_memory", "worker_crashed",
             "stage_error"}


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError: matched by name, torch never imported."""


def rows(n: int = 3) -> list[dict]:
    return [new_row(video_id=f"v{i}", source_uri=f"/data/{i}.mp4", clip_id=f"v{i}-0")
            for i in range(n)]


# ----------------------------------------------------------------------------- classes
def test_every_reason_has_exactly_one_class():
    assert set(REJECT_REASONS) == PERMANENT | TRANSIENT and not PERMANENT & TRANSIENT
    assert TRANSIENT_REASONS == TRANSIENT and isinstance(TRANSIENT_REASONS, frozenset)
    for reason in REJECT_REASONS:
        assert reject_class(reason) == ("transient" if reason in TRANSIENT else "permanent")
        assert REJECT_REASONS[reason]  # every reason says what it means
    with pytest.raises(ValueError, match="unknown reject reason 'nope'"):
        reject_class("nope")


def test_attempts_column_and_transient_rows():
    assert ROW_SCHEMA.field("attempts").type == pa.int64()
    assert new_row()["attempts"] is None  # null means 1
    row = new_row(video_id="v")
    assert is_transient_reject(reject(row, "caption", "engine_error"))
    assert not is_transient_reject(reject(row, "clip", "too_short"))
    assert not is_transient_reject(row)


# ----------------------------------------------------------------------------- vocabulary
def test_no_error_type_is_shadowed_by_an_earlier_one():
    """The first isinstance match wins: a subclass listed after its base would never match."""
    types = list(ERRORS)
    for i, earlier in enumerate(types):
        for later in types[i + 1:]:
            assert not issubclass(later, earlier), (later, earlier)
    assert set(ERRORS.values()) <= set(REJECT_REASONS)


def wrapped(cause: BaseException) -> InputNotReadable:
    """An InputNotReadable raised from ``cause``, as Video() raises it."""
    try:
        try:
            raise cause
        except BaseException as exc:
            raise InputNotReadable("s3://b/v.mp4", f"{type(exc).__name__}: {exc}") from exc
    except InputNotReadable as outer:
        return outer


@pytest.mark.parametrize(("exc", "reason"), [
    (FileNotFoundError(errno.ENOENT, "gone"), "unreadable_input"),
    (PermissionError("denied"), "unreadable_input"),
    (IsADirectoryError("a folder"), "unreadable_input"),
    (OSError("AWS Error NETWORK_CONNECTION during GetObject"), "remote_read_error"),
    (ConnectionResetError("reset by peer"), "remote_read_error"),
    (TimeoutError("read timed out"), "remote_read_error"),
    (wrapped(FileNotFoundError("no such key")), "unreadable_input"),
    (wrapped(OSError("curl error 56")), "remote_read_error"),
    (wrapped(ValueError("bad URI")), "unreadable_input"),
    (VideoReadError("/v.mp4", "cannot decode"), "unreadable_video"),
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
    (MemoryError(), "out_of_memory"),
    (EngineError("vllm", "engine died"), "engine_error"),
    (KeyError("boxes"), "stage_error"),
    (ValueError("a bug"), "stage_error"),
])
def test_shared_mapping(exc, reason):
    assert reason_for(exc) == reason


def test_out_of_memory_by_name_without_torch():
    assert is_out_of_memory(OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("index out of range"))
    class Sub(OutOfMemoryError):  # a subclass of an OOM is one too
        pass
    assert reason_for(Sub("x")) == "out_of_memory"


def test_stage_specific_mapping_comes_first():
    specific = {ValueError: "unreadable_input", OSError: "no_gt_masks"}
    assert reason_for(ValueError("bad URI"), specific) == "unreadable_input"
    assert reason_for(OSError("flaky"), specific) == "no_gt_masks"  # overrides the shared one
    assert reason_for(KeyError("k"), specific) == "stage_error"
    assert reason_for(OutOfMemoryError("x"), specific) == "out_of_memory"


def test_map_rows_uses_the_shared_vocabulary():
    def fn(row: dict) -> dict:
        i = int(row["video_id"][1:])
        if i == 0:
            raise OSError(errno.ECONNRESET, "Connection reset by peer")
        if i == 1:
            raise OutOfMemoryError("CUDA out of memory")
        if i == 2:
            raise ValueError("mapped by the stage")
        if i == 3:
            raise KeyError("a bug")
        return dict(row, caption="ok")

    before = reject(new_row(video_id="x"), "clip", "too_short", "x")
    out = map_rows([*rows(5), before], "ingest", fn, expected={ValueError: "unreadable_input"})
    assert [r["reject_reason"] for r in out] == [
        "remote_read_error", "out_of_memory", "unreadable_input", "stage_error", None,
        "too_short"]
    assert out[5] is before  # rejected rows pass through untouched
    assert all(r["reject_stage"] == "ingest" for r in out[:4])
    assert out[0]["reject_detail"] == "ConnectionResetError: [Errno 104] Connection reset by peer"
    assert out[2]["reject_detail"] == "ValueError: mapped by the stage"
    for r in out[1], out[3]:  # a bug or an OOM: where it happened matters
        assert r["reject_detail"].startswith("Traceback") and "in fn" in r["reject_detail"]
    assert out[4]["caption"] == "ok"


def test_map_rows_on_a_missing_video(tmp_path):
    out = map_rows(rows(1), "clip", lambda r: Video(str(tmp_path / "gone.mp4")).info)
    assert out[0]["reject_reason"] == "unreadable_input"
    assert out[0]["reject_detail"].startswith(str(tmp_path / "gone.mp4"))  # our message as is


def test_reject_error_and_reject_batch():
    row = rows(1)[0]
    assert reject_error(row, "ground", OutOfMemoryError("oom"))["reject_reason"] == (
        "out_of_memory")
    batch = [*rows(2), reject(rows(1)[0], "caption", "caption_failed", "x")]
    out = reject_batch(batch, "score", OSError("S3 throttled"))
    assert [r["reject_reason"] for r in out] == ["remote_read_error"] * 2 + ["caption_failed"]
    assert out[2] is batch[2]
    assert [r["reject_stage"] for r in out] == ["score", "score", "caption"]


# ----------------------------------------------------------------------------- to_table
def test_to_table_rejects_only_the_row_with_a_lone_surrogate():
    good = rows(4)
    bad = dict(good[1], given_caption="a caption \ud800 with a lone surrogate")
    batch = [good[0], bad, good[2], good[3]]
    table = to_table(batch, stage="source")
    assert table.schema == ROW_SCHEMA and table.num_rows == 4
    out = table.to_pylist()
    for i in (0, 2, 3):
        assert out[i] == {**batch[i]}  # untouched
    r = out[1]
    assert r["status"] == "rejected" and r["reject_reason"] == "unencodable_value"
    assert r["reject_stage"] == "source" and reject_class(r["reject_reason"]) == "permanent"
    assert (r["video_id"], r["source_uri"], r["clip_id"]) == ("v1", "/data/1.mp4", "v1-0")
    assert r["given_caption"] is None
    assert "given_caption" in r["reject_detail"] and "\\ud800" in r["reject_detail"]


def test_to_table_escapes_identity_and_names_every_bad_column():
    row = new_row(video_id="v\ud800", source_uri="/data/\udcff.mp4", clip_id=None,
                  src_fps="fast", num_frames=2**70, caption="fine")
    (r,) = to_table([row]).to_pylist()
    assert r["reject_reason"] == "unencodable_value" and r["reject_stage"] == "encode"
    assert r["video_id"] == "v\\ud800" and r["source_uri"] == "/data/\\udcff.mp4"
    assert r["src_fps"] is None and r["num_frames"] is None and r["caption"] == "fine"
    for column in ("video_id", "source_uri", "src_fps", "num_frames"):
        assert f"column {column} " in r["reject_detail"]
    assert "'fast'" in r["reject_detail"]


def test_to_table_keeps_an_earlier_reject_visible():
    earlier = reject(rows(1)[0], "caption", "engine_error", "answer: \ud83d")
    (r,) = to_table([earlier]).to_pylist()
    assert r["reject_reason"] == "unencodable_value"
    assert "already rejected by 'caption' for 'engine_error'" in r["reject_detail"]


def test_to_table_wrong_struct_and_many_rows():
    batch = rows(50)
    batch[7] = dict(batch[7], given_object_prompts=[{"name": 3, "prompt": None}, "x"])
    batch[33] = dict(batch[33], frame_indices="0,1,2")
    out = to_table(batch).to_pylist()
    assert [i for i, r in enumerate(out) if is_rejected(r)] == [7, 33]
    assert out[7]["given_object_prompts"] is None and "given_object_prompts" in (
        out[7]["reject_detail"])
    assert to_table([]).num_rows == 0
