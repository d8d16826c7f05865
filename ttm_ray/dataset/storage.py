"""Small file operations on "a local path or a URI", all through ``pyarrow.fs``.

Dataset versions live on a local disk in tests and on the quickstart, and on an object store
(``s3://bucket/prefix``) on the clusters; the code that publishes and reads them is the same,
so it speaks in *locations*: a plain path, a ``file://`` URI or any URI that
:func:`ttm_ray.dataset.video.filesystem` resolves. Object stores have no rename and no real
folders, so these helpers only promise what both sides can do:

* :func:`write_bytes` is atomic for readers on both: temp file + ``os.replace`` locally, one
  PUT (an object is visible whole or not at all) on an object store;
* folders are implied by the files in them: listing or deleting a missing folder is not an
  error, and :func:`remove_empty_dirs` cleans up what is left once files are deleted.

S3-compatible stores other than AWS (MinIO, the tests' moto server) are reached with plain
``s3://bucket/...`` URIs: ``pyarrow.fs.FileSystem.from_uri`` (pyarrow >= 15) takes the endpoint
from ``AWS_ENDPOINT_URL``, credentials and region from the usual AWS variables and files.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

from ttm_ray.dataset.video import filesystem, is_local, local_path

#: A local path (str or Path) or a URI string.
Location = str | os.PathLike[str]

_CHUNK = 8 << 20


def is_remote(location: Location) -> bool:
    """True for object-store URIs (``s3://``...), where rename does not exist."""
    return not is_local(str(location))


def native(location: Location) -> Path | str:
    """A ``Path`` for a local location (what local callers always got), the URI otherwise."""
    return Path(local_path(str(location))) if is_local(str(location)) else str(location)


def join(base: Location, *parts: str) -> str:
    """``base/part/...`` for a path or a URI (never ``os.path.join`` on a URI: no backslashes,
    no dropped scheme)."""
    base = str(base)
    if is_local(base) and not base.startswith("file:"):
        return os.path.join(base, *parts)
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    return f"{base.rstrip('/')}/{tail}" if tail else base


def _info(location: Location) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, path = filesystem(str(location))
    return fs, path, fs.get_file_info(path)


def exists(location: Location) -> bool:
    """A file or a folder (on an object store: any object under the prefix) is there."""
    return _info(location)[2].type != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    return _info(location)[2].type == pafs.FileType.File


def read_bytes(location: Location) -> bytes:
    """The whole file; FileNotFoundError names the location."""
    fs, path, info = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    with fs.open_input_stream(path) as f:
        return f.read()


def open_input_file(location: Location) -> pa.NativeFile:
    """A random-access file (what ``pq.ParquetFile`` needs to read one row group at a time)."""
    fs, path = filesystem(str(location))
    return fs.open_input_file(path)


def open_output_stream(location: Location) -> pa.NativeFile:
    """A new file (replaced if there), parent folders made locally; on an object store the
    object appears only when the stream is closed."""
    fs, path = filesystem(str(location))
    if is_local(str(location)):
        fs.create_dir(os.path.dirname(path), recursive=True)
    return fs.open_output_stream(path)


def write_bytes(location: Location, data: bytes) -> None:
    """Write a whole file so a reader sees the old content or the new, never a torn one."""
    if is_remote(location):
        with open_output_stream(location) as f:  # a single PUT: atomic on object stores
            f.write(data)
        return
    path = Path(local_path(str(location)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256(location: Location) -> str:
    """Streamed hex digest (files may be larger than memory)."""
    h = hashlib.sha256()
    fs, path = filesystem(str(location))
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashingWriter:
    """A write-only file object that hashes and counts what passes through it, so a writer
    knows the checksum of the bytes it wrote without reading them back (a second GET on an
    object store)."""

    def __init__(self, out: IO[bytes] | pa.NativeFile) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self._out.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:  # the caller closes the underlying stream
        self.closed = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def list_dir(location: Location) -> list[str]:
    """Names of the direct children (files and folders), sorted; ``[]`` when missing."""
    fs, path = filesystem(str(location))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted({info.base_name for info in infos})


def list_files(location: Location) -> list[str]:
    """Paths (``/``-separated, relative to ``location``) of every file below it."""
    fs, path = filesystem(str(location))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = path.rstrip("/") + "/"
    return sorted(i.path[len(prefix):].replace(os.sep, "/") for i in infos
                  if i.type == pafs.FileType.File)


def delete_file(location: Location) -> None:
    """Delete one file; a missing one is not an error."""
    fs, path, info = _info(location)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)


def delete_tree(location: Location) -> None:
    """Delete a folder and everything under it; a missing one is not an error."""
    fs, path = filesystem(str(location))
    if exists(location):
        fs.delete_dir(path)


def delete_files(base: Location, rel_paths: Iterable[str]) -> None:
    for rel in rel_paths:
        delete_file(join(base, rel))


def remove_empty_dirs(location: Location) -> bool:
    """Delete the folders under ``location`` (and itself) that hold no file any more (object
    stores may keep empty "folder" marker objects). Returns whether ``location`` is gone."""
    fs, path = filesystem(str(location))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File]
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory),
                  key=len, reverse=True)  # deepest first
    for d in [*dirs, path]:
        prefix = d.rstrip("/") + "/"
        if (not any(f.startswith(prefix) for f in files)
                and fs.get_file_info(d).type != pafs.FileType.NotFound):
            fs.delete_dir(d)
    return not files


__all__ = ["HashingWriter", "Location", "delete_file", "delete_files", "delete_tree", "exists",
           "is_file", "is_remote", "join", "list_dir", "list_files", "native",
           "open_input_file", "open_output_stream", "read_bytes", "remove_empty_dirs",
           "sha256", "write_bytes"]
