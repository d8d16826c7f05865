"""Idempotent Parquet output of the pipeline: clip rows and reject rows, in part files.

Parts are written to a temporary name and renamed, so a crash never leaves a half-written
part. What is already written is the resume state: a rerun skips videos rejected as a whole
and clips already written (ok or rejected), so nothing is processed or written twice.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.rows import OK, REJECTED, ROW_SCHEMA

CLIPS_DIR = "clips"
REJECTS_DIR = "rejects"


@dataclass
class DoneSet:
    """What earlier runs already wrote into an output folder."""

    clip_ids: set[str] = field(default_factory=set)
    rejected_video_ids: set[str] = field(default_factory=set)  # rejected before clipping

    def __len__(self) -> int:
        return len(self.clip_ids) + len(self.rejected_video_ids)


def read_parts(folder: Path, columns: list[str] | None = None) -> pa.Table:
    files = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not files:
        return ROW_SCHEMA.empty_table().select(columns) if columns else ROW_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, columns=columns, schema=ROW_SCHEMA) for f in files)


def load_done(out_dir: Path) -> DoneSet:
    cols = ["video_id", "clip_id"]
    clips = read_parts(out_dir / CLIPS_DIR, cols)
    rejects = read_parts(out_dir / REJECTS_DIR, cols)
    done = DoneSet()
    done.clip_ids.update(v for v in clips.column("clip_id").to_pylist() if v)
    done.clip_ids.update(v for v in rejects.column("clip_id").to_pylist() if v)
    whole = rejects.filter(pc.is_null(rejects.column("clip_id")))
    done.rejected_video_ids.update(v for v in whole.column("video_id").to_pylist() if v)
    return done


class PartWriter:
    """Buffers Arrow batches by status and writes ``part-<run>-<n>.parquet`` files atomically."""

    def __init__(self, out_dir: Path, rows_per_file: int) -> None:
        self.out_dir = out_dir
        self.rows_per_file = rows_per_file
        self.run_tag = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._buffers: dict[str, list[pa.Table]] = {CLIPS_DIR: [], REJECTS_DIR: []}
        self._buffered = dict.fromkeys(self._buffers, 0)
        self._parts = 0
        self.written = dict.fromkeys(self._buffers, 0)
        for sub in self._buffers:
            (out_dir / sub).mkdir(parents=True, exist_ok=True)

    def add(self, table: pa.Table) -> None:
        status = table.column("status")
        for sub, value in ((CLIPS_DIR, OK), (REJECTS_DIR, REJECTED)):
            part = table.filter(pc.equal(status, value))
            if part.num_rows:
                self._buffers[sub].append(part)
                self._buffered[sub] += part.num_rows
                if self._buffered[sub] >= self.rows_per_file:
                    self._flush(sub)

    def close(self) -> None:
        for sub in self._buffers:
            self._flush(sub)

    def _flush(self, sub: str) -> None:
        if not self._buffers[sub]:
            return
        table = pa.concat_tables(self._buffers[sub])
        final = self.out_dir / sub / f"part-{self.run_tag}-{self._parts:05d}.parquet"
        tmp = final.with_name(f".{final.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, final)  # atomic: readers and resumes never see a partial part
        self._parts += 1
        self.written[sub] += table.num_rows
        self._buffers[sub], self._buffered[sub] = [], 0
