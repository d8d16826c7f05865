"""The shard reader built for random access: small row groups, an LRU of groups, and the
sampler's (row-group order) x (shuffle window) permutation, locally and on S3, with exact
resume from a mid-epoch data position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ttm_ray.dataset.versions import DatasetVersion, VersionWriter, open_version, write_part
from ttm_ray.training.clips import RowReader
from ttm_ray.training.data import DataPosition, ShardedSampler, TrainDataConfig, cache_groups

GROUP = 4  # rows per row group of the test versions
COLUMNS = ["clip_id", "x"]


def publish(root: Path | str, rows: int, files: int = 3) -> DatasetVersion:
    """A version of ``rows`` rows (``clip_id = c<i>``) in ``files`` files of GROUP-row groups."""
    table = pa.table({"clip_id": [f"c{i}" for i in range(rows)], "x": list(range(rows))})
    writer = VersionWriter(root)
    per_file = -(-rows // files)
    for k, offset in enumerate(range(0, rows, per_file)):
        entry = write_part(writer.staging_uri, f"data/part-{k:05d}.parquet",
                           table.slice(offset, per_file), row_group_rows=GROUP)
        writer.add_entries("data", [entry])
    return writer.publish({})


def sampler(num_rows: int, group_rows: list[int] | None, rank: int = 0, world: int = 1,
            micro: int = 2, seed: int = 5, window: int = 3) -> ShardedSampler:
    return ShardedSampler(num_rows, world, rank, micro, 1, seed=seed, group_rows=group_rows,
                          shuffle_groups=window)


# ----------------------------------------------------------------------------- the order
def test_window_shuffle_is_a_seeded_permutation_per_epoch() -> None:
    groups = [3, 7, 1, 4, 4, 9, 2, 5, 6, 1, 8]  # irregular, like files' last groups
    n = sum(groups)
    s = sampler(n, groups)
    first = s.permutation(0).copy()
    assert sorted(first) == list(range(n))
    assert np.array_equal(sampler(n, groups).permutation(0), first)  # a pure (seed, epoch)
    assert not np.array_equal(s.permutation(1), first)
    assert not np.array_equal(sampler(n, groups, seed=6).permutation(0), first)
    with pytest.raises(ValueError, match="add up to"):
        sampler(n + 1, groups)


def test_consecutive_samples_stay_within_a_window_of_groups() -> None:
    window, groups = 3, [GROUP] * 20
    order = sampler(sum(groups), groups, window=window).permutation(0)
    span = window * GROUP
    seen: set[int] = set()
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        touched = set((chunk // GROUP).tolist())
        assert len(touched) <= window and not touched & seen  # whole groups, each once
        assert sorted(chunk) == sorted(g * GROUP + r for g in touched for r in range(GROUP))
        seen |= touched
    assert not np.array_equal(order, np.sort(order))  # rows really are shuffled


def test_without_groups_the_old_global_permutation_is_kept() -> None:
    old = np.random.default_rng([5, 2]).permutation(40)
    assert np.array_equal(sampler(40, None).permutation(2), old)


def test_cache_is_raised_to_a_shuffle_window() -> None:
    assert cache_groups(TrainDataConfig(row_group_cache=4, shuffle_groups=16)) == 16
    assert cache_groups(TrainDataConfig(row_group_cache=64, shuffle_groups=16)) == 64
    assert cache_groups(TrainDataConfig(row_group_cache=4, shuffle_groups=16,
                                        shuffle=False)) == 4


# ----------------------------------------------------------------------------- reading
def read_epoch(reader: RowReader, s: ShardedSampler, epoch: int = 0) -> list[str]:
    pos, ids = DataPosition(epoch, 0), []
    for _ in range(s.steps_per_epoch):
        for micro in s.next_micro_batches(pos):
            ids += [r["clip_id"] for r in reader.rows(micro)]
        pos = s.advance(pos)
    return ids


def test_a_window_fits_the_cache_so_each_group_is_read_once(tmp_path: Path) -> None:
    version = publish(tmp_path, 96)
    reader = RowReader(version, columns=COLUMNS, cache_groups=3)
    assert reader.group_rows == [GROUP] * 24 and reader.num_rows == 96
    windowed = sampler(96, reader.group_rows, window=3)
    assert sorted(read_epoch(reader, windowed)) == sorted(f"c{i}" for i in range(96))
    assert reader.groups_read == 24  # one read per group per epoch
    global_order = RowReader(version, columns=COLUMNS, cache_groups=3)
    read_epoch(global_order, sampler(96, None))
    assert global_order.groups_read > 2 * 24  # the old order misses most of the time


def test_cache_is_bounded_by_bytes(tmp_path: Path) -> None:
    reader = RowReader(publish(tmp_path, 40), columns=COLUMNS, cache_groups=100,
                       cache_bytes=1)
    reader.rows([0, 5, 0])
    assert reader.groups_read == 3 and len(reader._cache) == 1  # the last group only


def test_clip_ids_are_read_on_demand_from_one_column(tmp_path: Path) -> None:
    reader = RowReader(publish(tmp_path, 10), columns=COLUMNS)
    assert reader._clip_ids is None  # opening reads footers only
    assert reader.clip_ids == [f"c{i}" for i in range(10)] and reader.groups_read == 0


def run_ranks(version: DatasetVersion, world: int, start: DataPosition, steps: int
              ) -> list[list[str]]:
    """clip_ids each rank reads in ``steps`` steps from ``start``, on fresh objects (what a
    restarted worker builds)."""
    out = []
    for rank in range(world):
        reader = RowReader(version, columns=COLUMNS, cache_groups=3)
        s = sampler(reader.num_rows, reader.group_rows, rank=rank, world=world)
        pos, ids = start, []
        for _ in range(steps):
            for micro in s.next_micro_batches(pos):
                ids += [r["clip_id"] for r in reader.rows(micro)]
            pos = s.advance(pos)
        out.append(ids)
    return out


def test_resume_mid_epoch_reads_the_same_clips(tmp_path: Path) -> None:
    version = publish(tmp_path, 60)  # world 2 x micro 2: 15 steps per epoch
    straight = run_ranks(version, 2, DataPosition(), 20)  # crosses into epoch 1
    s = sampler(60, [GROUP] * 15, world=2)
    pos = DataPosition()
    for _ in range(7):
        pos = s.advance(pos)
    saved = pos.state_dict()  # what a checkpoint stores
    before = run_ranks(version, 2, DataPosition(), 7)
    after = run_ranks(version, 2, DataPosition.from_state(saved), 13)
    assert [b + a for b, a in zip(before, after, strict=True)] == straight
    assert len(set(straight[0][:30] + straight[1][:30])) == 60  # one epoch: every row once


def test_an_s3_copy_reads_the_same_rows(tmp_path: Path, s3_bucket: str) -> None:
    local, remote = publish(tmp_path, 30), publish(f"{s3_bucket}/ds", 30)
    here = RowReader(local, columns=COLUMNS, cache_groups=2)
    there = RowReader(remote, columns=COLUMNS, cache_groups=2)
    assert there.group_rows == here.group_rows and there.clip_ids == here.clip_ids
    order = sampler(30, there.group_rows).permutation(0).tolist()
    assert there.rows(order) == here.rows(order) == [{"clip_id": f"c{i}", "x": i}
                                                     for i in order]
    assert there.groups_read == here.groups_read


def test_group_rows_follow_the_files_row_groups(tmp_path: Path) -> None:
    publish(tmp_path, 9, files=2)  # 5 + 4 rows in groups of at most 4
    assert RowReader(open_version(tmp_path), columns=COLUMNS).group_rows == [4, 1, 4]
