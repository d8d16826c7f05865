"""Versioned datasets: staged, checksummed, published atomically, read only when complete.

Layout under a dataset root (a local path, or a URI such as ``s3://bucket/prefix``)::

    <root>/versions/<name>/data/part-*.parquet      training rows (SHARD_SCHEMA)
    <root>/versions/<name>/rejects/part-*.parquet   rows that did not make it, with reasons
    <root>/versions/<name>/manifest.json            row counts, files + sha256, lineage
    <root>/versions/<name>/card/...                 dataset card (counts, histograms)
    <root>/versions/<name>/_SUCCESS                 written last inside the version
    <root>/latest                                   name of the newest published version
    <root>/staging/<name>-<nonce>/                  versions being written (local roots only)

A version is *published* when its ``_SUCCESS`` exists; readers (:func:`list_versions`,
:func:`open_version`) see nothing else, so a reader gets either the previous version or the
complete new one, never a partial one.

* Local roots: everything is written into ``staging``, then the manifest, then ``_SUCCESS``;
  the folder is renamed into ``versions/`` and ``latest`` is replaced (temp file + rename). A
  crash leaves only a staging folder, which the next publish removes.
* Object stores have no rename: files go straight to ``versions/<name>/``, then the manifest,
  then ``_SUCCESS`` (the commit), then ``latest`` (one PUT: atomic). A crash leaves a folder
  without ``_SUCCESS``: invisible to readers, never reused as a name, and swept by the next
  publish.

Files shared by reference: a manifest entry with ``"version": "<older name>"`` is a file of
that older version (its ``path`` relative to the older version's folder), so an incremental
publish reuses unchanged shards without rewriting them (:meth:`VersionWriter.reuse`).
:func:`prune_versions` therefore never deletes a file a surviving version references: a
pruned version loses ``_SUCCESS`` and its manifest first (it is gone for readers), then every
file no survivor references; the folder stays while something in it is referenced.

One writer per root at a time (the rebuild lock guarantees it): a publish sweeps what crashed
writers left behind and would sweep a concurrent writer's files too.
"""

from __future__ import annotations

import contextlib
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

from ttm_ray.dataset.storage import (
    HashingWriter,
    Location,
    delete_file,
    delete_files,
    delete_tree,
    exists,
    is_file,
    is_remote,
    join,
    list_dir,
    list_files,
    native,
    open_input_file,
    open_output_stream,
    read_bytes,
    remove_empty_dirs,
    sha256,
    write_bytes,
)

VERSIONS = "versions"
STAGING = "staging"
LATEST = "latest"
SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^v(\d{4,})-[0-9A-Za-z_.-]+$")
_ENTRY_KEYS = ("path", "rows", "bytes", "sha256")


class DatasetVersionError(RuntimeError):
    """A version is missing, incomplete or corrupt."""


def _root(root: Location) -> Path | str:
    """A ``Path`` for local roots (``file://`` included), the URI without a trailing slash
    otherwise."""
    return native(root) if not is_remote(root) else str(root).rstrip("/")


def _number(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _check_rel(rel_path: str) -> str:
    """Manifest paths are ``/``-separated and stay inside their version's folder."""
    parts = rel_path.split("/")
    if not rel_path or rel_path.startswith("/") or "\\" in rel_path or ".." in parts:
        raise ValueError(f"{rel_path!r}: not a relative path inside the version")
    return rel_path


def _version_uri(root: Location, name: str) -> str:
    return join(root, VERSIONS, name)


def list_versions(root: Location) -> list[str]:
    """Published versions (with ``_SUCCESS``), oldest first."""
    root = _root(root)
    names = [n for n in list_dir(join(root, VERSIONS))
             if _number(n) is not None and is_file(join(root, VERSIONS, n, SUCCESS))]
    return sorted(names, key=_number)


def latest_version(root: Location) -> str | None:
    try:
        return read_bytes(join(_root(root), LATEST)).decode().strip() or None
    except FileNotFoundError:
        return None


def next_version_name(root: Location) -> str:
    """A name numbered above every version folder, published or not: a crashed publish (or a
    pruned version whose files are still referenced) keeps its number."""
    root = _root(root)
    claimed = list_dir(join(root, VERSIONS)) + list_dir(join(root, STAGING))
    numbers = [n for n in map(_number, claimed) if n is not None]
    return f"v{max(numbers, default=0) + 1:04d}-{time.strftime('%Y%m%dT%H%M%S')}"


def _manifest(root: Location, name: str) -> dict[str, Any]:
    try:
        return json.loads(read_bytes(join(_version_uri(root, name), MANIFEST)))
    except FileNotFoundError as exc:  # pruned between listing and reading
        raise DatasetVersionError(f"{_version_uri(root, name)}: no {MANIFEST} (pruned?)") \
            from exc


def _entry_uri(root: Location, owner: str, entry: dict[str, Any]) -> str:
    """Where a manifest entry's file is: in the version that wrote it (``entry["version"]``
    when shared by reference, else ``owner``)."""
    return join(root, VERSIONS, entry.get("version") or owner, entry["path"])


@dataclass
class DatasetVersion:
    """One published version.

    ``root``: a ``Path`` for local roots, the URI string for remote ones. ``path``: the
    version's folder, a ``Path`` for local roots (as it always was) and the URI string for
    remote ones (``Path`` would mangle ``s3://``); ``uri`` is the same location, always a str.
    Paths from :meth:`files` follow ``path``; open them with :meth:`open_input_file`.
    """

    root: Path | str
    name: str
    manifest: dict[str, Any]

    @property
    def uri(self) -> str:
        return _version_uri(self.root, self.name)

    @property
    def path(self) -> Path | str:
        return native(self.uri)

    def location(self, entry: dict[str, Any]) -> str:
        """Path or URI of a manifest entry's file (resolving entries shared by reference)."""
        return _entry_uri(self.root, self.name, entry)

    def files(self, table: str = "data") -> list[Path | str]:
        return [native(self.location(f)) for f in self.manifest["files"] if f["table"] == table]

    def open_input_file(self, path_or_uri: Location) -> pa.NativeFile:
        """A random-access file for one of :meth:`files` (what ``pq.ParquetFile`` reads row
        groups from), local or remote alike."""
        return open_input_file(path_or_uri)

    def read_bytes(self, rel_path: str) -> bytes:
        """A file of the version by its manifest path (``card/README.md``), wherever a shared
        entry really lives."""
        entry = next((f for f in self.manifest["files"] if f["path"] == rel_path), None)
        location = self.location(entry) if entry else join(self.uri, _check_rel(rel_path))
        return read_bytes(location)

    def read(self, table: str = "data", columns: list[str] | None = None) -> pa.Table:
        files = self.files(table)
        if not files:  # every written table has at least one (maybe empty) part
            raise DatasetVersionError(f"{self.path}: version has no table {table!r}")
        tables = []
        for f in files:
            with self.open_input_file(f) as src:
                tables.append(pq.read_table(src, columns=columns))
        return pa.concat_tables(tables)

    def verify(self) -> None:
        """Re-hash every file against the manifest (slow; for audits and tests)."""
        for f in self.manifest["files"]:
            location = self.location(f)
            if not is_file(location):
                raise DatasetVersionError(f"{location}: missing")
            if sha256(location) != f["sha256"]:
                raise DatasetVersionError(f"{location}: checksum mismatch")


def open_version(root: Location, name: str | None = "latest") -> DatasetVersion:
    """Open a published version (``latest`` by default); refuses incomplete ones."""
    root = _root(root)
    if name in (None, "latest"):
        name = latest_version(root)
        if name is None:
            raise DatasetVersionError(
                f"{root}: no published dataset version (no '{LATEST}' pointer); run `ttm-ray "
                "prep` first or give a version name"
            )
    vuri = _version_uri(root, name)
    if not is_file(join(vuri, SUCCESS)):
        raise DatasetVersionError(f"{native(vuri)}: not a published version (no {SUCCESS})")
    return DatasetVersion(root, name, _manifest(root, name))


def row_group_size(table: pa.Table, row_group_rows: int | None = None,
                   row_group_bytes: int | None = None) -> int | None:
    """Rows per Parquet row group so that a group holds at most ``row_group_rows`` rows and
    about ``row_group_bytes`` bytes (in memory, estimated from the table's average row);
    ``None``: pyarrow's default (one big group per file). Never below one row."""
    if row_group_rows is None and row_group_bytes is None:
        return None
    limit = row_group_rows if row_group_rows is not None else max(table.num_rows, 1)
    if row_group_bytes is not None and table.num_rows:
        per_row = max(1, table.nbytes // table.num_rows)
        limit = min(limit, row_group_bytes // per_row)
    return max(1, int(limit))


def write_part(staging_uri: str, rel_path: str, table: pa.Table,
               row_group_rows: int | None = None,
               row_group_bytes: int | None = None) -> dict[str, Any]:
    """Write one Parquet part of a version being written and return its manifest entry
    (``path``, ``rows``, ``bytes``, ``sha256`` of the bytes as written).

    A plain function so Ray workers can write parts in parallel into
    :attr:`VersionWriter.staging_uri`; the driver registers the entries with
    :meth:`VersionWriter.add_entries`. Hashing while writing saves reading the part back.
    ``row_group_rows`` / ``row_group_bytes`` bound the row groups (:func:`row_group_size`):
    small groups make a random row cheap to read (training reads one group per miss).
    """
    with open_output_stream(join(staging_uri, _check_rel(rel_path))) as out:
        sink = HashingWriter(out)
        pq.write_table(table, sink,
                       row_group_size=row_group_size(table, row_group_rows, row_group_bytes))
    return {"path": rel_path, "rows": table.num_rows, "bytes": sink.size,
            "sha256": sink.hexdigest()}


class VersionWriter:
    """Writes one version; :meth:`publish` makes it visible atomically.

    Files go to :attr:`staging_uri`: a staging folder renamed at publish on local roots, the
    version's own folder on object stores (invisible until ``_SUCCESS``).
    """

    def __init__(self, root: Location, rows_per_file: int = 10_000,
                 name: str | None = None) -> None:
        self.root = _root(root)
        self.name = name or next_version_name(self.root)
        self.remote = is_remote(self.root)
        #: where the files go: a Path locally (as before), the URI on object stores
        self.staging: Path | str
        if self.remote:
            self.staging = _version_uri(self.root, self.name)
            if exists(self.staging):  # never write into someone else's version
                raise DatasetVersionError(f"{self.staging}: already exists")
        else:
            assert isinstance(self.root, Path)
            self.staging = self.root / STAGING / f"{self.name}-{uuid.uuid4().hex[:6]}"
            self.staging.mkdir(parents=True)
        self.rows_per_file = rows_per_file
        self._committed = False
        self._files: list[dict[str, Any]] = []
        self._counts: dict[str, int] = {}
        self._schemas: dict[str, str] = {}

    @property
    def staging_uri(self) -> str:
        """Where this version's files go (give it to :func:`write_part`)."""
        return str(self.staging)

    # ------------------------------------------------------------------ registering files
    def _add(self, entry: dict[str, Any]) -> None:
        _check_rel(entry["path"])
        if any(f["path"] == entry["path"] for f in self._files):
            raise ValueError(f"{entry['path']}: already in version {self.name}")
        self._files.append(entry)
        if entry["table"] != "extra":
            self._counts[entry["table"]] = self._counts.get(entry["table"], 0) + entry["rows"]

    def add_entries(self, table_name: str, entries: Iterable[dict[str, Any]]) -> None:
        """Register parts written by :func:`write_part` (by this process or Ray workers)."""
        for entry in entries:
            missing = [k for k in _ENTRY_KEYS if k not in entry]
            if missing:
                raise ValueError(f"manifest entry {entry!r} lacks {missing}")
            self._add({**entry, "table": table_name})

    def reuse(self, entry: dict[str, Any], version: str) -> None:
        """Share a file of the published ``version`` (an entry of its manifest) instead of
        rewriting it. An entry that already points at an older version keeps pointing there,
        so references never chain."""
        if version == self.name:
            raise ValueError(f"version {self.name} cannot reuse its own files")
        self._add({"table": entry["table"], **{k: entry[k] for k in _ENTRY_KEYS},
                   "version": entry.get("version") or version})

    def _part_path(self, table_name: str) -> str:
        taken = {f["path"] for f in self._files}
        index = sum(1 for f in self._files if f["table"] == table_name)
        while f"{table_name}/part-{index:05d}.parquet" in taken:
            index += 1
        return f"{table_name}/part-{index:05d}.parquet"

    def write_table(self, table_name: str, table: pa.Table) -> None:
        """Append rows of ``table_name`` (``data``, ``rejects``), split into part files."""
        self._schemas.setdefault(table_name, table.schema.to_string(show_schema_metadata=False))
        for offset in range(0, max(table.num_rows, 1), self.rows_per_file):
            chunk = table.slice(offset, self.rows_per_file)
            if chunk.num_rows == 0 and self._counts.get(table_name):
                break
            entry = write_part(self.staging_uri, self._part_path(table_name), chunk)
            self.add_entries(table_name, [entry])

    def add_file(self, rel_path: str, content: bytes) -> Path | str:
        """Extra files of the version (dataset card, plots); checksummed like the parts."""
        location = join(self.staging_uri, _check_rel(rel_path))
        write_bytes(location, content)
        self._add({"table": "extra", "path": rel_path, "rows": 0, "bytes": len(content),
                   "sha256": hashlib.sha256(content).hexdigest()})
        return native(location)

    # ------------------------------------------------------------------ publishing
    def _file_location(self, entry: dict[str, Any]) -> str:
        if entry.get("version"):
            return _entry_uri(self.root, self.name, entry)
        return join(self.staging_uri, entry["path"])

    def _fill_schemas(self) -> None:
        """Tables registered only through entries (workers' parts, reused shards) get their
        schema from their first file's footer."""
        for table_name in self._counts:
            if table_name in self._schemas:
                continue
            first = next(f for f in self._files if f["table"] == table_name)
            with open_input_file(self._file_location(first)) as src:
                schema = pq.read_schema(src)
            self._schemas[table_name] = schema.to_string(show_schema_metadata=False)

    def publish(self, lineage: dict[str, Any],
                before_commit: Callable[[Path | str], None] | None = None) -> DatasetVersion:
        """Manifest, then ``_SUCCESS`` (the commit), then ``latest``; ``before_commit`` is a
        test hook called with :attr:`staging` between the manifest and the commit."""
        self._fill_schemas()
        manifest = {
            "name": self.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rows": self._counts,
            "files": self._files,
            "schemas": self._schemas,
            "lineage": lineage,
        }
        write_bytes(join(self.staging_uri, MANIFEST),
                    json.dumps(manifest, indent=2, default=str).encode())
        if before_commit is not None:  # test hook: crash between staging and publish
            before_commit(self.staging)
        write_bytes(join(self.staging_uri, SUCCESS), b"")
        if not self.remote:
            final = Path(self.root) / VERSIONS / self.name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging, final)
        self._committed = True
        write_bytes(join(self.root, LATEST), (self.name + "\n").encode())
        clean_staging(self.root)
        return DatasetVersion(self.root, self.name, manifest)

    def abort(self) -> None:
        """Remove what this writer (and workers writing into :attr:`staging_uri`) wrote; best
        effort, and nothing once the version is committed."""
        if self._committed:
            return
        if self.remote:
            with contextlib.suppress(OSError):  # else left for the next publish's sweep
                delete_tree(self.staging_uri)
        else:
            shutil.rmtree(self.staging, ignore_errors=True)


# ----------------------------------------------------------------------------- cleaning up
def _references(root: Location, names: Iterable[str]) -> set[tuple[str, str]]:
    """``(version, path)`` of every file the manifests of ``names`` use."""
    return {(f.get("version") or n, f["path"]) for n in names
            for f in _manifest(root, n)["files"]}


def remove_unreferenced(root: Location, names: Iterable[str],
                        referenced: set[tuple[str, str]]) -> list[str]:
    """Delete the files of the (unpublished) version folders ``names`` except those in
    ``referenced``; folders left empty go too. Returns the folders that are gone."""
    root = _root(root)
    gone = []
    for name in names:
        folder = _version_uri(root, name)
        delete_files(folder, [p for p in list_files(folder) if (name, p) not in referenced])
        if remove_empty_dirs(folder):
            gone.append(folder)
    return gone


def _unpublished_below(root: Location, bound: int, published: Iterable[str]) -> list[str]:
    """Version folders without ``_SUCCESS`` numbered below ``bound``: crashed publishes and
    pruned versions. A writer still at work numbered its version above every published one,
    so it is never among them."""
    published = set(published)
    return [n for n in list_dir(join(root, VERSIONS))
            if n not in published and (num := _number(n)) is not None and num < bound]


def clean_staging(root: Location, keep: Iterable[Location] = ()) -> list[Path | str]:
    """Remove leftovers of crashed publishes (they were never visible to readers): staging
    folders on local roots; on object stores, unpublished version folders older than the
    newest published one (files other versions reference stay)."""
    root = _root(root)
    if isinstance(root, Path):
        staging, kept = root / STAGING, {Path(str(k)) for k in keep}
        doomed = [p for p in staging.iterdir() if p not in kept] if staging.is_dir() else []
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        return list(doomed)
    published = list_versions(root)
    if not published:
        return []
    kept_uris = {str(k).rstrip("/") for k in keep}
    candidates = [n for n in _unpublished_below(root, _number(published[-1]) or 0, published)
                  if _version_uri(root, n) not in kept_uris]
    if not candidates:  # the usual case: no manifest to read
        return []
    return list(remove_unreferenced(root, candidates, _references(root, published)))


def prune_versions(root: Location, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` published versions; never the ``latest`` one.

    A doomed version first loses ``_SUCCESS`` and its manifest (readers stop seeing it), then
    its files except those a surviving version shares by reference. Folders of versions
    pruned earlier are swept again, as their files may have lost their last reference.
    """
    root = _root(root)
    names = list_versions(root)
    current = latest_version(root)
    doomed = [n for n in names[: max(0, len(names) - keep_last)] if n != current]
    if not doomed:
        return []
    for n in doomed:
        delete_file(join(_version_uri(root, n), SUCCESS))
        delete_file(join(_version_uri(root, n), MANIFEST))
    survivors = [n for n in names if n not in doomed]
    bound = max(_number(n) or 0 for n in names)
    sweep = dict.fromkeys([*doomed, *_unpublished_below(root, bound, survivors)])
    remove_unreferenced(root, sweep, _references(root, survivors))
    return doomed
