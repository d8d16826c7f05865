"""Ingest: give every input a stable ``video_id`` and its size, or reject it as unreadable.

``content`` ids are the sha256 of the bytes (streamed in chunks): the same video under two
names, or re-uploaded elsewhere, gets one id, so reruns and incremental runs skip it.
``stat`` ids hash uri + size + mtime: no full read (cheap for huge remote corpora), but a
moved or touched file counts as new. An input that cannot be read gets an id from its URI,
so even its reject row has one: ``unreadable_input`` when it is missing, not ours to read or a
URI nothing parses (permanent), ``remote_read_error`` for any other I/O error (transient: a
network hiccup is retried by the next run).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from data_prep.rows import map_rows
from ttm_ray.config import constrained
from ttm_ray.dataset.video import open_input, stat

STAGE = "ingest"
ID_HEX = 16
#: Here a ValueError is a URI no filesystem parses, an ImportError a missing fsspec driver.
_UNREADABLE = {ValueError: "unreadable_input", ImportError: "unreadable_input"}


@dataclass
class IngestConfig:
    id_mode: Literal["content", "stat"] = constrained(
        "content", help="content: sha256 of the bytes (dedups copies); stat: uri+size+mtime")
    chunk_bytes: int = constrained(1 << 20, gt=0, help="read size when hashing content")


def _short(digest: str) -> str:
    return "v" + digest[:ID_HEX]


def uri_video_id(uri: str) -> str:
    """The id of an input known only by its URI (unreadable inputs, bad manifest entries)."""
    # A distinct prefix keeps these from ever equalling a content or stat id. surrogatepass:
    # a manifest's lone surrogate must not crash the id of the reject that reports it.
    return _short(hashlib.sha256(f"uri\0{uri}".encode("utf-8", "surrogatepass")).hexdigest())


def content_video_id(uri: str, chunk_bytes: int = 1 << 20) -> tuple[str, int]:
    """``(video id, size)`` from the sha256 of the file's bytes, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open_input(uri) as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
            size += len(chunk)
    return _short(h.hexdigest()), size


def stat_video_id(uri: str) -> tuple[str, int]:
    """``(video id, size)`` from uri + size + mtime (one metadata call, no read)."""
    size, mtime = stat(uri)
    return _short(hashlib.sha256(f"stat\0{uri}\0{size}\0{mtime}".encode()).hexdigest()), size


class IngestStage:
    """Rows in, rows out: sets ``video_id`` and ``src_bytes``; unreadable -> reject."""

    def __init__(self, cfg: IngestConfig | None = None) -> None:
        self.cfg = cfg or IngestConfig()

    def _one(self, row: dict) -> dict:
        uri = row["source_uri"]
        if self.cfg.id_mode == "content":
            stat(uri)  # directories and missing objects fail here with a clear error
            video_id, size = content_video_id(uri, self.cfg.chunk_bytes)
        else:
            video_id, size = stat_video_id(uri)
        return dict(row, video_id=video_id, src_bytes=size)

    def __call__(self, rows: list[dict]) -> list[dict]:
        # A reject needs an id too: derive it from the URI when hashing never happened.
        def with_id(row: dict) -> dict:
            return dict(row, video_id=row.get("video_id") or uri_video_id(
                str(row.get("source_uri"))))

        # OSErrors take the shared reasons (missing: unreadable_input; a network hiccup:
        # remote_read_error, retried by a later run).
        return map_rows(rows, STAGE, self._one, expected=_UNREADABLE, on_reject=with_id)


__all__ = ["IngestConfig", "IngestStage", "content_video_id", "stat_video_id", "uri_video_id"]
