"""The work store: every row the pipeline produced, in Parquet parts, durable within bounds.

Layout: ``<work>/clips/part-<run>-<n>.parquet`` (status ok) and ``<work>/rejects/...``. A part
is written to a temporary name and renamed, so a reader or a resume never sees half a part.
Part names sort in write order across both folders (``<run>`` starts with the run's start time
to the microsecond, ``<n>`` counts up within the run), which is what makes "the last written
row of a clip wins" (:mod:`data_prep.work_index`) a sort, not a guess.

Durability: :class:`PartWriter` flushes its buffer every ``flush_rows`` rows or
``flush_seconds`` seconds (a background timer, so a stalled pipeline still flushes), and on
any exception (``close`` runs in the job's ``finally``). A SIGKILL therefore loses at most that
bound; the rerun sees what reached disk as done and recomputes exactly the rest.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.rows import OK, REJECTED, ROW_SCHEMA

CLIPS_DIR = "clips"
REJECTS_DIR = "rejects"
_PART = re.compile(r"^part-(?P<run>.+)-(?P<n>\d{5,})\.parquet$")


@dataclass(frozen=True)
class WorkPart:
    """One part file of the work store, with its place in the global write order."""

    path: Path
    rank: int  # position in write order over both folders (0 = oldest)
    run: str  # the run that wrote it (parts of one run are published together)
    rows: int


def list_parts(work_dir: Path) -> list[WorkPart]:
    """Every part of the work store, oldest first (row counts from the Parquet footers)."""
    found: list[tuple[str, str, Path]] = []
    for sub in (CLIPS_DIR, REJECTS_DIR):
        folder = Path(work_dir) / sub
        if folder.is_dir():
            for p in folder.iterdir():
                if m := _PART.match(p.name):
                    found.append((p.name, m.group("run"), p))
    found.sort(key=lambda t: t[0])
    return [WorkPart(path=p, rank=i, run=run, rows=pq.ParquetFile(p).metadata.num_rows)
            for i, (_, run, p) in enumerate(found)]


def read_part(part: WorkPart | Path, columns: list[str] | None = None) -> pa.Table:
    """One part with the row schema of today (columns added since it was written are null)."""
    path = part.path if isinstance(part, WorkPart) else part
    table = pq.read_table(path, schema=ROW_SCHEMA)
    return table.select(columns) if columns else table


def read_parts(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """All parts of one folder (small work stores, tests); at scale read part by part."""
    files = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not files:
        return ROW_SCHEMA.empty_table().select(columns) if columns else ROW_SCHEMA.empty_table()
    return pa.concat_tables(read_part(f, columns) for f in files)


def new_run_tag() -> str:
    """Sorts after every earlier run's tag: start time to the microsecond, then a nonce."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


class PartWriter:
    """Buffers Arrow batches by status; writes ``part-<run>-<n>.parquet`` files atomically.

    Flushes when ``flush_rows`` rows are buffered, when the oldest buffered row is
    ``flush_seconds`` old (checked by a daemon timer too), and on :meth:`close`.
    Thread-safe: the timer and the driver loop share one lock.
    """

    def __init__(self, out_dir: Path, flush_rows: int = 500, flush_seconds: float = 30.0,
                 ) -> None:
        self.out_dir = Path(out_dir)
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.run_tag = new_run_tag()
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._oldest: float | None = None
        self._parts = 0
        self.written = {CLIPS_DIR: 0, REJECTS_DIR: 0}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        for sub in self.written:
            (self.out_dir / sub).mkdir(parents=True, exist_ok=True)
        self._timer = threading.Thread(target=self._tick, name="work-store-flush", daemon=True)
        self._timer.start()

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        with self._lock:
            self._buffer.append(table)
            self._buffered += table.num_rows
            self._oldest = self._oldest or time.monotonic()
            if self._buffered >= self.flush_rows:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def close(self) -> None:
        """Flush what is buffered and stop the timer (idempotent; call it in ``finally``)."""
        self._closed.set()
        self.flush()

    def _tick(self) -> None:
        period = max(0.05, min(self.flush_seconds / 4, 1.0))
        while not self._closed.wait(period):
            with self._lock:
                if self._oldest is not None and \
                        time.monotonic() - self._oldest >= self.flush_seconds:
                    self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        status = table.column("status")
        for sub, value in ((CLIPS_DIR, OK), (REJECTS_DIR, REJECTED)):
            part = table.filter(pc.equal(status, value))
            if part.num_rows:
                self._write(sub, part)
        self._buffer, self._buffered, self._oldest = [], 0, None

    def _write(self, sub: str, table: pa.Table) -> None:
        final = self.out_dir / sub / f"part-{self.run_tag}-{self._parts:05d}.parquet"
        tmp = final.with_name(f".{final.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, final)  # atomic: readers and resumes never see a partial part
        self._parts += 1
        self.written[sub] += table.num_rows
