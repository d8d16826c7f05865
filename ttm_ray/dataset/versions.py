"""Versioned datasets: staged, checksummed, published atomically, read only when complete.

Layout under a dataset root::

    <root>/versions/<name>/data/part-*.parquet      training rows (SHARD_SCHEMA)
    <root>/versions/<name>/rejects/part-*.parquet   rows that did not make it, with reasons
    <root>/versions/<name>/manifest.json            row counts, files + sha256, lineage
    <root>/versions/<name>/card/...                 dataset card (counts, histograms)
    <root>/versions/<name>/_SUCCESS                 written last inside the version
    <root>/latest                                   name of the newest published version
    <root>/staging/<name>-<nonce>/                  versions being written (never read)

Publishing writes everything into ``staging``, then the manifest, then ``_SUCCESS``, renames the
folder into ``versions/`` and finally replaces ``latest`` (write-to-temp + rename). A reader
therefore sees either the previous version or the complete new one, never a partial one;
a crash leaves only a staging folder, which the next publish removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

VERSIONS = "versions"
STAGING = "staging"
LATEST = "latest"
SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^v(\d{4,})-[0-9A-Za-z_.-]+$")


class DatasetVersionError(RuntimeError):
    """A version is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_versions(root: str | Path) -> list[str]:
    """Published versions (with ``_SUCCESS``), oldest first."""
    vdir = Path(root) / VERSIONS
    if not vdir.is_dir():
        return []
    names = [p.name for p in vdir.iterdir() if _NAME.match(p.name) and (p / SUCCESS).is_file()]
    return sorted(names, key=lambda n: int(_NAME.match(n).group(1)))


def latest_version(root: str | Path) -> str | None:
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def next_version_name(root: str | Path) -> str:
    existing = [int(_NAME.match(n).group(1)) for n in list_versions(root)]
    staged = Path(root) / STAGING
    if staged.is_dir():  # never reuse a number a crashed publish may have claimed
        existing += [int(m.group(1)) for p in staged.iterdir() if (m := _NAME.match(p.name))]
    return f"v{max(existing, default=0) + 1:04d}-{time.strftime('%Y%m%dT%H%M%S')}"


@dataclass
class DatasetVersion:
    root: Path
    name: str
    manifest: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / VERSIONS / self.name

    def files(self, table: str = "data") -> list[Path]:
        return [self.path / f["path"] for f in self.manifest["files"] if f["table"] == table]

    def read(self, table: str = "data", columns: list[str] | None = None) -> pa.Table:
        files = self.files(table)
        if not files:  # every written table has at least one (maybe empty) part
            raise DatasetVersionError(f"{self.path}: version has no table {table!r}")
        return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)

    def verify(self) -> None:
        """Re-hash every file against the manifest (slow; for audits and tests)."""
        for f in self.manifest["files"]:
            if _sha256(self.path / f["path"]) != f["sha256"]:
                raise DatasetVersionError(f"{self.path / f['path']}: checksum mismatch")


def open_version(root: str | Path, name: str | None = "latest") -> DatasetVersion:
    """Open a published version (``latest`` by default); refuses incomplete ones."""
    root = Path(root)
    if name in (None, "latest"):
        name = latest_version(root)
        if name is None:
            raise DatasetVersionError(
                f"{root}: no published dataset version (no '{LATEST}' pointer); run `ttm-ray "
                "prep` first or give a version name"
            )
    vpath = root / VERSIONS / name
    if not (vpath / SUCCESS).is_file():
        raise DatasetVersionError(f"{vpath}: not a published version (no {SUCCESS})")
    return DatasetVersion(root, name, json.loads((vpath / MANIFEST).read_text()))


class VersionWriter:
    """Writes one version into staging; :meth:`publish` makes it visible atomically."""

    def __init__(self, root: str | Path, rows_per_file: int = 10_000,
                 name: str | None = None) -> None:
        self.root = Path(root)
        self.name = name or next_version_name(self.root)
        self.staging = self.root / STAGING / f"{self.name}-{uuid.uuid4().hex[:6]}"
        self.staging.mkdir(parents=True)
        self.rows_per_file = rows_per_file
        self._files: list[dict[str, Any]] = []
        self._counts: dict[str, int] = {}
        self._schemas: dict[str, str] = {}

    def write_table(self, table_name: str, table: pa.Table) -> None:
        """Append rows of ``table_name`` (``data``, ``rejects``), split into part files."""
        folder = self.staging / table_name
        folder.mkdir(exist_ok=True)
        self._schemas.setdefault(table_name, table.schema.to_string(show_schema_metadata=False))
        for offset in range(0, max(table.num_rows, 1), self.rows_per_file):
            chunk = table.slice(offset, self.rows_per_file)
            if chunk.num_rows == 0 and self._counts.get(table_name):
                break
            index = sum(1 for f in self._files if f["table"] == table_name)
            path = folder / f"part-{index:05d}.parquet"
            pq.write_table(chunk, path)
            self._files.append({"table": table_name, "path": str(path.relative_to(self.staging)),
                                "rows": chunk.num_rows, "bytes": path.stat().st_size,
                                "sha256": _sha256(path)})
            self._counts[table_name] = self._counts.get(table_name, 0) + chunk.num_rows

    def add_file(self, rel_path: str, content: bytes) -> Path:
        """Extra files of the version (dataset card, plots); checksummed like the parts."""
        path = self.staging / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self._files.append({"table": "extra", "path": rel_path, "rows": 0,
                            "bytes": len(content), "sha256": _sha256(path)})
        return path

    def publish(self, lineage: dict[str, Any],
                before_commit: Callable[[Path], None] | None = None) -> DatasetVersion:
        manifest = {
            "name": self.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": self._counts,
            "files": self._files,
            "schemas": self._schemas,
            "lineage": lineage,
        }
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if before_commit is not None:  # test hook: crash between staging and publish
            before_commit(self.staging)
        (self.staging / SUCCESS).write_text("")
        final = self.root / VERSIONS / self.name
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.staging, final)
        _atomic_write_text(self.root / LATEST, self.name + "\n")
        clean_staging(self.root)
        return DatasetVersion(self.root, self.name, manifest)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def clean_staging(root: str | Path, keep: Iterable[Path] = ()) -> list[Path]:
    """Remove leftovers of crashed publishes (they were never visible to readers)."""
    staging = Path(root) / STAGING
    removed = []
    keep = {Path(k) for k in keep}
    if staging.is_dir():
        for p in staging.iterdir():
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune_versions(root: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` published versions; never the ``latest`` one."""
    names = list_versions(root)
    current = latest_version(root)
    doomed = [n for n in names[: max(0, len(names) - keep_last)] if n != current]
    for n in doomed:
        shutil.rmtree(Path(root) / VERSIONS / n)
    return doomed
