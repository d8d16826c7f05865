"""A real Ray cluster's job API, the way a checkout submits to it: ``ray start --head --block``
with token authentication (enforced), then ``ray job submit --working-dir <repo> --runtime-env
jobs/runtime_env.yaml``: the job ends SUCCEEDED with the JSON summary as the last log line,
and only the trimmed code is uploaded. The prep -> train -> rebuild path through ``ray job
submit`` moved to the production rehearsal (tests/ops/test_rehearsal.py), which runs it with
the shipped configs on a multi-node autoscaling cluster.

Only this cluster is stopped: ``ray stop`` would kill every Ray process on the machine,
including the test session's own local Ray (``ray_local``), so the ``--block`` process is
terminated instead (its own session: SIGTERM, then SIGKILL to its process group), stray
processes of this cluster are killed by pid, and its temp dir is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's ray and python
JOB_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str  # the job API (dashboard) URL
    token: str
    temp_dir: Path  # Ray's --temp-dir
    cli_env: dict[str, str]  # what `ray job ...` runs with (token mode and file)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.cli_env,
                              capture_output=True, text=True, timeout=timeout)


def _get(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _get_body(url: str, token: str) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def _wait_for_dashboard(proc: subprocess.Popen, address: str, token: str, log: Path) -> None:
    deadline = time.monotonic() + 180
    while _get(f"{address}/api/jobs/", token) != 200:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the job API at {address} did not answer in 180 s:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(1)


def _pids_using(temp_dir: Path) -> list[int]:
    """Processes of this cluster that outlived its ray start (their command lines name its
    temp dir); found by pid so nothing else on the machine is touched."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if str(temp_dir).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _stop(proc: subprocess.Popen, temp_dir: Path) -> None:
    start = time.monotonic()
    proc.terminate()  # `ray start --block` takes its processes down with it on SIGTERM
    try:
        proc.wait(timeout=15)
        print(f"ray start --block exited after {time.monotonic() - start:.1f}s",
              file=sys.stderr)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this cluster
        proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _pids_using(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _pids_using(temp_dir):  # still there after 15 s: this cluster's, by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Ray's Unix socket paths live under --temp-dir and have a ~107-byte limit: keep it short.
    short = Path(tempfile.mkdtemp(prefix="ttmray-", dir="/tmp"))
    token_file = short / "auth_token"
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    token_file.write_text(token)
    token_file.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # The node's environment is what a cluster image sets: job drivers and workers inherit
    # it. `ray job submit` takes --runtime-env or --runtime-env-json, not both (Ray 2.60), so
    # the DeepSpeed CPU op cache (built once, 45 s otherwise) comes from here, like the
    # image's ENV on a real cluster; `python` is the venv's.
    node_env = {**env, **auth, "PATH": f"{BIN}:{env.get('PATH', '')}",
                "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
                "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    port, dashboard = free_port(), free_port()
    log = short / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
             # small: the jobs move little data, and other Rays may share /dev/shm
             "--object-store-memory=400000000",
             f"--temp-dir={short / 'r'}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
            env=node_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(proc, address, token, log)
        yield Cluster(address, token, short / "r", {**env, **auth})
    finally:
        if proc.poll() is not None:  # died under us (a `ray stop` elsewhere kills it too)
            print(f"ray start exited early with {proc.returncode}:\n"
                  f"{log.read_text()[-4000:]}", file=sys.stderr)
        _stop(proc, short / "r")
        shutil.rmtree(short, ignore_errors=True)


def submit(cluster: Cluster, submission_id: str, *entrypoint: str) -> dict:
    """``ray job submit`` as documented in cluster/README.md; waits for the job. Returns
    the job's JSON summary (the last line of its logs)."""
    start = time.monotonic()
    run = cluster.ray("job", "submit", "--address", cluster.address,
                      "--submission-id", submission_id, "--working-dir", ".",
                      "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint,
                      timeout=JOB_TIMEOUT_S)
    print(f"{submission_id}: {time.monotonic() - start:.0f}s", file=sys.stderr)
    assert run.returncode == 0, f"{submission_id}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    status = cluster.ray("job", "status", "--address", cluster.address, submission_id)
    assert f"Job '{submission_id}' succeeded" in status.stdout, status.stdout
    info = json.loads(_get_body(f"{cluster.address}/api/jobs/{submission_id}", cluster.token))
    assert info["status"] == "SUCCEEDED", info
    logs = cluster.ray("job", "logs", "--address", cluster.address, submission_id)
    assert logs.returncode == 0, logs.stderr
    last = logs.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["status"] == "succeeded", logs.stdout[-3000:]
    return summary


def test_token_auth_is_enforced(cluster: Cluster) -> None:
    assert _get(f"{cluster.address}/api/jobs/", None) == 401
    assert _get(f"{cluster.address}/api/jobs/", "not-the-token") == 403
    assert _get(f"{cluster.address}/api/jobs/", cluster.token) == 200


def test_submit_from_a_checkout_uploads_only_the_trimmed_code(cluster: Cluster) -> None:
    """`ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml`, as
    cluster/README.md documents it, runs a job from the uploaded checkout, and the upload is
    the trimmed code only (the runtime env's excludes). The production configs themselves run
    end to end through `ray job submit` in tests/ops/test_rehearsal.py (on a multi-node
    cluster whose nodes share this disk, so it runs the installed checkout instead)."""
    summary = submit(cluster, "e2e-plan", "python", "-m", "jobs.plan", "model", "--config",
                     "jobs/configs/train/dit_stage2.yaml")
    assert summary["job"] == "plan-model" and summary["parameters"] == 4_574_062_144
    unpacked = [p for p in (cluster.temp_dir / "session_latest" / "runtime_resources"
                            / "working_dir_files").iterdir() if p.is_dir()]
    assert unpacked
    for pkg in unpacked:
        names = {p.name for p in pkg.iterdir()}
        assert {"jobs", "ttm_ray", "data_prep"} <= names
        assert not names & {".venv", ".git", "runs", "tests", ".cache"}, names
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < 20 * 2**20, f"{pkg}: {size / 2**20:.1f} MiB uploaded"
