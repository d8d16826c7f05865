"""Versioned datasets on an object store: the same guarantees through plain ``s3://`` URIs,
against a real S3 API (moto's server on loopback, tests/s3.py), nothing of ours mocked."""

from __future__ import annotations

from pathlib import Path

import pytest
from version_cases import crash_before_commit, publish_each_way, reuse_and_prune, table

from ttm_ray.dataset import storage
from ttm_ray.dataset.versions import (
    SUCCESS,
    DatasetVersionError,
    VersionWriter,
    list_versions,
    open_version,
)
from ttm_ray.training.clips import RowReader


def test_publish_each_way_without_staging(s3_bucket: str) -> None:
    root = f"{s3_bucket}/datasets/tiny"
    v = publish_each_way(root)
    assert v.path == v.uri == f"{root}/versions/{v.name}"
    assert all(str(f).startswith(f"{v.uri}/data/part-") for f in v.files("data"))
    assert storage.list_dir(root) == ["latest", "versions"]  # no rename: no staging folder


def test_crash_before_commit_is_invisible_and_swept(s3_bucket: str) -> None:
    root = f"{s3_bucket}/ds"
    v1, crashed = crash_before_commit(root)
    crashed_uri = f"{root}/versions/{crashed}"
    assert storage.exists(f"{crashed_uri}/manifest.json")
    assert not storage.exists(f"{crashed_uri}/{SUCCESS}")
    w3 = VersionWriter(root)
    w3.write_table("data", table(1))
    w3.publish({})
    assert not storage.exists(crashed_uri)  # swept by the next publish
    assert list_versions(root) == [v1.name, w3.name]


def test_abort_removes_what_the_writer_wrote(s3_bucket: str) -> None:
    root = f"{s3_bucket}/ds"
    w = VersionWriter(root)
    w.write_table("data", table(3))
    w.add_file("card/README.md", b"x")
    assert storage.exists(w.staging_uri)
    w.abort()
    assert not storage.exists(w.staging_uri) and list_versions(root) == []


def test_reuse_by_reference_and_prune_keeps_shared_files(s3_bucket: str) -> None:
    reuse_and_prune(f"{s3_bucket}/ds")


def test_row_reader_reads_the_same_rows_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    """What training does: random access by row group through ``open_input_file``."""
    rows = table(10)
    readers = []
    for root in (tmp_path, f"{s3_bucket}/ds"):
        w = VersionWriter(root, rows_per_file=4)
        w.write_table("data", rows)
        w.publish({})
        readers.append(RowReader(open_version(root), columns=["clip_id", "x"],
                                 cache_groups=1))
    local, remote = readers
    assert remote.num_rows == local.num_rows == 10 and remote.clip_ids == local.clip_ids
    order = [9, 0, 5, 4, 3, 8]
    assert remote.rows(order) == local.rows(order) == [{"clip_id": f"c{i}", "x": i}
                                                       for i in order]


def test_writing_into_an_existing_version_is_refused(s3_bucket: str) -> None:
    w = VersionWriter(f"{s3_bucket}/ds")
    w.write_table("data", table(1))
    v = w.publish({})
    with pytest.raises(DatasetVersionError, match="already exists"):
        VersionWriter(f"{s3_bucket}/ds", name=v.name)
