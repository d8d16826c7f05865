"""Scenarios of versioned datasets that must hold on every kind of root, run by
test_versions.py on a local folder and by test_versions_s3.py on the S3 test server."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from ttm_ray.dataset import storage
from ttm_ray.dataset.versions import (
    DatasetVersion,
    DatasetVersionError,
    VersionWriter,
    latest_version,
    list_versions,
    next_version_name,
    open_version,
    prune_versions,
    write_part,
)


def table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"clip_id": [f"c{i}" for i in range(start, start + n)],
                     "x": list(range(start, start + n))})


def xs(version: DatasetVersion) -> list[int]:
    return version.read().column("x").to_pylist()


def publish_each_way(root: str | Path) -> DatasetVersion:
    """write_table (3 parts), write_part + add_entries, add_file; read it all back."""
    w = VersionWriter(root, rows_per_file=3)
    w.write_table("data", table(7))
    entries = [write_part(w.staging_uri, f"rejects/worker-{i}.parquet", table(2, 10 * i))
               for i in range(2)]
    w.add_entries("rejects", entries)
    w.add_file("card/README.md", b"# card\n")
    v = w.publish({"inputs": "x"})
    assert latest_version(root) == v.name and list_versions(root) == [v.name]
    opened = open_version(root)
    assert xs(opened) == list(range(7))
    assert len(opened.files("data")) == 3  # 3 + 3 + 1 rows
    assert opened.read("rejects").column("x").to_pylist() == [0, 1, 10, 11]
    assert opened.manifest["rows"] == {"data": 7, "rejects": 4}
    assert "x: int64" in opened.manifest["schemas"]["rejects"]  # from the part's footer
    assert opened.read_bytes("card/README.md") == b"# card\n"
    assert opened.uri == str(opened.path)
    opened.verify()
    storage.write_bytes(opened.files("data")[0], b"tampered")
    with pytest.raises(DatasetVersionError, match="checksum mismatch"):
        opened.verify()
    return opened


def crash_before_commit(root: str | Path) -> tuple[DatasetVersion, str]:
    """A publish that dies before ``_SUCCESS`` leaves nothing readers see; returns the first
    version and the crashed version's name."""
    w1 = VersionWriter(root)
    w1.write_table("data", table(2))
    v1 = w1.publish({})

    def crash(_staging: Path | str) -> None:
        raise RuntimeError("node died")

    w2 = VersionWriter(root)
    w2.write_table("data", table(5))
    with pytest.raises(RuntimeError, match="node died"):
        w2.publish({}, before_commit=crash)
    assert latest_version(root) == v1.name
    assert list_versions(root) == [v1.name]
    assert xs(open_version(root)) == [0, 1]
    with pytest.raises(DatasetVersionError, match="not a published version"):
        open_version(root, w2.name)
    assert next_version_name(root).split("-")[0] > w2.name.split("-")[0]  # never reused
    return v1, w2.name


def reuse_and_prune(root: str | Path) -> None:
    """Files shared by reference across three versions survive pruning while referenced, and
    go once nothing references them."""
    w1 = VersionWriter(root, rows_per_file=2)
    w1.write_table("data", table(4))
    w1.add_file("card/README.md", b"v1")
    v1 = w1.publish({})

    w2 = VersionWriter(root)
    w2.reuse(v1.manifest["files"][0], v1.name)  # data/part-00000: rows 0, 1
    w2.write_table("data", table(2, 100))
    w2.add_file("card/README.md", b"v2")
    v2 = w2.publish({})
    assert xs(open_version(root)) == [0, 1, 100, 101]
    assert v2.files("data")[0] == v1.files("data")[0]
    open_version(root).verify()

    w3 = VersionWriter(root)
    for entry in v2.manifest["files"]:
        w3.reuse(entry, v2.name)
    w3.write_table("data", table(1, 200))
    v3 = w3.publish({})
    assert [f.get("version") for f in v3.manifest["files"]] == [v1.name, v2.name, v2.name,
                                                                None]
    assert v3.manifest["rows"] == {"data": 5}
    assert v3.read_bytes("card/README.md") == b"v2"

    assert prune_versions(root, keep_last=1) == [v1.name, v2.name]
    assert list_versions(root) == [v3.name]
    with pytest.raises(DatasetVersionError, match="not a published version"):
        open_version(root, v1.name)
    survivor = open_version(root)
    assert xs(survivor) == [0, 1, 100, 101, 200]
    survivor.verify()
    assert storage.list_files(v1.uri) == ["data/part-00000.parquet"]
    assert storage.list_files(v2.uri) == ["card/README.md", "data/part-00001.parquet"]

    w4 = VersionWriter(root)
    assert int(w4.name[1:5]) == 4  # the pruned folders still hold their numbers
    w4.write_table("data", table(1, 300))
    w4.publish({})
    assert prune_versions(root, keep_last=1) == [v3.name]
    assert [storage.exists(v.uri) for v in (v1, v2, v3)] == [False, False, False]
    assert xs(open_version(root)) == [300]
