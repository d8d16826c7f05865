"""Scheduled rebuilds of one dataset root: what a cron-driven ``jobs.rebuild_dataset`` does.

One rebuild = take the dataset root's lock -> run the incremental pipeline (``run_prep``: only
new inputs are processed, a new version is published atomically, or nothing is published when
nothing changed) -> apply retention -> write a status record -> log an MLflow run -> on
failure, optionally POST to a webhook -> release the lock.

The lock (``<dataset_root>/rebuild.lock``) keeps two rebuilds of the same root from
overlapping, whatever started them (cron on a VM, a KubeRay CronJob, a person):

- it is created with ``O_CREAT | O_EXCL``, atomic on local disks and on POSIX shared
  filesystems (EFS, NFSv4, Filestore), and holds JSON ``{host, pid, run_id, started_at,
  heartbeat_at}``; a thread rewrites it (write-temp + rename) every ``lock.heartbeat_s``;
- it is *stale* when its heartbeat is older than ``lock.ttl_s`` (the holder died or hangs on
  another host; clocks must agree to well within the TTL) or when it names this host and a
  pid that no longer exists (the holder was killed here);
- a stale lock is taken over in two atomic steps: the right to remove *that* lock (a
  ``rebuild.lock.takeover-<digest of its content>`` file) is created with ``O_EXCL``, so
  one taker gets it; that taker renames the lock aside, checks it moved the stale file
  (else puts it back), deletes it and creates its own lock with ``O_EXCL`` again. A plain
  rename race alone is not enough: a slow taker would rename away the fresh lock of a fast
  one (the test of racing takers caught exactly that). The takeover is logged and kept in
  the status record;
- a second rebuild waits up to ``lock.wait_s`` for it, then ends with status
  ``already_running`` (the job's exit code 75);
- while the pipeline runs, the heartbeat is tied to its progress: rows reaching the work store
  (a new part file) count, and after ``lock.stall_s`` without any the heartbeats stop, so a
  hung rebuild's lock goes stale and the next rebuild takes it over. The hung run, once it
  gets that far, fails with "no progress for N s" (status record, webhook);
- a rebuild checks that the lock is still its own before the pipeline, before publishing and
  before retention: one whose lock was taken over stops with "lock lost" and publishes
  nothing, leaving the new holder's lock and versions alone.

Object stores (``s3://``) have no atomic create-if-absent: the dataset root must be a local or
shared-filesystem path (the config is refused otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from data_prep.config import PrepConfig
from data_prep.writer import CLIPS_DIR, REJECTS_DIR
from ttm_ray.config import config_hash, constrained
from ttm_ray.dataset.versions import (
    latest_version,
    list_versions,
    prune_versions,
)
from ttm_ray.tracking import code_version, start_mlflow_run

log = logging.getLogger(__name__)

SUCCEEDED, FAILED, ALREADY_RUNNING = "succeeded", "failed", "already_running"
#: Exit code of ``jobs.rebuild_dataset`` when another rebuild holds the lock (sysexits.h
#: EX_TEMPFAIL: "try again later"), distinct from failure (1) and config errors (2).
EXIT_ALREADY_RUNNING = 75
LOCK_NAME = "rebuild.lock"
STATUS_DIR = "rebuilds"
LAST_STATUS = "last.json"
STATUS_SCHEMA = "ttm-rebuild-status/1"
WEBHOOK_ENV = "TTM_REBUILD_WEBHOOK_URL"
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_SCHEMES = ("http", "https")
JOB = "rebuild_dataset"


# ------------------------------------------------------------------------------ config
@dataclass
class LockConfig:
    ttl_s: float = constrained(
        900.0, gt=0, help="a lock whose heartbeat is older than this (seconds) is stale and "
        "is taken over; keep it well above heartbeat_s and any clock skew between hosts")
    heartbeat_s: float = constrained(
        30.0, gt=0, help="how often the running rebuild refreshes its lock (seconds)")
    wait_s: float = constrained(
        0.0, ge=0, help="0: if another rebuild holds the lock, end at once with status "
        "already_running (exit 75); >0: wait up to this many seconds for it first")
    stall_s: float | None = constrained(
        3600.0, gt=0, help="if the pipeline writes no rows to the work store for this long "
        "(seconds), the heartbeats stop so the lock goes stale and the next rebuild takes "
        "over; this run then fails with 'no progress'. Must exceed output.flush_seconds and "
        "run.capacity_timeout_s (and model start-up); null: heartbeat regardless of progress")

    def validate(self) -> None:
        if self.heartbeat_s * 2 > self.ttl_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s:g}) must be at most half of ttl_s "
                f"({self.ttl_s:g}), or a live rebuild could look stale between two heartbeats")


@dataclass
class RetentionConfig:
    keep_versions: int | None = constrained(
        None, gt=0, help="after a successful rebuild keep the newest N versions (the one "
        "`latest` names is never deleted); null: publish.keep_versions; both null: keep all")


@dataclass
class RebuildSettings:
    lock: LockConfig = field(default_factory=LockConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


@dataclass
class RebuildConfig(PrepConfig):
    """``ttm-ray rebuild``: a prep config plus the ``rebuild:`` section. A ``kind: prep``
    file loads as is (rebuild settings from defaults or ``--set rebuild.lock.ttl_s=...``)."""

    kind: Literal["prep", "rebuild"] = "rebuild"
    rebuild: RebuildSettings = field(default_factory=RebuildSettings)

    def validate(self) -> None:
        super().validate()
        key, value = self.dataset_root_source
        if "://" in value:
            raise ValueError(
                f"{key} is {value!r}, a URI: a scheduled rebuild keeps its lock and status "
                "records in the dataset root, which needs atomic file creation; use a local "
                "or shared-filesystem path (an EFS/NFS/Filestore mount such as /mnt/shared/...)")
        stall = self.rebuild.lock.stall_s
        # Progress is seen when rows reach the work store: that happens at most every
        # output.flush_seconds, and not at all while the pipeline waits for capacity.
        quiet = max(self.output.flush_seconds, self.run.capacity_timeout_s)
        if stall is not None and stall <= quiet:
            raise ValueError(
                f"rebuild.lock.stall_s ({stall:g}) must be more than output.flush_seconds "
                f"({self.output.flush_seconds:g}) and run.capacity_timeout_s "
                f"({self.run.capacity_timeout_s:g}): a healthy pipeline can write no rows "
                "for that long; raise stall_s, lower those, or set stall_s to null")
        # Found now (exit 2), not when a failure needs reporting.
        webhook = os.environ.get(WEBHOOK_ENV, "").strip()
        if webhook:
            check_webhook_url(webhook)

    @property
    def dataset_root_source(self) -> tuple[str, str]:
        """The config key the dataset root comes from, and its value."""
        if self.publish.dataset_root:
            return "publish.dataset_root", self.publish.dataset_root
        if self.output.dir:
            return "output.dir", self.output.dir
        return "run.root", self.run.root

    @property
    def keep_versions(self) -> int | None:
        return self.rebuild.retention.keep_versions or self.publish.keep_versions


# -------------------------------------------------------------------------------- lock
def _now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).isoformat(
        timespec="milliseconds")


def _epoch(iso: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _parse(text: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def read_lock(path: Path) -> dict | None:
    """The lock's JSON; ``{}`` if it exists but is unreadable (being written, or corrupt);
    ``None`` if there is no lock."""
    text = _read_text(path)
    return None if text is None else _parse(text)


class LockBusy(RuntimeError):
    """Another rebuild holds the lock (and it is not stale)."""

    def __init__(self, path: Path, holder: dict | None) -> None:
        self.holder = holder or {}
        who = ", ".join(f"{k}={self.holder.get(k)}" for k in ("run_id", "host", "pid",
                                                              "heartbeat_at"))
        super().__init__(f"{path} is held by another rebuild ({who})")


class LockLost(RuntimeError):
    """Our lock was taken over (or removed) while we ran: stop before changing the dataset."""

    def __init__(self, path: Path, holder: dict | None, before: str,
                 stalled: str | None) -> None:
        self.holder = holder
        records = path.parent / STATUS_DIR
        if holder is None:
            now = "was removed by someone else"
        else:
            now = (f"was taken over by rebuild {holder.get('run_id')} (host "
                   f"{holder.get('host')}, pid {holder.get('pid')}, since "
                   f"{holder.get('started_at')})")
            records = records / f"{holder.get('run_id')}.json"
        why = f" after this run's heartbeats stopped ({stalled})" if stalled else ""
        super().__init__(
            f"lock lost: {path} {now}{why}, before {before}. This run stops without "
            "publishing and leaves that run's lock and versions alone; nothing needs "
            f"cleaning up ({records} tells how the other run ends). If this run was only "
            "slow, raise rebuild.lock.ttl_s (and stall_s) and check that host clocks agree")


class LockStalled(RuntimeError):
    """The pipeline made no progress for ``lock.stall_s``: our heartbeats stopped."""

    def __init__(self, path: Path, stalled: str) -> None:
        super().__init__(
            f"{stalled}: the heartbeats of {path} stopped so that another rebuild can take "
            "the lock over, and this run stops without publishing. Look for the hung stage "
            "(Ray dashboard, job logs); if the pipeline is only slow to produce rows, raise "
            "rebuild.lock.stall_s")


class RebuildLock:
    """The lock file of one dataset root (see the module docstring for the protocol)."""

    def __init__(self, path: Path, run_id: str, ttl_s: float, heartbeat_s: float,
                 stall_s: float | None = None) -> None:
        self.path = Path(path)
        self.run_id, self.ttl_s, self.heartbeat_s = run_id, ttl_s, heartbeat_s
        self.stall_s = stall_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.started_at = _now_iso()
        self.takeover: dict | None = None  # {"previous": lock JSON, "reason": ..., "at": ...}
        self.lost = False  # someone else took our lock over (we looked stale to them)
        self.stalled: str | None = None  # "no progress for N s": heartbeats stopped
        self.waited_s = 0.0
        # The stall watchdog, armed by watch(): last progress, and a probe of it.
        self._watching = False
        self._progress_at = time.monotonic()
        self._probe: Callable[[], object] | None = None
        self._mark: object = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "run_id": self.run_id,
                           "started_at": self.started_at, "heartbeat_at": _now_iso()})

    def _sibling(self, kind: str, key: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{kind}-{key}")

    def _age(self, path: Path) -> float | None:
        try:
            return time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None

    def stale_reason(self, holder: dict) -> str | None:
        """Why ``holder`` (the lock's JSON) is stale, or None if it is alive."""
        beat = _epoch(holder.get("heartbeat_at"))
        if beat is None:  # unreadable: maybe being written right now; judge by file age
            age = self._age(self.path)
            if age is not None and age > self.ttl_s:
                return f"unreadable lock file not modified for {age:.0f}s"
            return None
        age = time.time() - beat
        if age > self.ttl_s:
            return f"heartbeat {age:.0f}s old (lock.ttl_s={self.ttl_s:g})"
        if holder.get("host") == self.host and not pid_alive(holder.get("pid")):
            return f"pid {holder.get('pid')} on this host ({self.host}) is not running"
        return None

    # -- acquire / take over / release
    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _remove_stale(self, text: str) -> bool:
        """Remove the lock file iff it still holds ``text`` (judged stale); True if we did.

        Exactly one taker may remove a given stale lock; otherwise a slow taker could remove
        the fresh lock of a faster one. So the right to take over *this* lock (its content's
        digest) is itself created with O_EXCL (``rebuild.lock.takeover-<digest>``: one
        winner); the winner then renames the stale file aside and checks that what it moved
        is still that file before deleting it. A takeover marker left by a taker that died
        within those few calls is ignored once it is older than the TTL.
        """
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        marker = self._sibling("takeover", digest)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            age = self._age(marker)
            if age is not None and age > self.ttl_s:
                marker.unlink(missing_ok=True)
            return False  # someone else is taking this one over
        os.close(fd)
        aside = self._sibling("stale", self.run_id)
        try:
            if _read_text(self.path) != text:  # refreshed or replaced since we read it
                return False
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            if _read_text(aside) != text:  # its holder came back to life just now: undo
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock, taking over a stale one; raise :class:`LockBusy` after ``wait_s``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        poll = min(max(self.heartbeat_s / 2, 0.05), 5.0)
        pending: dict | None = None
        while True:
            if self._try_create():
                self.takeover = pending
                break
            text = _read_text(self.path)
            if text is None:  # released between our two calls: try again at once
                continue
            holder = _parse(text)
            reason = self.stale_reason(holder)
            if reason and self._remove_stale(text):
                log.warning("rebuild lock: removed the stale lock %s of run %s (%s)", self.path,
                            holder.get("run_id"), reason)
                pending = {"previous": holder, "reason": reason, "at": _now_iso()}
                continue
            waited = time.monotonic() - start
            if waited >= wait_s:
                self.waited_s = round(waited, 3)
                raise LockBusy(self.path, holder)
            time.sleep(min(poll, wait_s - waited))
        self.waited_s = round(time.monotonic() - start, 3)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"rebuild-lock-{self.run_id}",
                                        daemon=True)
        self._thread.start()

    # -- progress: the heartbeat only vouches for a run that moves
    @contextlib.contextmanager
    def watch(self, probe: Callable[[], object] | None = None) -> Iterator[None]:
        """Within this block, beat only while there is progress: a change in what
        ``probe()`` returns (checked once per heartbeat, so keep it cheap; the rebuild's is
        :func:`work_store_mark`). After ``stall_s`` without one the heartbeats stop for good."""
        self._probe = probe
        self._mark = self._probe_mark()
        self._progress_at = time.monotonic()
        self._watching = True
        try:
            yield
        finally:
            self._watching, self._probe = False, None

    def _probe_mark(self) -> object:
        probe = self._probe  # watch() may clear it from the other thread
        try:
            return probe() if probe is not None else None
        except OSError:  # a shared-filesystem hiccup is no progress, and no crash either
            return self._mark

    def _stall(self) -> str | None:
        """``no progress for N s ...`` once the watched run has idled past ``stall_s``."""
        if not self._watching or self.stall_s is None:
            return None
        mark = self._probe_mark()
        if mark != self._mark:
            self._mark, self._progress_at = mark, time.monotonic()
        idle = time.monotonic() - self._progress_at
        if idle <= self.stall_s:
            return None
        return f"no progress for {idle:.1f} s (rebuild.lock.stall_s={self.stall_s:g})"

    def check(self, before: str) -> None:
        """Raise :class:`LockLost` unless the lock file still names this run, or
        :class:`LockStalled` if the heartbeats stopped. Called before each step that changes
        the dataset root (``before`` names it), so a run that lost its lock changes nothing."""
        current = read_lock(self.path)
        if not current or current.get("run_id") != self.run_id:
            self.lost = True
            raise LockLost(self.path, current, before, self.stalled)
        if self.stalled:
            raise LockStalled(self.path, self.stalled)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            stalled = self._stall()
            if stalled:  # stop vouching for a hung run: the lock goes stale after ttl_s
                self.stalled = stalled
                log.error("rebuild lock: %s; heartbeats of %s stop, so the lock goes stale "
                          "and the next rebuild can take it over", stalled, self.path)
                return
            current = read_lock(self.path)
            if not current or current.get("run_id") != self.run_id:
                self.lost = True
                log.error("rebuild lock: %s is no longer ours (now %s); another rebuild took "
                          "it over, so heartbeats stop", self.path, current)
                return
            tmp = self._sibling("tmp", uuid.uuid4().hex[:8])
            tmp.write_text(self._content())
            os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = read_lock(self.path)
        if current and current.get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RebuildLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------- status records
def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_status(root: Path, record: dict, last: bool) -> Path:
    """``<root>/rebuilds/<run_id>.json``, and ``last.json`` for runs that held the lock (an
    ``already_running`` run must not hide the outcome of the run that is going on)."""
    path = Path(root) / STATUS_DIR / f"{record['run_id']}.json"
    _atomic_write_json(path, record)
    if last:
        _atomic_write_json(path.with_name(LAST_STATUS), record)
    return path


def read_status(root: str | Path, run_id: str = "last") -> dict:
    name = LAST_STATUS if run_id == "last" else f"{run_id}.json"
    return json.loads((Path(root) / STATUS_DIR / name).read_text())


# ---------------------------------------------------------------- notification, MLflow
def _redacted(url: str) -> str:
    """Webhook URLs often carry a secret in the path or query: log the host only."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return f"${WEBHOOK_ENV}"
    return f"{parts.scheme}://{parts.hostname or '?'}{port}/..."


def check_webhook_url(url: str) -> None:
    """Raise ValueError unless ``url`` is an http(s) URL with a host: urllib would also
    "POST" to file:// or ftp:// URLs. The message names the scheme, never the URL."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise ValueError(f"${WEBHOOK_ENV} is not a valid URL; set it to the webhook's "
                         "https://host/... URL, or unset it") from None
    if parts.scheme in WEBHOOK_SCHEMES and parts.hostname:
        return
    got = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
    if parts.scheme in WEBHOOK_SCHEMES:
        got = "no host"
    raise ValueError(
        f"${WEBHOOK_ENV} has {got}: the failure webhook accepts http:// and https:// URLs "
        "only; set it to the webhook's full https://host/... URL as the receiving service "
        "gives it, or unset it")


def notify_failure(record: dict) -> dict | None:
    """POST a small JSON payload to ``$TTM_REBUILD_WEBHOOK_URL`` if set. Never raises: a
    broken webhook is logged and recorded, the rebuild's own error stays the one reported."""
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    if not url:
        return None
    try:  # the config check refuses such a URL; the environment may have changed since
        check_webhook_url(url)
    except ValueError as exc:
        log.warning("rebuild: failure webhook not called: %s", exc)
        return {"sent": False, "error": str(exc)}
    payload = {k: record.get(k) for k in ("job", "status", "error", "dataset_root", "host",
                                          "run_id", "started_at", "ended_at")}
    payload["error"] = (payload["error"] or "")[:2000]
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "ttm-ray-rebuild"})
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
            return {"sent": True, "http_status": response.status}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("rebuild: failure webhook %s did not take the notification: %s",
                    _redacted(url), exc)
        return {"sent": False, "error": f"{type(exc).__name__}: {exc}"}


def log_to_mlflow(cfg: RebuildConfig, record: dict) -> str:
    """One MLflow run per rebuild (whatever its outcome): status tags, count metrics, the
    status record as an artifact. Published versions also get their own ``prep-`` run."""
    import mlflow

    tags = {"ttm.kind": "rebuild", "ttm.job": "rebuild", "ttm.rebuild.status": record["status"],
            "ttm.rebuild.run_id": record["run_id"], "job": "rebuild",
            "dataset_root": record["dataset_root"], "code_version": record["code_version"],
            "dataset_version": record.get("latest_after") or "",
            # ttm.* names (ttm_ray.lineage's vocabulary) beside the older ones above; not
            # ttm.dataset_version: a rebuild run does not publish (its prep- run does, and
            # lineage finds a version's producer by that tag)
            "ttm.dataset_root": record["dataset_root"], "ttm.code_version": record["code_version"],
            "ttm.rebuild.latest_after": record.get("latest_after") or ""}
    if record.get("error"):
        tags["ttm.rebuild.error"] = record["error"][:4000]
    with start_mlflow_run(cfg.run.resolved_mlflow_uri(), cfg.run.mlflow_experiment,
                          f"rebuild-{record['run_id']}", tags) as run:
        metrics = {k: float(v) for k, v in (record.get("counts") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics.update(seconds=float(record.get("seconds") or 0.0),
                       pruned_versions=float(len(record.get("pruned_versions") or [])),
                       versions=float(len(record.get("versions_after") or [])))
        mlflow.log_metrics(metrics)
        mlflow.log_dict(record, "rebuild_status.json")
        return run.info.run_id


# ---------------------------------------------------------------------------- the job
def new_run_id() -> str:
    return f"rb-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def apply_retention(root: Path, keep: int | None) -> list[str]:
    """Delete all but the newest ``keep`` versions; never the one ``latest`` names (readers
    start there). There is no reader pinning yet: a training run still reading a pruned
    older version loses it, so keep N above the number of versions in use."""
    return prune_versions(root, keep) if keep else []


def work_store_mark(work_dir: Path) -> tuple[int, ...]:
    """Changes whenever the pipeline writes a part (rows reached the work store): the
    modification times of the work store's two folders, one stat each."""
    mark = []
    for sub in (CLIPS_DIR, REJECTS_DIR):
        try:
            mark.append(os.stat(Path(work_dir) / sub).st_mtime_ns)
        except FileNotFoundError:
            mark.append(0)
    return tuple(mark)


class LockGuard:
    """The rebuild's lock as ``run_prep``'s guard: checked before the pipeline and right
    before publishing; its heartbeat follows the pipeline's progress. ``run_pipeline`` has no
    per-batch callback, so progress is observed where it lands: a new part in the work store
    (at least every ``output.flush_seconds`` while rows flow)."""

    def __init__(self, lock: RebuildLock, work_dir: Path) -> None:
        self.lock, self.work_dir = lock, work_dir

    def check(self, before: str) -> None:
        self.lock.check(before)

    def watch(self) -> AbstractContextManager[None]:
        return self.lock.watch(lambda: work_store_mark(self.work_dir))


COUNT_KEYS = ("inputs", "already_done", "new_clips", "new_rejects", "kept", "rejected",
              "rejected_permanent", "rejected_transient", "isolated_inputs")


def rebuild(cfg: RebuildConfig, progress: bool = True, fail_after_rows: int | None = None,
            track: bool = True) -> dict[str, Any]:
    """One scheduled rebuild; returns its status record (also written under
    ``<dataset_root>/rebuilds/``). Status ``already_running`` is returned, not raised; a
    failure is recorded, notified, and then re-raised (a lost lock or a stalled pipeline
    too: :class:`LockLost`, :class:`LockStalled`)."""
    from data_prep.job import run_prep

    root = cfg.dataset_root
    t0 = time.time()
    record: dict[str, Any] = {
        "schema": STATUS_SCHEMA, "job": JOB, "run_id": new_run_id(), "status": None,
        "host": socket.gethostname(), "pid": os.getpid(), "started_at": _now_iso(t0),
        "ended_at": None, "seconds": None, "dataset_root": str(root),
        "output_dir": str(cfg.output_dir), "config_hash": config_hash(cfg),
        "code_version": code_version(), "keep_versions": cfg.keep_versions,
        "latest_before": None, "versions_before": [], "latest_after": None,
        "versions_after": [], "published": None, "dataset_version": None, "counts": {},
        "pruned_versions": [], "error": None, "lock": {}, "mlflow_run_id": None,
        "prep_mlflow_run_id": None, "webhook": None, "traceback": None,
    }
    settings = cfg.rebuild.lock
    lock = RebuildLock(root / LOCK_NAME, record["run_id"], settings.ttl_s, settings.heartbeat_s,
                       settings.stall_s)
    record["lock"] = {"path": str(lock.path), "wait_s": settings.wait_s,
                      "stall_s": settings.stall_s}
    try:
        lock.acquire(settings.wait_s)
    except LockBusy as busy:
        log.warning("rebuild: %s; ending with status %s", busy, ALREADY_RUNNING)
        record.update(status=ALREADY_RUNNING, error=str(busy))
        record["lock"].update(holder=busy.holder, waited_s=lock.waited_s)
        _finish(cfg, record, t0, track, last=False)
        return record

    record["lock"].update(took_over=lock.takeover, waited_s=lock.waited_s)
    try:
        record.update(latest_before=latest_version(root), versions_before=list_versions(root))
        # Retention is applied here, after the whole run succeeded, not inside run_prep.
        prep_cfg = dataclasses.replace(
            cfg, publish=dataclasses.replace(cfg.publish, keep_versions=None))
        summary = run_prep(prep_cfg, progress=progress, fail_after_rows=fail_after_rows,
                           track=track, guard=LockGuard(lock, cfg.work_dir))
        record.update(published=summary["published"], dataset_version=summary["dataset_version"],
                      prep_mlflow_run_id=summary.get("mlflow_run_id"),
                      counts={k: summary.get(k) for k in COUNT_KEYS})
        stage_errors = summary["rejects_by_reason"].get("stage_error")
        if stage_errors:  # same rule as jobs.build_dataset: a stage bug fails the job
            raise RuntimeError(
                f"{stage_errors} rows hit a stage bug (reject_reason=stage_error in "
                f"{summary['dataset_version']}); retention skipped")
        lock.check("retention")  # pruning under another run's lock could delete its input
        record["pruned_versions"] = apply_retention(root, cfg.keep_versions)
        record["status"] = SUCCEEDED
    except BaseException as exc:  # KeyboardInterrupt too (SIGTERM from `ray job stop`)
        record.update(status=FAILED, error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=20))
        raise
    finally:
        try:  # the status record is written while we still hold the lock
            record["lock"].update(lost=lock.lost, stalled=lock.stalled)
            # last.json belongs to whoever holds the lock: not ours to write once it is lost
            _finish(cfg, record, t0, track, last=not lock.lost)
        finally:
            lock.release()
    return record


def _finish(cfg: RebuildConfig, record: dict, t0: float, track: bool, last: bool) -> None:
    """Versions after, status files, MLflow, webhook. The status is written first (a job
    being stopped has seconds before SIGKILL) and again with the MLflow run and webhook
    outcome. Each step is guarded: none of them may mask the rebuild's own outcome."""
    root = cfg.dataset_root
    record.update(ended_at=_now_iso(), seconds=round(time.time() - t0, 3),
                  latest_after=latest_version(root), versions_after=list_versions(root))
    _write_status_logged(root, record, last)
    if track:
        try:
            record["mlflow_run_id"] = log_to_mlflow(cfg, record)
        except Exception as exc:
            log.warning("rebuild: MLflow logging failed: %s", exc)
            record["mlflow_error"] = f"{type(exc).__name__}: {exc}"
    if record["status"] == FAILED:
        record["webhook"] = notify_failure(record)
    if track or record["webhook"]:
        _write_status_logged(root, record, last)
    log.info("rebuild %s: %s (status record %s)", record["run_id"], record["status"],
             Path(root) / STATUS_DIR / f"{record['run_id']}.json")


def _write_status_logged(root: Path, record: dict, last: bool) -> None:
    try:
        write_status(root, record, last=last)
    except OSError as exc:
        log.error("rebuild: could not write the status record under %s: %s", root, exc)


def job_summary(record: dict) -> dict[str, Any]:
    """The one-line JSON summary of the job (the status record holds everything)."""
    keys = ("status", "run_id", "dataset_version", "published", "latest_before",
            "pruned_versions", "mlflow_run_id", "seconds")
    out = {k: record.get(k) for k in keys}
    out.update(record.get("counts") or {})
    out["status_file"] = str(Path(record["dataset_root"]) / STATUS_DIR /
                             f"{record['run_id']}.json")
    if record["status"] == ALREADY_RUNNING:
        out["holder"] = record["lock"].get("holder")
    if record["lock"].get("took_over"):
        out["took_over"] = record["lock"]["took_over"]["previous"].get("run_id")
    return out


__all__ = ["ALREADY_RUNNING", "EXIT_ALREADY_RUNNING", "FAILED", "SUCCEEDED", "LockBusy",
           "LockLost", "LockStalled", "RebuildConfig", "RebuildLock", "check_webhook_url",
           "job_summary", "read_status", "rebuild"]
