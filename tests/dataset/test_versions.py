"""Versioned datasets: atomic publish, readers never see partial versions, retention."""

from __future__ import annotations

from pathlib import Path

import pytest
from version_cases import crash_before_commit, publish_each_way, reuse_and_prune, table

from ttm_ray.dataset.versions import (
    DatasetVersionError,
    VersionWriter,
    latest_version,
    list_versions,
    open_version,
    prune_versions,
)


def test_publish_then_read_with_checksums(tmp_path: Path) -> None:
    w = VersionWriter(tmp_path, rows_per_file=3)
    w.write_table("data", table(7))
    w.write_table("rejects", table(0))
    w.add_file("card/README.md", b"# card\n")
    v = w.publish({"inputs": "x"})
    assert latest_version(tmp_path) == v.name
    opened = open_version(tmp_path)
    assert opened.read().column("x").to_pylist() == list(range(7))
    assert len(opened.files("data")) == 3  # 3 + 3 + 1 rows
    assert opened.read("rejects").num_rows == 0
    assert opened.manifest["rows"] == {"data": 7, "rejects": 0}
    opened.verify()
    (opened.path / "data" / "part-00000.parquet").write_bytes(b"tampered")
    with pytest.raises(DatasetVersionError, match="checksum mismatch"):
        opened.verify()


def test_crash_before_publish_leaves_latest_on_previous(tmp_path: Path) -> None:
    _, crashed = crash_before_commit(tmp_path)
    # The next publish gets a fresh number and sweeps the crashed staging folder.
    w3 = VersionWriter(tmp_path)
    assert w3.name != crashed
    w3.write_table("data", table(1))
    w3.publish({})
    assert not any((tmp_path / "staging").iterdir())


def test_no_version_yet_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetVersionError, match="no published dataset version"):
        open_version(tmp_path)


def test_retention_keeps_latest(tmp_path: Path) -> None:
    names = []
    for i in range(4):
        w = VersionWriter(tmp_path)
        w.write_table("data", table(1, i))
        names.append(w.publish({}).name)
    assert list_versions(tmp_path) == names
    assert prune_versions(tmp_path, keep_last=2) == names[:2]
    assert list_versions(tmp_path) == names[2:]
    assert latest_version(tmp_path) == names[-1]


def test_publish_each_way(tmp_path: Path) -> None:
    publish_each_way(tmp_path)


def test_reuse_by_reference_and_prune_keeps_shared_files(tmp_path: Path) -> None:
    reuse_and_prune(tmp_path)


def test_file_uri_root_is_local(tmp_path: Path) -> None:
    w = VersionWriter(tmp_path.as_uri())
    w.write_table("data", table(3))
    v = w.publish({})
    assert isinstance(v.path, Path) and v.path == tmp_path / "versions" / v.name
    assert open_version(tmp_path).read().num_rows == 3
