"""Scheduled rebuilds (data_prep/rebuild.py, jobs/rebuild_dataset.py): the lock (exclusive,
heartbeat, stale takeover by dead pid or old heartbeat, one winner among racing takers, a
heartbeat that stops when the pipeline stalls), concurrent invocations, a crash that leaves
`latest` alone and calls the webhook, a run that lost its lock or stalled and so publishes
nothing, retention, an incremental rebuild with status records and MLflow runs, the webhook
URL check, and the job's exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.rebuild import (
    ALREADY_RUNNING,
    EXIT_ALREADY_RUNNING,
    FAILED,
    LOCK_NAME,
    STATUS_DIR,
    SUCCEEDED,
    WEBHOOK_ENV,
    LockBusy,
    LockLost,
    LockStalled,
    RebuildConfig,
    RebuildLock,
    apply_retention,
    notify_failure,
    read_lock,
    read_status,
    rebuild,
    work_store_mark,
)
from data_prep.synthetic import generate_corpus
from ttm_ray.config import ConfigError, from_dict
from ttm_ray.dataset.versions import LATEST, VersionWriter, latest_version, list_versions

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ helpers
def iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_lock(root: Path, host: str, pid: int, heartbeat: float, run_id: str = "rb-old"
               ) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "run_id": run_id,
                                "started_at": iso(heartbeat), "heartbeat_at": iso(heartbeat)}))
    return path


def new_lock(root: Path, run_id: str, ttl_s: float = 5.0, heartbeat_s: float = 0.1,
             stall_s: float | None = None) -> RebuildLock:
    return RebuildLock(root / LOCK_NAME, run_id, ttl_s=ttl_s, heartbeat_s=heartbeat_s,
                       stall_s=stall_s)


def wait_for(condition: Callable[[], object], timeout_s: float = 30.0) -> None:
    """Poll until ``condition()`` holds; the timeout only bounds a broken test."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def fake_version(root: Path) -> str:
    """A tiny published version (no pipeline): enough for retention."""
    writer = VersionWriter(root)
    writer.write_table("data", pa.table({"x": [1]}))
    return writer.publish({"filter": None}).name


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict]]:
    """A local HTTP server on 127.0.0.1 standing in for the failure webhook; yields the
    JSON bodies it received."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "content_type": self.headers["Content-Type"],
                             **json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{server.server_port}/hook/s3cr3t")
    yield received
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------- the lock only
def test_lock_is_exclusive_heartbeats_and_is_released(tmp_path: Path) -> None:
    first = new_lock(tmp_path, "rb-first")
    first.acquire()
    held = read_lock(first.path)
    assert held["run_id"] == "rb-first" and held["pid"] == os.getpid()
    assert held["host"] == socket.gethostname() and held["started_at"]
    with pytest.raises(LockBusy) as busy:
        new_lock(tmp_path, "rb-second").acquire(wait_s=0)
    assert busy.value.holder["run_id"] == "rb-first"
    time.sleep(0.35)  # a few heartbeats
    assert read_lock(first.path)["heartbeat_at"] > held["heartbeat_at"]
    first.release()
    assert not first.path.exists() and list(tmp_path.iterdir()) == []  # no temp files left
    second = new_lock(tmp_path, "rb-second")
    second.acquire()
    assert second.takeover is None
    second.release()


def test_a_waiting_rebuild_gets_the_lock_when_the_holder_finishes(tmp_path: Path) -> None:
    first = new_lock(tmp_path, "rb-first")
    first.acquire()
    threading.Timer(0.5, first.release).start()
    second = new_lock(tmp_path, "rb-second")
    second.acquire(wait_s=10)
    assert 0.4 < second.waited_s < 5 and read_lock(second.path)["run_id"] == "rb-second"
    start = time.monotonic()
    with pytest.raises(LockBusy):  # a holder that stays: the wait ends at wait_s
        new_lock(tmp_path, "rb-third").acquire(wait_s=0.3)
    assert 0.3 <= time.monotonic() - start < 2
    second.release()


def test_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path: Path) -> None:
    plant_lock(tmp_path, socket.gethostname(), dead_pid(), time.time())  # fresh heartbeat
    lock = new_lock(tmp_path, "rb-new")
    lock.acquire()
    assert lock.takeover["previous"]["run_id"] == "rb-old"
    assert "is not running" in lock.takeover["reason"]
    assert read_lock(lock.path)["run_id"] == "rb-new"
    lock.release()


def test_stale_lock_with_an_old_heartbeat_is_taken_over(tmp_path: Path) -> None:
    # another host: its pid cannot be checked from here, only the heartbeat's age counts
    plant_lock(tmp_path, "other-host", 1, time.time() - 1.0)
    with pytest.raises(LockBusy):  # 1 s old < ttl 5 s: alive
        new_lock(tmp_path, "rb-new").acquire()
    plant_lock(tmp_path, "other-host", 1, time.time() - 60)
    lock = new_lock(tmp_path, "rb-new")
    lock.acquire()
    assert lock.takeover["previous"]["host"] == "other-host"
    assert "heartbeat 60s old" in lock.takeover["reason"]
    lock.release()


def race_for_lock(root: Path, tag: str, takers: int) -> tuple[list[RebuildLock], list[str]]:
    """``takers`` threads released together by a barrier, each acquiring with wait_s=0."""
    barrier = threading.Barrier(takers)
    winners: list[RebuildLock] = []
    busy: list[str] = []

    def take(i: int) -> None:
        lock = new_lock(root, f"rb-{tag}-{i}", heartbeat_s=1.0)
        barrier.wait()
        try:
            lock.acquire(wait_s=0)
            winners.append(lock)
        except LockBusy:
            busy.append(lock.run_id)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners, busy


def test_racing_takers_of_a_stale_lock_have_exactly_one_winner(tmp_path: Path) -> None:
    for round_ in range(10):
        plant_lock(tmp_path, "other-host", 1, time.time() - 600, run_id=f"rb-dead-{round_}")
        winners, busy = race_for_lock(tmp_path, str(round_), 6)
        assert len(winners) == 1 and len(busy) == 5, (round_, busy)
        assert read_lock(tmp_path / LOCK_NAME)["run_id"] == winners[0].run_id
        winners[0].release()
        assert list(tmp_path.iterdir()) == []  # no claim or temp files left


def test_a_lock_taken_from_a_stalled_holder_is_noticed_and_not_deleted(tmp_path: Path) -> None:
    holder = new_lock(tmp_path, "rb-stalled", heartbeat_s=0.1)
    holder.acquire()
    plant_lock(tmp_path, "other-host", 1, time.time(), run_id="rb-other")  # someone took it
    time.sleep(0.4)
    assert holder.lost
    holder.release()
    assert read_lock(tmp_path / LOCK_NAME)["run_id"] == "rb-other"  # theirs stays


def test_heartbeat_follows_progress_and_stops_when_the_pipeline_stalls(tmp_path: Path) -> None:
    lock = new_lock(tmp_path, "rb-slow", stall_s=0.5)
    lock.acquire()
    time.sleep(0.8)  # not watched (e.g. publishing): no progress needed to keep beating
    assert lock.stalled is None
    done = [0]  # what the probe sees: rows done so far
    with lock.watch(lambda: done[0]):
        beat_before = read_lock(lock.path)["heartbeat_at"]
        while done[0] < 30:  # 1.5 s of a pipeline that moves: 3 x stall_s
            done[0] += 1
            time.sleep(0.05)
        assert lock.stalled is None
        assert read_lock(lock.path)["heartbeat_at"] > beat_before
        wait_for(lambda: lock.stalled)  # then it hangs: no more progress
    assert lock.stalled.startswith("no progress for ")
    assert "rebuild.lock.stall_s=0.5" in lock.stalled
    frozen = read_lock(lock.path)
    time.sleep(0.4)  # 4 heartbeat periods: none comes, so the lock will go stale
    assert read_lock(lock.path) == frozen
    with pytest.raises(LockStalled, match=r"^no progress for [\d.]+ s .*heartbeats of .*"
                                          r"rebuild\.lock .*raise rebuild\.lock\.stall_s"):
        lock.check("publishing")
    with pytest.raises(LockStalled):  # and before any later step
        lock.check("going on")
    lock.release()
    assert not lock.path.exists()  # still ours: released at once, no need to go stale


def test_parts_reaching_the_work_store_count_as_progress(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "clips").mkdir(parents=True)
    lock = new_lock(tmp_path / "dataset", "rb-writer", stall_s=0.5)
    lock.acquire()
    with lock.watch(lambda: work_store_mark(work)):
        for i in range(15):  # a part every 0.1 s for 1.5 s, the way PartWriter writes them
            tmp = work / "clips" / f".part-{i:05d}.parquet.tmp"
            tmp.write_bytes(b"rows")
            os.replace(tmp, work / "clips" / f"part-{i:05d}.parquet")
            time.sleep(0.1)
        assert lock.stalled is None
        wait_for(lambda: lock.stalled)  # no more parts
    lock.release()
    assert work_store_mark(tmp_path / "none") == (0, 0)  # before the work store exists


def test_a_stalled_holder_is_taken_over_and_then_knows_it_lost_the_lock(tmp_path: Path) -> None:
    hung = new_lock(tmp_path, "rb-hung", ttl_s=1.0, stall_s=0.3)
    hung.acquire()
    with hung.watch():
        wait_for(lambda: hung.stalled)
        # a later rebuild finds the lock stale once its last heartbeat is ttl_s old
        taker = new_lock(tmp_path, "rb-taker", ttl_s=1.0)
        taker.acquire(wait_s=30)
        assert taker.takeover["previous"]["run_id"] == "rb-hung"
        assert "heartbeat" in taker.takeover["reason"]
        with pytest.raises(LockLost) as lost:
            hung.check("going on")
    message = str(lost.value)
    assert message.startswith(f"lock lost: {hung.path} was taken over by rebuild rb-taker ")
    assert f"pid {os.getpid()}" in message and "no progress for" in message
    assert "before going on" in message and "rebuild.lock.ttl_s" in message
    assert str(tmp_path / STATUS_DIR / "rb-taker.json") in message
    assert hung.lost and lost.value.holder["run_id"] == "rb-taker"
    hung.release()
    assert read_lock(taker.path)["run_id"] == "rb-taker"  # the new holder's lock stays
    taker.release()


def test_retention_never_deletes_latest(tmp_path: Path) -> None:
    names = [fake_version(tmp_path) for _ in range(4)]
    (tmp_path / LATEST).write_text(names[0] + "\n")  # rolled back by an operator
    assert apply_retention(tmp_path, 1) == names[1:3]
    assert list_versions(tmp_path) == [names[0], names[3]]
    assert latest_version(tmp_path) == names[0]
    assert apply_retention(tmp_path, None) == []


def test_uri_dataset_root_and_bad_lock_timing_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"publish\.dataset_root is 's3://b/d', a URI.*"
                                          r"shared-filesystem path"):
        from_dict(RebuildConfig, {"publish": {"dataset_root": "s3://b/d"}})
    with pytest.raises(ConfigError, match=r"run\.root is 'gs://b/runs'"):
        from_dict(RebuildConfig, {"run": {"root": "gs://b/runs"}})
    with pytest.raises(ConfigError, match=r"rebuild\.lock: heartbeat_s \(600\) must be at most "
                                          r"half of ttl_s"):
        from_dict(RebuildConfig, {"rebuild": {"lock": {"heartbeat_s": 600}}})
    # a prep config loads as a rebuild config (kind: prep), with rebuild defaults
    from ttm_ray.config import load_config

    cfg = load_config(RebuildConfig, REPO / "jobs/configs/prep/production.yaml",
                      ["rebuild.lock.ttl_s=120"])
    assert cfg.kind == "prep" and cfg.rebuild.lock.ttl_s == 120 and cfg.keep_versions == 10


def test_stall_s_must_outlast_what_a_healthy_pipeline_spends_without_rows() -> None:
    assert from_dict(RebuildConfig, {}).rebuild.lock.stall_s == 3600
    with pytest.raises(ConfigError, match=r"rebuild\.lock\.stall_s \(600\) must be more than "
                                          r"output\.flush_seconds \(30\) and "
                                          r"run\.capacity_timeout_s \(900\)"):
        from_dict(RebuildConfig, {"rebuild": {"lock": {"stall_s": 600}}})
    with pytest.raises(ConfigError, match=r"rebuild\.lock\.stall_s \(20\) must be more.*"
                                          r"output\.flush_seconds \(30\)"):
        from_dict(RebuildConfig, {"rebuild": {"lock": {"stall_s": 20}},
                                  "run": {"capacity_timeout_s": 0}})
    with pytest.raises(ConfigError, match=r"rebuild\.lock\.stall_s"):
        from_dict(RebuildConfig, {"rebuild": {"lock": {"stall_s": 0}}})
    assert from_dict(RebuildConfig, {"rebuild": {"lock": {"stall_s": None}}}
                     ).rebuild.lock.stall_s is None  # off: heartbeats as long as alive


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://hooks.example.com/s3cr3t", "scheme 'ftp'"),
    ("file:///etc/s3cr3t", "scheme 'file'"),
    ("hooks.example.com/s3cr3t", "no scheme"),
    ("https:///s3cr3t", "no host"),
])
def test_webhook_url_must_be_http_and_is_never_echoed(
        monkeypatch: pytest.MonkeyPatch, url: str, problem: str) -> None:
    monkeypatch.setenv(WEBHOOK_ENV, url)
    with pytest.raises(ConfigError) as bad:
        from_dict(RebuildConfig, {})
    message = str(bad.value)
    assert f"${WEBHOOK_ENV} has {problem}: the failure webhook accepts http:// and " \
           "https:// URLs only" in message
    assert "set it to the webhook's full https://host/... URL" in message
    assert "s3cr3t" not in message


def test_webhook_posts_to_http_and_refuses_other_schemes_at_send_time(
        webhook: list[dict], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from_dict(RebuildConfig, {})  # the fixture's http://127.0.0.1:<port>/... passes the check
    record = {"job": "rebuild_dataset", "status": FAILED, "error": "lock lost: ...",
              "run_id": "rb-x"}
    assert notify_failure(record) == {"sent": True, "http_status": 204}
    assert webhook[0]["error"] == "lock lost: ..." and webhook[0]["run_id"] == "rb-x"
    # the environment changed after the config was checked: refused, not sent anywhere
    port = os.environ[WEBHOOK_ENV].split(":")[2].split("/")[0]
    monkeypatch.setenv(WEBHOOK_ENV, f"ftp://127.0.0.1:{port}/hook/s3cr3t")
    sent = notify_failure(record)
    assert sent["sent"] is False and "scheme 'ftp'" in sent["error"]
    assert len(webhook) == 1 and "failure webhook not called" in caplog.text
    assert "s3cr3t" not in json.dumps(sent) and "s3cr3t" not in caplog.text


# ---------------------------------------------------------------- rebuilds on local Ray
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 valid videos + 1 broken input."""
    return generate_corpus(tmp_path_factory.mktemp("rebuild_corpus"), 4, seed=5, num_corrupt=1)


def first_n(corpus: Path, n: int) -> Path:
    """The corpus as it was when only its first ``n`` valid videos (and the broken input)
    had arrived."""
    table = pq.read_table(corpus)
    valid = [i for i, c in enumerate(table.column("corrupt").to_pylist()) if not c]
    keep = [i for i in range(table.num_rows) if i not in set(valid[n:])]
    path = corpus.with_name(f"manifest_first{n}.parquet")
    pq.write_table(table.take(pa.array(keep)), path)
    return path


def rebuild_config(manifest: Path, out: Path, **extra: object) -> RebuildConfig:
    data = {
        "source": {"kind": "manifest", "path": str(manifest)},
        "caption": {"engine": {"kind": "manifest"}},
        "prompts": {"engine": {"kind": "manifest"}},
        "mask_source": "gt",
        # object scores only: no CLIP actor pool to start (the pipeline tests cover omega)
        "score": {"temporal": False},
        "filter": {"omega": None},
        "clip": {"num_frames": 8, "fps": 8.0, "max_clips_per_video": 1},
        "output": {"dir": str(out)},
        "resources": {"score": {"num_cpus": 0.5}},
        "run": {"mlflow_tracking_uri": f"sqlite:///{out.parent / 'mlflow.db'}"},
        "rebuild": {"lock": {"ttl_s": 30, "heartbeat_s": 0.5}},
        **extra,
    }
    return from_dict(RebuildConfig, data)


@pytest.mark.slow
def test_crash_keeps_latest_then_reruns_recover_publish_and_prune(
        ray_local, corpus: Path, tmp_path: Path, webhook: list[dict]) -> None:
    out = tmp_path / "prep"
    root = out / "dataset"
    old = [fake_version(root), fake_version(root)]  # versions from long ago
    plant_lock(root, socket.gethostname(), dead_pid(), time.time())  # a killed rebuild's
    keep2 = {"lock": {"ttl_s": 30, "heartbeat_s": 0.5}, "retention": {"keep_versions": 2}}

    # 1. two videos so far: takes the killed rebuild's lock over, publishes, keeps everything
    one = rebuild(rebuild_config(first_n(corpus, 2), out), progress=False, track=False)
    assert one["status"] == SUCCEEDED and one["published"]
    assert one["lock"]["took_over"]["previous"]["run_id"] == "rb-old"
    assert "is not running" in one["lock"]["took_over"]["reason"]
    assert one["latest_before"] == old[1] and one["dataset_version"] == latest_version(root)
    assert one["pruned_versions"] == [] and one["counts"]["new_clips"] == 2
    assert not (root / LOCK_NAME).exists()
    v1 = one["dataset_version"]

    # 2. a third video; the rebuild crashes mid-way: latest stays, no retention, webhook
    three_videos = rebuild_config(first_n(corpus, 3), out, rebuild=keep2)
    with pytest.raises(RuntimeError, match="injected failure"):
        rebuild(three_videos, progress=False, fail_after_rows=1)
    failed = read_status(root)
    assert failed["status"] == FAILED and "injected failure" in failed["error"]
    assert failed["latest_before"] == failed["latest_after"] == v1 == latest_version(root)
    assert failed["versions_after"] == [*old, v1] and failed["pruned_versions"] == []
    assert failed["webhook"] == {"sent": True, "http_status": 204}
    assert len(webhook) == 1
    hook = webhook[0]
    assert hook["content_type"] == "application/json" and hook["path"] == "/hook/s3cr3t"
    assert {k: hook[k] for k in ("job", "status", "run_id", "dataset_root", "host")} == {
        "job": "rebuild_dataset", "status": FAILED, "run_id": failed["run_id"],
        "dataset_root": str(root), "host": socket.gethostname()}
    assert "injected failure" in hook["error"]
    assert "s3cr3t" not in json.dumps(failed)  # the webhook URL is never written down
    assert not (root / LOCK_NAME).exists()

    # 3. the rerun finds nothing new (the crash wrote the third video's clip) but publishes
    #    what the crashed run left unpublished; retention keeps the newest 2
    recovered = rebuild(three_videos, progress=False)
    assert recovered["status"] == SUCCEEDED and recovered["published"]
    assert recovered["counts"]["new_clips"] == 0  # published from the work store
    v2 = recovered["dataset_version"]
    assert latest_version(root) == v2 != v1
    assert recovered["counts"]["kept"] == one["counts"]["kept"] + 1
    assert recovered["pruned_versions"] == old and list_versions(root) == [v1, v2]

    # 4. the fourth video arrives: only its work is done, a new version, v1 pruned
    four = rebuild(rebuild_config(corpus, out, rebuild=keep2), progress=False)
    assert four["status"] == SUCCEEDED and four["published"]
    assert four["counts"]["new_clips"] == 1
    assert four["counts"]["already_done"] == recovered["counts"]["kept"] + 1  # + the reject
    v3 = four["dataset_version"]
    assert latest_version(root) == v3 and list_versions(root) == [v2, v3]
    assert four["versions_before"] == [v1, v2] and four["pruned_versions"] == [v1]
    assert read_status(root) == read_status(root, four["run_id"])
    assert read_status(root)["started_at"] < read_status(root)["ended_at"]
    assert len(webhook) == 1  # success does not notify
    records = sorted(p.name for p in (root / STATUS_DIR).iterdir())
    runs = (one, failed, recovered, four)
    assert records == sorted([f"{r['run_id']}.json" for r in runs] + ["last.json"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=three_videos.run.resolved_mlflow_uri())
    found = client.search_runs([client.get_experiment_by_name("ttm-ray").experiment_id],
                               filter_string="tags.`ttm.kind` = 'rebuild'")
    by_id = {r.data.tags["ttm.rebuild.run_id"]: r for r in found}
    assert set(by_id) == {failed["run_id"], recovered["run_id"], four["run_id"]}
    assert by_id[failed["run_id"]].data.tags["ttm.rebuild.status"] == FAILED
    assert "injected failure" in by_id[failed["run_id"]].data.tags["ttm.rebuild.error"]
    ok = by_id[four["run_id"]]
    assert ok.info.run_id == four["mlflow_run_id"]
    assert ok.data.tags["ttm.rebuild.status"] == SUCCEEDED
    assert ok.data.tags["dataset_version"] == v3
    assert ok.data.metrics["new_clips"] == 1 and ok.data.metrics["pruned_versions"] == 1
    assert recovered["prep_mlflow_run_id"] and four["prep_mlflow_run_id"]  # versions' runs


@pytest.mark.slow
def test_concurrent_rebuilds_one_runs_one_is_already_running_one_waits(
        ray_local, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    root = out / "dataset"
    results: dict[str, dict] = {}
    manifest = first_n(corpus, 2)

    def run(name: str, **extra: object) -> None:
        cfg = rebuild_config(manifest, out, **extra)
        results[name] = rebuild(cfg, progress=False, track=False)

    first = threading.Thread(target=run, args=("first",))
    first.start()
    deadline = time.monotonic() + 60
    while not (root / LOCK_NAME).exists():  # the first one holds the lock
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("second",))
    waiter = threading.Thread(target=run, args=("waiter",),
                              kwargs={"rebuild": {"lock": {"wait_s": 120, "ttl_s": 30,
                                                           "heartbeat_s": 0.5}}})
    second.start()
    waiter.start()
    for t in (first, second, waiter):
        t.join(timeout=300)

    assert results["first"]["status"] == SUCCEEDED and results["first"]["published"]
    skipped = results["second"]
    assert skipped["status"] == ALREADY_RUNNING
    assert skipped["lock"]["holder"]["run_id"] == results["first"]["run_id"]
    assert skipped["counts"] == {} and skipped["published"] is None  # it touched nothing
    waited = results["waiter"]
    assert waited["status"] == SUCCEEDED and waited["lock"]["waited_s"] > 0
    assert not waited["published"]  # nothing new since the first one
    assert waited["dataset_version"] == results["first"]["dataset_version"]
    assert list_versions(root) == [results["first"]["dataset_version"]]
    assert read_status(root, skipped["run_id"])["status"] == ALREADY_RUNNING
    assert read_status(root)["run_id"] == waited["run_id"]  # last.json: the last lock holder


@pytest.mark.slow
def test_a_rebuild_whose_lock_was_taken_over_publishes_nothing(
        ray_local, corpus: Path, tmp_path: Path, webhook: list[dict],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import data_prep.job

    out = tmp_path / "prep"
    root = out / "dataset"
    before = fake_version(root)
    real, theirs = data_prep.job.run_pipeline, []

    def taken_over_meanwhile(*args, **kwargs):
        # While the real pipeline ran, another rebuild took the lock over (as if this one
        # had looked stale) and published a version of its own.
        summary = real(*args, **kwargs)
        plant_lock(root, "other-host", 4242, time.time(), run_id="rb-new-holder")
        theirs.append(fake_version(root))
        return summary

    monkeypatch.setattr(data_prep.job, "run_pipeline", taken_over_meanwhile)
    cfg = rebuild_config(first_n(corpus, 2), out)
    with pytest.raises(LockLost) as lost:
        rebuild(cfg, progress=False, track=False)
    (theirs,) = theirs
    message = str(lost.value)
    assert message.startswith(f"lock lost: {root / LOCK_NAME} was taken over by rebuild "
                              "rb-new-holder (host other-host, pid 4242")
    assert "before publishing" in message
    # nothing of the other run's was touched: its lock, its version, `latest`, last.json
    assert read_lock(root / LOCK_NAME)["run_id"] == "rb-new-holder"
    assert list_versions(root) == [before, theirs] and latest_version(root) == theirs
    assert not (root / STATUS_DIR / "last.json").exists()
    (status_file,) = (root / STATUS_DIR).iterdir()
    status = json.loads(status_file.read_text())
    assert status["status"] == FAILED and status["error"].startswith("LockLost: lock lost: ")
    assert status["lock"]["lost"] is True and status["published"] is None
    assert len(webhook) == 1 and webhook[0]["error"].startswith("LockLost: lock lost: ")
    assert webhook[0]["run_id"] == status["run_id"]


@pytest.mark.slow
def test_a_rebuild_whose_pipeline_stalls_fails_with_no_progress_and_notifies(
        ray_local, corpus: Path, tmp_path: Path, webhook: list[dict],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import data_prep.job

    out = tmp_path / "prep"
    root = out / "dataset"
    before = fake_version(root)
    real = data_prep.job.run_pipeline

    def hangs_first(*args, **kwargs):  # the pipeline "hangs" 4 x stall_s, then runs for real
        time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_prep.job, "run_pipeline", hangs_first)
    cfg = rebuild_config(first_n(corpus, 2), out, **{
        "rebuild": {"lock": {"ttl_s": 30, "heartbeat_s": 0.1, "stall_s": 0.5}},
        "output": {"dir": str(out), "flush_seconds": 0.2},
        "run": {"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "capacity_timeout_s": 0}})
    with pytest.raises(LockStalled, match=r"^no progress for [\d.]+ s \(rebuild\.lock\."
                                          r"stall_s=0\.5\): the heartbeats of .* stopped"):
        rebuild(cfg, progress=False, track=False)
    failed = read_status(root)
    assert failed["status"] == FAILED and "no progress for" in failed["error"]
    assert failed["lock"]["stalled"].startswith("no progress for")
    assert failed["lock"]["lost"] is False  # nobody took it over in the meantime
    assert list_versions(root) == [before] and failed["published"] is None
    assert len(webhook) == 1 and "no progress for" in webhook[0]["error"]
    assert not (root / LOCK_NAME).exists()  # still its own lock: released on the way out


# ------------------------------------------------------------------------- the job's CLI
def run_job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.rebuild_dataset", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_job_exits_75_when_already_running_and_2_on_config_errors(tmp_path: Path,
                                                                 corpus: Path) -> None:
    out = tmp_path / "prep"
    holder = new_lock(out / "dataset", "rb-holder", ttl_s=60, heartbeat_s=1)
    holder.acquire()
    try:
        job = run_job("--config", "jobs/configs/prep/quickstart.yaml",
                      "--set", f"output.dir={out}", "--set", f"source.path={corpus}",
                      "--set", "run.mlflow_tracking_uri=sqlite:///" + str(tmp_path / "m.db"))
    finally:
        holder.release()
    assert job.returncode == EXIT_ALREADY_RUNNING, job.stderr
    summary = json.loads(job.stdout.strip().splitlines()[-1])
    assert summary["job"] == "rebuild_dataset" and summary["status"] == ALREADY_RUNNING
    assert summary["holder"]["run_id"] == "rb-holder"
    assert read_status(out / "dataset", summary["run_id"])["status"] == ALREADY_RUNNING
    assert not (out / "dataset" / STATUS_DIR / "last.json").exists()

    bad = run_job("--config", "jobs/configs/prep/production.yaml",
                  "--set", "publish.dataset_root=s3://bucket/ds")
    assert bad.returncode == 2 and "a URI" in bad.stderr
    assert json.loads(bad.stdout.strip().splitlines()[-1])["status"] == "config_error"
