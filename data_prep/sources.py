"""Where the inputs come from: a folder, a manifest file, or a filesystem URI prefix.

:func:`list_inputs` turns a :class:`SourceConfig` into input rows (``new_row(source_uri=...,
given_*=...)``). Folders and URIs share one code path (``pyarrow.fs``; fsspec for protocols
pyarrow lacks), so ``/data/videos``, ``file:///data/videos`` and ``s3://bucket/videos/`` list
the same way. A source that cannot be read at all (missing folder or manifest, unknown
manifest format, no ``path``/``uri`` column) is a configuration error raised before any work
starts; one bad entry inside a manifest becomes a reject row (``bad_manifest_entry``) and the
run goes on, and so does an entry naming an input again (``duplicate_input``, see
:func:`duplicate_reject`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_prep.rows import new_row, reject
from data_prep.stages.ingest import uri_video_id
from ttm_ray.config import ConfigError, constrained
from ttm_ray.dataset.video import filesystem, is_local, local_path, open_input

log = logging.getLogger(__name__)

STAGE = "source"
VIDEO_EXTENSIONS = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]
# Manifest columns -> row columns; every other manifest column is ignored.
_GIVEN = {"caption": "given_caption", "motion_prompt": "given_motion_prompt"}
_MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                     ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}


@dataclass
class SourceConfig:
    kind: Literal["folder", "manifest", "uri"] = constrained(
        "manifest", help="folder: a local folder, recursive; manifest: a Parquet/JSONL/CSV "
        "file with a path or uri column; uri: a filesystem URI prefix (s3://, gs://, file://)")
    path: str = constrained(
        "runs/corpus/manifest.parquet", nonempty=True,
        help="the folder, manifest file or URI prefix (manifests may be URIs too)")
    extensions: list[str] = constrained(  # noqa: RUF009 - returns a dataclasses.field
        default_factory=lambda: list(VIDEO_EXTENSIONS), nonempty=True,
        help="file name endings listed as videos (folder/uri kinds; case-insensitive)")
    limit: int | None = constrained(None, gt=0, help="keep only the first N inputs (sorted)")

    def validate(self) -> None:
        bad = [e for e in self.extensions if not e.startswith(".") or len(e) < 2]
        if bad:
            raise ValueError(f"extensions must look like '.mp4', got {bad}")


class SourceError(ConfigError):
    """The source itself is unusable: stop before any work (names the path and config key)."""

    def __init__(self, cfg: SourceConfig, problem: str) -> None:
        super().__init__([f"source.path: {problem}: {cfg.path} (source.kind={cfg.kind!r})"])


def list_inputs(cfg: SourceConfig) -> list[dict]:
    """Input rows for ``cfg``, in a stable (sorted / manifest) order, at most ``cfg.limit``."""
    if cfg.kind == "manifest":
        rows = read_manifest(cfg)
    else:
        rows = [new_row(source_uri=uri) for uri in list_video_files(cfg)]
    return rows[: cfg.limit] if cfg.limit else rows


# ----------------------------------------------------------------------------- folders, URIs
def list_video_files(cfg: SourceConfig) -> list[str]:
    """Video URIs under ``cfg.path`` (recursive, sorted; hidden files and folders skipped).

    Folder kind returns absolute local paths; uri kind returns URIs spelled like
    ``cfg.path`` (``s3://bucket/prefix/a/b.mp4``).
    """
    root = cfg.path
    if cfg.kind == "folder" and not is_local(root):
        raise SourceError(cfg, "not a local folder (use source.kind='uri' for remote URIs)")
    try:
        fs, base = filesystem(root)
        info = fs.get_file_info(base)
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(cfg, f"cannot open ({type(exc).__name__}: {exc})") from exc
    if info.type == pafs.FileType.NotFound:
        raise SourceError(cfg, "folder not found")
    if info.type != pafs.FileType.Directory:
        raise SourceError(cfg, "not a folder (a single manifest needs source.kind='manifest')")
    try:
        listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise SourceError(cfg, f"cannot list ({exc})") from exc
    exts = tuple(e.lower() for e in cfg.extensions)
    base = base.rstrip("/")
    if cfg.kind == "folder":
        prefix = os.path.abspath(local_path(root)).rstrip("/")
    else:
        prefix = root.rstrip("/")
    out = []
    for item in listed:
        rel = item.path[len(base):].lstrip("/")
        # Hidden entries are editor/upload leftovers (".x.mp4.part", "._x.mp4"), not inputs.
        if (item.type != pafs.FileType.File or not rel.lower().endswith(exts)
                or any(part.startswith(".") for part in rel.split("/"))):
            continue
        out.append(f"{prefix}/{rel}")
    return sorted(out)


# ----------------------------------------------------------------------------- manifests
def _manifest_dir(uri: str) -> str:
    if is_local(uri) and not uri.startswith("file:"):
        return os.path.dirname(os.path.abspath(uri))
    return uri.rsplit("/", 1)[0]


def resolve(ref: str, manifest_dir: str) -> str:
    """A manifest entry's path: URIs and absolute paths as given, relative ones joined."""
    if not is_local(ref) or ref.startswith("file:") or os.path.isabs(ref):
        return ref
    if is_local(manifest_dir) and not manifest_dir.startswith("file:"):
        return os.path.normpath(os.path.join(manifest_dir, ref))
    parts = urlsplit(manifest_dir)
    return parts._replace(path=posixpath.normpath(posixpath.join(parts.path, ref))).geturl()


def _read_records(cfg: SourceConfig) -> tuple[list[Any], set[str]]:
    """``(records, column names)``; a record that did not parse is an ``Exception``."""
    fmt = _MANIFEST_FORMATS.get(posixpath.splitext(urlsplit(cfg.path).path)[1].lower())
    if fmt is None:
        raise SourceError(cfg, f"unknown manifest format (use one of {sorted(_MANIFEST_FORMATS)})")
    try:
        fs, path = filesystem(cfg.path)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(cfg, "manifest not found")
        if info.type != pafs.FileType.File:
            raise SourceError(cfg, "manifest is not a file")
        if fmt == "parquet":
            table = pq.read_table(path, filesystem=fs)
            return table.to_pylist(), set(table.column_names)
        with open_input(cfg.path) as f:
            text = f.read().decode("utf-8-sig")
    except SourceError:
        raise
    except Exception as exc:  # ArrowInvalid (not Parquet), OSError, UnicodeDecodeError
        raise SourceError(cfg, f"cannot read manifest ({type(exc).__name__}: {exc})") from exc
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        # CSV has no null: an empty cell means "not given".
        records = [{k: (v if v != "" else None) for k, v in r.items()} for r in reader]
        return records, set(reader.fieldnames or [])
    if fmt == "json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(cfg, f"manifest is not valid JSON ({exc})") from exc
    else:  # JSON Lines: one bad line is one reject, not a failed run
        records = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                records.append(ValueError(f"not a JSON line ({exc}): {line[:200]}"))
    columns = {k for r in records if isinstance(r, dict) for k in r}
    return records, columns


def _object_prompts(value: Any) -> list[dict] | None:
    if value is None:
        return None
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        value = json.loads(value)
    if not isinstance(value, list):
        raise ValueError(f"object_prompts must be a list of {{name, prompt}}, got {value!r:.200}")
    out = []
    for item in value:
        if (not isinstance(item, dict) or not isinstance(item.get("name"), str)
                or not isinstance(item.get("prompt"), str)):
            raise ValueError(f"object_prompts entry needs name and prompt strings: {item!r:.200}")
        out.append({"name": item["name"], "prompt": item["prompt"]})
    return out


def _optional_str(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value or None
    raise ValueError(f"{key} must be a string, got {value!r:.200}")


def _entry_row(record: Any, manifest_dir: str) -> dict:
    """One manifest record -> an input row. Raises ValueError for a bad entry."""
    if isinstance(record, Exception):
        raise record
    if not isinstance(record, dict):
        raise ValueError(f"entry is not an object: {record!r:.200}")
    ref = _optional_str(record, "uri") or _optional_str(record, "path")
    if not ref:
        raise ValueError("entry has no path/uri")
    annotation = _optional_str(record, "annotation")
    return new_row(
        source_uri=resolve(ref, manifest_dir),
        given_caption=_optional_str(record, "caption"),
        given_motion_prompt=_optional_str(record, "motion_prompt"),
        given_object_prompts=_object_prompts(record.get("object_prompts")),
        annotation_uri=resolve(annotation, manifest_dir) if annotation else None,
    )


def read_manifest(cfg: SourceConfig) -> list[dict]:
    """Rows for every manifest entry: input rows, or ``bad_manifest_entry`` rejects."""
    records, columns = _read_records(cfg)
    if records and not columns & {"path", "uri"}:
        raise SourceError(cfg, f"manifest has no 'path' or 'uri' column (has {sorted(columns)})")
    manifest_dir = _manifest_dir(cfg.path)
    rows: list[dict] = []
    first: dict[str, tuple[int, dict]] = {}  # source_uri -> its first entry (index, row)
    repeats: Counter[str] = Counter()
    for i, record in enumerate(records):
        try:
            row = _entry_row(record, manifest_dir)
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            where = f"{cfg.path}#{i}"
            bad = new_row(source_uri=where, video_id=uri_video_id(where))
            rows.append(reject(bad, STAGE, "bad_manifest_entry", f"entry {i}: {exc}"))
            continue
        uri = row["source_uri"]
        if uri in first:
            repeats[uri] += 1
            rows.append(duplicate_reject(row, i, *first[uri], repeats[uri]))
            continue
        first[uri] = (i, row)
        rows.append(row)
    if repeats:
        log.warning("%s: %d duplicate entries (rejected as duplicate_input)", cfg.path,
                    sum(repeats.values()))
    return rows


def duplicate_reject(row: dict, index: int, first_index: int, first_row: dict, n: int) -> dict:
    """The ``duplicate_input`` reject of entry ``index``, the ``n``-th repeat of the input
    that entry ``first_index`` (``first_row``) names; entries count from 0.

    The same file twice would be processed twice under the same ids, so only the first entry
    is. The repeat stays visible as a reject, under its own work-store key: a whole-video
    reject is keyed by ``video:{video_id}:{source_uri}`` (last written wins), so it keeps the
    ``source_uri`` but gets ``video_id = <uri id>#dup<n>``, which no content, stat or URI id
    (``v`` + hex) can equal, and which is the same in every run of the same manifest.
    """
    uri = row["source_uri"]
    differs = [c for c in _GIVEN.values() if row[c] != first_row[c]]
    differs += [c for c in ("given_object_prompts", "annotation_uri") if row[c] != first_row[c]]
    detail = f"entry {index} names {uri} again: entry {first_index} is used"
    if differs:
        detail += f" (this entry's {', '.join(differs)} differ and are ignored)"
    dup = dict(row, video_id=f"{uri_video_id(uri)}#dup{n}")
    return reject(dup, STAGE, "duplicate_input", detail)


__all__ = ["VIDEO_EXTENSIONS", "SourceConfig", "SourceError", "duplicate_reject", "list_inputs",
           "list_video_files", "read_manifest", "resolve"]
