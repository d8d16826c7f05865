"""Which work-store rows are current, and what a rerun may skip, without holding every row.

Two questions over the work store (:mod:`data_prep.writer`), answered per hash bucket of
``video_id`` so that no process ever holds the whole store:

* **Which rows are current** (for publish): per row key (a clip, or a whole-video reject) the
  last written row wins; a whole-video reject also loses to any later row of the same video
  (a retried video that now yields clips). :func:`superseded` lists the losers of one bucket.
* **What is done** (for a rerun): :class:`DoneIndex` holds one bucket's current keys. A key is
  *done* if its row is ok, a permanent reject, or a transient reject that has used
  ``max_attempts``; a transient reject with attempts left is *retried* (its attempt count
  travels on). A video is done if it was rejected as a whole for good, or every clip it was
  cut into (``video_clips``) is done, so a rerun never decodes it again.

:class:`ShardedDoneLookup` spreads the buckets over Ray actors: each CPU worker asks for the
keys of its batch instead of receiving a copy of every id already done.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_prep.rows import OK, reject_class
from data_prep.writer import WorkPart, list_parts, read_part

KEY_COLUMNS = ["video_id", "clip_id", "source_uri", "status", "reject_reason", "attempts",
               "video_clips"]
NEW, DONE = 0, -1  # lookup answers; n > 0: retry, n attempts so far


def row_key(clip_id: str | None, video_id: str | None, source_uri: str | None) -> str:
    """The identity of a row in the work store and in a version: its clip, or for a
    whole-video reject (no clip) the video."""
    return clip_id or f"video:{video_id}:{source_uri}"


def bucket_of(video_id: str | None, buckets: int) -> int:
    """Stable across processes (Python's ``hash`` is salted per process)."""
    return zlib.crc32((video_id or "").encode("utf-8", "surrogatepass")) % max(1, buckets)


def buckets_for(rows: int, per_bucket: int = 250_000) -> int:
    return max(1, -(-rows // per_bucket))


@dataclass
class KeyRow:
    """The key columns of one work-store row and where it lives."""

    rank: int
    index: int
    video_id: str | None
    clip_id: str | None
    source_uri: str | None
    status: str | None
    reason: str | None
    attempts: int
    video_clips: int | None


def bucket_rows(parts: Sequence[WorkPart], bucket: int, buckets: int) -> Iterable[KeyRow]:
    """The key columns of one bucket's rows, oldest first."""
    for part in parts:
        t = read_part(part, KEY_COLUMNS)
        cols = [t.column(c).to_pylist() for c in KEY_COLUMNS]
        for i, (vid, cid, uri, status, reason, attempts, clips) in enumerate(zip(*cols,
                                                                                  strict=True)):
            if bucket_of(vid, buckets) == bucket:
                yield KeyRow(part.rank, i, vid, cid, uri, status, reason, attempts or 1, clips)


def current_rows(rows: Iterable[KeyRow]) -> tuple[dict[str, KeyRow], list[KeyRow]]:
    """``(current row per key, superseded rows)`` of one bucket (``rows`` oldest first)."""
    latest: dict[str, KeyRow] = {}
    losers: list[KeyRow] = []
    last_clip_of_video: dict[str | None, tuple[int, int]] = {}
    for r in rows:
        key = row_key(r.clip_id, r.video_id, r.source_uri)
        if key in latest:
            losers.append(latest[key])
        latest[key] = r
        if r.clip_id:
            last_clip_of_video[r.video_id] = (r.rank, r.index)
    for key, r in list(latest.items()):
        later = last_clip_of_video.get(r.video_id)
        if not r.clip_id and later is not None and later > (r.rank, r.index):
            losers.append(latest.pop(key))  # the video was retried and cut into clips
    return latest, losers


def superseded(work_dir: Path, bucket: int, buckets: int) -> list[tuple[int, int]]:
    """``(part rank, row index)`` of every row of ``bucket`` that a later row replaced."""
    _, losers = current_rows(bucket_rows(list_parts(work_dir), bucket, buckets))
    return [(r.rank, r.index) for r in losers]


def _state(r: KeyRow, max_attempts: int) -> int:
    if r.status == OK or reject_class(r.reason or "stage_error") == "permanent" \
            or r.attempts >= max_attempts:
        return DONE
    return r.attempts


@dataclass
class DoneIndex:
    """One bucket's answer to "may a rerun skip this key?" (see the module docstring)."""

    bucket: int = 0
    buckets: int = 1
    states: dict[str, int] = field(default_factory=dict)  # key -> DONE or attempts so far
    rows: int = 0  # current rows of the bucket in the work store

    @classmethod
    def build(cls, work_dir: Path, max_attempts: int, bucket: int = 0,
              buckets: int = 1) -> DoneIndex:
        latest, _ = current_rows(bucket_rows(list_parts(work_dir), bucket, buckets))
        states = {k: _state(r, max_attempts) for k, r in latest.items()}
        # A video whose every clip is done needs no decode; record it under its video key.
        clips_done: dict[tuple[str | None, str | None], list[int]] = {}
        for r in latest.values():
            if r.clip_id and r.video_clips:
                counts = clips_done.setdefault((r.video_id, r.source_uri), [0, r.video_clips])
                counts[0] += states[row_key(r.clip_id, None, None)] == DONE
        for (vid, uri), (done, total) in clips_done.items():
            if done >= total:
                states.setdefault(row_key(None, vid, uri), DONE)
        return cls(bucket, buckets, states, len(latest))

    def check(self, keys: Sequence[tuple[str | None, str]]) -> list[int]:
        """For each ``(video_id, key)``: NEW, DONE, or the attempts so far (a retry)."""
        return [self.states.get(key, NEW) for _, key in keys]

    def __len__(self) -> int:
        return len(self.states)


class ShardedDoneLookup:
    """:class:`DoneIndex` buckets held by Ray actors; picklable (it holds actor handles).

    A worker asks for its batch's keys; each actor answers for its own bucket, so no process
    holds more than one bucket of the done keys.
    """

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors

    @classmethod
    def start(cls, work_dir: Path, max_attempts: int, buckets: int) -> ShardedDoneLookup:
        import ray

        remote = ray.remote(num_cpus=0)(_IndexActor)
        actors = [remote.remote(str(work_dir), max_attempts, b, buckets) for b in range(buckets)]
        ray.get([a.ready.remote() for a in actors])
        return cls(actors)

    def check(self, keys: Sequence[tuple[str | None, str]]) -> list[int]:
        import ray

        n = len(self.actors)
        by_bucket: dict[int, list[int]] = {}
        for i, (vid, _) in enumerate(keys):
            by_bucket.setdefault(bucket_of(vid, n), []).append(i)
        refs = {b: self.actors[b].check.remote([keys[i] for i in idx])
                for b, idx in by_bucket.items()}
        out = [NEW] * len(keys)
        for b, answers in zip(refs, ray.get(list(refs.values())), strict=True):
            for i, a in zip(by_bucket[b], answers, strict=True):
                out[i] = a
        return out

    def rows(self) -> int:
        """Current rows of the work store (all buckets)."""
        import ray

        return sum(ray.get([a.rows.remote() for a in self.actors]))

    def stop(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


class _IndexActor:
    def __init__(self, work_dir: str, max_attempts: int, bucket: int, buckets: int) -> None:
        self.index = DoneIndex.build(Path(work_dir), max_attempts, bucket, buckets)

    def ready(self) -> bool:
        return True

    def rows(self) -> int:
        return self.index.rows

    def check(self, keys: list[tuple[str | None, str]]) -> list[int]:
        return self.index.check(keys)


def input_keys(rows: Sequence[dict]) -> list[tuple[str | None, str]]:
    return [(r.get("video_id"), row_key(r.get("clip_id"), r.get("video_id"),
                                        r.get("source_uri"))) for r in rows]


class SkipDone:
    """The row stage: drops rows a rerun may skip; a retried row carries its attempt count.

    ``lookup`` is a :class:`DoneIndex` in-process or a :class:`ShardedDoneLookup` on Ray.
    Before the clip stage it sees videos (their key is the video), after it clips. ``report``
    (a Ray actor handle with ``skipped.remote(uris)``, optional) hears the source URIs it
    dropped, so the job can tell an input that was done from one whose block crashed.
    """

    def __init__(self, lookup: Any, report: Any = None) -> None:
        self.lookup, self.report = lookup, report

    def __call__(self, rows: list[dict]) -> list[dict]:
        states = self.lookup.check(input_keys(rows)) if rows else []
        out, dropped = [], []
        for row, state in zip(rows, states, strict=True):
            if state == DONE:
                dropped.append(row.get("source_uri"))
                continue
            out.append(dict(row, attempts=state + 1))  # NEW (0) -> the first attempt
        if dropped and self.report is not None:
            self.report.skipped.remote(dropped)
        return out


class SkippedInputs:
    """A Ray actor collecting the source URIs the skip stages dropped (see :class:`SkipDone`)."""

    def __init__(self) -> None:
        self.uris: set[str | None] = set()

    def skipped(self, uris: list[str | None]) -> None:
        self.uris.update(uris)

    def get(self) -> set[str | None]:
        return self.uris


def table_keys(table: pa.Table) -> list[str]:
    cols = [table.column(c).to_pylist() for c in ("clip_id", "video_id", "source_uri")]
    return [row_key(*t) for t in zip(*cols, strict=True)]
