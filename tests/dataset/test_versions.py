"""Versioned datasets: atomic publish, readers never see partial versions, retention."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from ttm_ray.dataset.versions import (
    DatasetVersionError,
    VersionWriter,
    latest_version,
    list_versions,
    open_version,
    prune_versions,
)


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"clip_id": [f"c{i}" for i in range(start, start + n)],
                     "x": list(range(start, start + n))})


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
    w1 = VersionWriter(tmp_path)
    w1.write_table("data", table(2))
    v1 = w1.publish({})

    def crash(_staging: Path) -> None:
        raise RuntimeError("node died")

    w2 = VersionWriter(tmp_path)
    w2.write_table("data", table(5))
    with pytest.raises(RuntimeError, match="node died"):
        w2.publish({}, before_commit=crash)
    assert latest_version(tmp_path) == v1.name
    assert list_versions(tmp_path) == [v1.name]
    assert open_version(tmp_path).read().num_rows == 2
    with pytest.raises(DatasetVersionError, match="not a published version"):
        open_version(tmp_path, w2.name)
    # The next publish gets a fresh number and sweeps the crashed staging folder.
    w3 = VersionWriter(tmp_path)
    assert w3.name != w2.name
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
