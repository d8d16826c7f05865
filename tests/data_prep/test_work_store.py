"""The work store at the row level: bounded flushes, last written wins, what a rerun skips
(transient rejects retried up to faults.max_attempts), and the streaming publish's groups,
reuse, refilter and card, all in-process (publish runs its group tasks inline without Ray)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.filtering import FilterConfig
from data_prep.publish import (
    ShardSettings,
    publish_work_store,
    read_groups,
    refilter_version,
)
from data_prep.rows import new_row, reject, to_table
from data_prep.work_index import DONE, NEW, DoneIndex, SkipDone, row_key
from data_prep.writer import CLIPS_DIR, REJECTS_DIR, PartWriter, list_parts, read_parts
from ttm_ray.dataset.versions import open_version, prune_versions

RLE = [{"size": [4, 4], "counts": "0G0"}]


def clip(video: str, i: int, score: float = 0.99, clips: int = 2, **kw) -> dict:
    name = "cat"
    kw.setdefault("caption", "a cat")
    return new_row(
        video_id=video, source_uri=f"/v/{video}.mp4", clip_id=f"{video}-c{i}", clip_index=i,
        video_clips=clips, c_motion="it walks",
        c_local=[{"name": name, "prompt": "a cat walks"}],
        masks=[{"name": name, "color_index": 0, "rle": RLE * 2}],
        object_scores=[{"name": name, "persistence": 1.0, "centroid_motion": 0.01,
                        "motion_iou_gap": 0.5, "track_confidence": None}],
        score_temporal_min=score, score_temporal_mean=score, **kw)


def write_run(work: Path, rows: list[dict], flush_rows: int = 2) -> None:
    writer = PartWriter(work, flush_rows=flush_rows, flush_seconds=3600)
    for i in range(0, len(rows), flush_rows):  # the pipeline's small batches: one part each
        writer.add(to_table(rows[i:i + flush_rows]))
    writer.close()


def test_part_writer_flushes_by_count_by_time_and_on_close(tmp_path: Path) -> None:
    writer = PartWriter(tmp_path, flush_rows=3, flush_seconds=0.2)
    writer.add(to_table([clip("a", 0), clip("a", 1)]))
    assert read_parts(tmp_path / CLIPS_DIR).num_rows == 0  # below both bounds: buffered
    writer.add(to_table([clip("b", 0)]))
    assert read_parts(tmp_path / CLIPS_DIR).num_rows == 3  # the count bound
    writer.add(to_table([reject(clip("c", 0), "ingest", "unreadable_video")]))
    deadline = time.monotonic() + 10
    while read_parts(tmp_path / REJECTS_DIR).num_rows == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # no further add(): the timer flushes a stalled buffer
    assert read_parts(tmp_path / REJECTS_DIR).num_rows == 1
    writer.add(to_table([clip("d", 0)]))
    writer.close()
    assert read_parts(tmp_path / CLIPS_DIR).num_rows == 4
    assert [p.rank for p in list_parts(tmp_path)] == [0, 1, 2]
    assert [p.path.parent.name for p in list_parts(tmp_path)] == [CLIPS_DIR, REJECTS_DIR,
                                                                  CLIPS_DIR]


def test_last_written_wins_across_clips_and_rejects(tmp_path: Path) -> None:
    work = tmp_path / "work"
    write_run(work, [clip("a", 0), clip("a", 1)])
    # a later run writes a reject for a0 (say, a changed stage): the reject is current
    write_run(work, [reject(clip("a", 0), "score", "out_of_memory", "OOM")])
    root = tmp_path / "ds"
    published = publish_work_store(work, root, FilterConfig(omega=0.0), {})
    version = published.version
    assert version.read("data").column("clip_id").to_pylist() == ["a-c1"]
    assert version.read("rejects").column("clip_id").to_pylist() == ["a-c0"]
    # and again: the clip written after the reject wins
    write_run(work, [clip("a", 0)])
    again = publish_work_store(work, root, FilterConfig(omega=0.0), {}).version
    assert sorted(again.read("data").column("clip_id").to_pylist()) == ["a-c0", "a-c1"]
    assert again.read("rejects").num_rows == 0


def test_retried_video_supersedes_its_whole_video_reject(tmp_path: Path) -> None:
    work = tmp_path / "work"
    whole = reject(new_row(video_id="v", source_uri="/v/v.mp4"), "ingest",
                   "remote_read_error", "timeout")
    write_run(work, [whole])
    assert DoneIndex.build(work, max_attempts=3).check([("v", row_key(None, "v", "/v/v.mp4"))]
                                                       ) == [1]  # transient: retry
    write_run(work, [clip("v", 0, attempts=2), clip("v", 1, attempts=2)])
    version = publish_work_store(work, tmp_path / "ds", FilterConfig(omega=0.0), {}).version
    assert version.read("rejects").num_rows == 0 and version.read("data").num_rows == 2
    index = DoneIndex.build(work, max_attempts=3)
    assert index.check([("v", row_key(None, "v", "/v/v.mp4"))]) == [DONE]  # every clip done


def test_done_index_retries_transient_rejects_until_max_attempts(tmp_path: Path) -> None:
    work = tmp_path / "work"
    rows = [clip("a", 0), reject(clip("a", 1), "caption", "engine_error", "503"),
            reject(clip("b", 0), "score", "out_of_memory", "OOM", ) | {"attempts": 3},
            reject(clip("b", 1), "ingest", "unreadable_video", "corrupt")]
    write_run(work, rows)
    index = DoneIndex.build(work, max_attempts=3)
    keys = [(r["video_id"], r["clip_id"]) for r in rows] + [("z", "z-c0")]
    assert index.check(keys) == [DONE, 1, DONE, DONE, NEW]
    # the in-pipeline stage drops done rows and numbers the retry
    out = SkipDone(index)([clip("a", 0), clip("a", 1), clip("z", 0)])
    assert [(r["clip_id"], r["attempts"]) for r in out] == [("a-c1", 2), ("z-c0", 1)]
    # video a: one clip done, one still to retry -> the video is not done
    assert index.check([("a", row_key(None, "a", "/v/a.mp4"))]) == [NEW]
    # a higher budget retries b-c0 again; permanent rejects stay done
    assert DoneIndex.build(work, max_attempts=5).check(keys[2:4]) == [3, DONE]


def test_incremental_publish_reuses_unchanged_groups_by_reference(tmp_path: Path) -> None:
    work, root = tmp_path / "work", tmp_path / "ds"
    write_run(work, [clip(f"v{i}", j) for i in range(6) for j in range(2)])
    first = publish_work_store(work, root, FilterConfig(omega=0.5), {}, rows_per_file=4)
    assert first.new_groups == 3 and first.reused_groups == 0
    write_run(work, [clip("new", 0), clip("new", 1)])
    second = publish_work_store(work, root, FilterConfig(omega=0.5), {}, rows_per_file=4)
    assert (second.reused_groups, second.new_groups) == (3, 1)
    shards = [f for f in second.version.manifest["files"] if f["table"] == "data"]
    assert [f["rows"] for f in shards if not f.get("version")] == [2]  # only the new group
    refs = [f for f in second.version.manifest["files"] if f.get("version")]
    assert {f["version"] for f in refs} == {first.version.name} and len(refs) == 3
    assert second.version.read("data").num_rows == 14
    second.version.verify()
    # pruning the first version keeps the files the second one references
    assert prune_versions(root, keep_last=1) == [first.version.name]
    assert open_version(root).read("data").num_rows == 14
    open_version(root).verify()


def test_refilter_streams_groups_and_counts_classes_on_the_card(tmp_path: Path) -> None:
    work, root = tmp_path / "work", tmp_path / "ds"
    rows = [clip(f"v{i}", 0, score=0.9 + i / 100) for i in range(10)]
    rows += [reject(clip("x", 0), "caption", "engine_error", "503"),
             reject(clip("y", 0), "ingest", "unreadable_video", "bad")]
    write_run(work, rows, flush_rows=3)
    publish_work_store(work, root, FilterConfig(omega=0.0), {}, rows_per_file=6)
    strict = refilter_version(root, FilterConfig(omega=0.955), {})
    kept = strict.version.read("data").column("score_temporal_min").to_pylist()
    assert sorted(kept) == pytest.approx([0.96, 0.97, 0.98, 0.99])
    card = strict.version.read_bytes("card/README.md").decode()
    assert "- kept clips: 4" in card and "permanent 7, transient 1" in card
    assert strict.stats.reasons["filtered"] == 6
    # and back: the loose filter reproduces the first version's groups, reused by reference
    back = refilter_version(root, FilterConfig(omega=0.0), {})
    assert back.stats.kept == 10 and back.new_groups == len(read_groups(back.version)) > 1


def test_filter_disabled_keeps_every_scored_clip(tmp_path: Path) -> None:
    work = tmp_path / "work"
    write_run(work, [clip("a", 0, score=0.1), clip("a", 1, score=0.99)])
    off = publish_work_store(work, tmp_path / "ds", FilterConfig(enabled=False), {})
    assert off.version.read("data").num_rows == 2 and off.stats.rejected == 0
    on = publish_work_store(work, tmp_path / "ds", FilterConfig(omega=0.955), {})
    assert on.version.read("data").num_rows == 1


def test_unencodable_value_becomes_a_reject_in_the_work_store(tmp_path: Path) -> None:
    rows = [clip("a", 0), clip("b", 0, caption="bad \ud800 caption")]
    table = to_table(rows, stage="caption")
    assert table.column("status").to_pylist() == ["ok", "rejected"]
    assert table.column("reject_reason").to_pylist()[1] == "unencodable_value"
    write_run(tmp_path, [r for r in table.to_pylist()])
    assert read_parts(tmp_path / REJECTS_DIR).num_rows == 1
    assert isinstance(read_parts(tmp_path / CLIPS_DIR), pa.Table)


def test_done_index_buckets_split_the_keys_without_overlap(tmp_path: Path) -> None:
    """Each index actor holds one hash bucket of video ids: no process holds every done id."""
    work = tmp_path / "work"
    write_run(work, [clip(f"v{i}", j) for i in range(20) for j in range(2)])
    whole = DoneIndex.build(work, max_attempts=3)
    parts = [DoneIndex.build(work, max_attempts=3, bucket=b, buckets=3) for b in range(3)]
    assert all(0 < len(p) < len(whole) for p in parts)
    merged: dict[str, int] = {}
    for p in parts:
        assert not set(p.states) & set(merged)
        merged.update(p.states)
    assert merged == whole.states and sum(p.rows for p in parts) == whole.rows == 40


def test_publish_writes_small_row_groups_for_random_reads(tmp_path: Path) -> None:
    """Training reads one row group per cache miss: the data table is cut by rows and bytes
    (publish.row_group_rows / row_group_bytes); the rejects table stays one group."""
    work = tmp_path / "work"
    write_run(work, [clip(f"v{i}", j) for i in range(5) for j in range(2)]
              + [clip("low", j, score=0.1, clips=3) for j in range(3)])

    def data_groups(settings: ShardSettings, name: str) -> list[int]:
        version = publish_work_store(work, tmp_path / name, FilterConfig(omega=0.5), {},
                                     settings=settings).version
        rejects = pq.ParquetFile(version.files("rejects")[0]).metadata.num_row_groups
        assert rejects == 1
        meta = pq.ParquetFile(version.files("data")[0]).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    assert data_groups(ShardSettings(), "default") == [10]  # 64 rows a group by default
    assert data_groups(ShardSettings(row_group_rows=4), "rows") == [4, 4, 2]
    assert data_groups(ShardSettings(row_group_bytes=1), "bytes") == [1] * 10
