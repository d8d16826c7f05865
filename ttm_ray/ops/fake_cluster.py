"""A real multi-node autoscaling Ray cluster on this one machine (Ray's fake multi-node provider).

    with FakeCluster("cluster/aws.yaml") as fc:          # head only; worker groups at 0
        subprocess.run(["ray", "job", "submit", "--address", fc.dashboard_url, ...],
                       env={**os.environ, **fc.env})
        fc.nodes_launched()                              # {"gpu_infer": 1, ...}

The head runs ``RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=0`` with the autoscaling config
of :func:`fake_cluster_config` (the launcher YAML's node types, scaled down); its autoscaler
starts each requested worker node as a raylet on this machine, which joins the head's GCS.

Isolation from other Ray clusters on the machine (the test suite runs one in parallel):

* every port is its own (GCS, dashboard, dashboard agent, client server; the rest random),
  and ``--temp-dir`` is its own, so ``ray_current_cluster`` (what ``ray.init()`` with no
  address would join) is written there, not in ``/tmp/ray``;
* token auth with its own token file (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``): the
  fake worker nodes are started by the head's autoscaler process with its environment, so
  they hold the same token;
* stopping never runs ``ray stop`` (machine-wide): every process of this cluster carries
  :data:`MARKER` in its environment (the autoscaler, the fake nodes' raylets and workers
  and job drivers inherit it, whatever process group Ray puts them in), and only those are
  signalled.
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
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import yaml

from ttm_ray.ops.fake_config import (
    FAKE_HEAD_NODE_ID,
    FAKE_HEAD_NODE_TYPE,
    MB,
    OBJECT_STORE_MB,
    fake_cluster_config,
)

#: Environment variable set on ``ray start`` only; its value identifies one cluster.
MARKER = "TTM_FAKE_CLUSTER_ID"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """The address Ray itself picks for this machine (what the fake nodes register with)."""
    from ray._private.services import get_node_ip_address

    return str(get_node_ip_address())


class FakeCluster:
    """Start / stop one fake autoscaling cluster; see the module docstring.

    ``scaling`` keywords go to :func:`fake_cluster_config` (``cpu_per_node``,
    ``gpu_per_node``, ``max_workers_per_type``, ``object_store_mb``,
    ``idle_timeout_minutes``, ``autoscaler_v2``).
    """

    def __init__(self, launcher_yaml: str | Path, *, root: str | Path | None = None,
                 node_env: Mapping[str, str] | None = None, start_timeout_s: float = 120.0,
                 **scaling: Any) -> None:
        self.launcher_yaml = Path(launcher_yaml)
        # Extra environment of every node (what a cluster image sets; drivers and workers
        # inherit it), e.g. TORCH_EXTENSIONS_DIR.
        self.node_env = dict(node_env or {})
        self.scaling = scaling
        self.start_timeout_s = start_timeout_s
        self._root_parent = root
        self.dir: Path | None = None
        self.id = uuid.uuid4().hex
        self.port = self.dashboard_port = 0
        self.head_ip = ""
        self.started_s = 0.0  # seconds `start()` took
        self._pgid: int | None = None  # the `ray start` process group: the head's daemons

    # ------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        """The GCS address (``ray.init(address=...)``, ``ray status --address``)."""
        return f"{self.head_ip}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The job API (``ray job submit --address ...``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self._path("auth_token")

    @property
    def temp_dir(self) -> Path:
        return self._path("ray")

    @property
    def config_path(self) -> Path:
        return self._path("autoscaling.yaml")

    @property
    def env(self) -> dict[str, str]:
        """What a client process (``ray job submit``, ``ray status``) needs in its env."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url}

    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise RuntimeError("FakeCluster is not started")
        return self.dir / name

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeCluster:
        t0 = time.perf_counter()
        # Short root: Ray's Unix sockets live under <temp-dir>/session_*/sockets (108 bytes).
        parent = self._root_parent or ("/tmp" if Path("/tmp").is_dir() else None)
        self.dir = Path(tempfile.mkdtemp(prefix="ttm-fc-", dir=parent))
        self.token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token` makes
        self.token_path.chmod(0o600)
        self.head_ip = node_ip()
        self.port, self.dashboard_port = free_port(), free_port()
        config = fake_cluster_config(self.launcher_yaml, self.head_ip, self.port,
                                     **self.scaling)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus=0",
            f"--port={self.port}", f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={self.config_path}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            # Random worker ports: the default 10002-19999 range is shared with every other
            # `ray start` on the machine.
            "--min-worker-port=0", "--max-worker-port=0",
            f"--object-store-memory={self.scaling.get('object_store_mb', OBJECT_STORE_MB) * MB}",
            "--disable-usage-stats",
        ]
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
        # `python` in a job's entrypoint must be this interpreter (the venv's), as on an image.
        path = f"{Path(sys.executable).parent}{os.pathsep}{inherited.get('PATH', '')}"
        env = {**inherited, "PATH": path, **self.node_env, **self.env, MARKER: self.id,
               "RAY_FAKE_CLUSTER": "1",
               # 1 s autoscaler ticks (Ray's own fake-cluster tests do the same; default 5 s).
               "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        if self.scaling.get("autoscaler_v2", True):
            # What `ray up` sets on the head since Ray 2.50 (autoscaler v2 by default).
            # (Not RAY_NODE_TYPE_NAME, which `ray up` also sets: the fake nodes start inside
            # the autoscaler process, and Ray computes their `ray.io/node-group` label from
            # that process's environment: they would all be labelled as the head.)
            env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID)
        else:
            env["RAY_enable_autoscaler_v2"] = "0"
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(key)  # `ray start --head` must not try to join an address
        log = self._path("start.log")
        try:
            with log.open("w") as out:
                # Own session, so its process group is this cluster's (and Ctrl-C in the
                # caller's terminal does not reach it).
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                self._pgid = proc.pid
                code = proc.wait(timeout=self.start_timeout_s)
            if code != 0:
                raise RuntimeError(f"ray start failed ({code}):\n{_tail(log, 30)}")
            self._wait_ready(time.monotonic() + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.started_s = round(time.perf_counter() - t0, 2)
        return self

    def _wait_ready(self, deadline: float) -> None:
        """The job API answers and the autoscaler has read its config (it dies on a bad one
        while `ray start` reports success)."""
        last = ""
        while time.monotonic() < deadline:
            monitor = self.temp_dir / "session_latest" / "logs" / "monitor.err"
            if not self._monitor_alive() and monitor.is_file() and monitor.stat().st_size:
                raise RuntimeError(f"the autoscaler exited:\n{_tail(monitor, 30)}")
            try:
                self.api("/api/version")
                self.nodes()
                if self._monitor_alive():
                    return
                last = "autoscaler process not running yet"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.5)
        raise TimeoutError(f"fake cluster not ready after {self.start_timeout_s:g} s: {last}")

    def _monitor_alive(self) -> bool:
        """The head's autoscaler process (``autoscaler/.../monitor.py``) is running."""
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                args = p.cmdline()
                if any(a.endswith("monitor.py") and "autoscaler" in a for a in args):
                    return True
        return False

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every process of this cluster, SIGKILL what is left after ``grace_s``;
        raises if any survives. Removes the cluster's folder."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            procs = self.processes()
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            deadline = time.monotonic() + wait_s
            while any(_running(p) for p in procs) and time.monotonic() < deadline:
                time.sleep(0.2)
        left = self.processes()
        if left:
            raise RuntimeError("fake cluster processes survived SIGKILL: "
                               + ", ".join(f"{p.pid}" for p in left))
        # Forget the group: once empty its id may be reused by an unrelated process.
        self._pgid = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: those with :data:`MARKER` in their
        environment or in the head's process group, and all their descendants. (Ray renames
        its workers and agents with setproctitle, which overwrites the environment that
        /proc shows, and puts each worker in a process group of its own; they are all
        children of a raylet, which is marked.)"""
        roots: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            try:
                if (self._pgid is not None and os.getpgid(p.pid) == self._pgid) or (
                        p.environ().get(MARKER) == self.id):
                    roots[p.pid] = p
            except (psutil.Error, OSError):  # gone, or another user's process
                continue
        found = dict(roots)
        for p in roots.values():
            with contextlib.suppress(psutil.Error):
                found.update((c.pid, c) for c in p.children(recursive=True))
        found.pop(os.getpid(), None)
        return [p for p in found.values() if _running(p)]

    def api(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` of the dashboard with this cluster's token; the decoded JSON."""
        request = urllib.request.Request(
            self.dashboard_url + path,
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the GCS has seen (alive and dead), from the state API."""
        reply = self.api("/api/v0/nodes?detail=1&limit=1000")
        return list(reply["data"]["result"]["result"])

    def nodes_launched(self, alive_only: bool = False) -> dict[str, int]:
        """``{node type: nodes that joined}`` over the worker types (the head left out);
        dead nodes count unless ``alive_only`` (launched = ever joined).

        The type is what the node's raylet reports (``RAY_NODE_TYPE_NAME``, which the fake
        provider sets per node; the dashboard's node summary shows it for live nodes), else
        the node type of the config whose resources the node has (dead nodes). Not the
        ``ray.io/node-group`` label: the fake nodes get it from the autoscaler process's
        environment, not their own.
        """
        counts: Counter[str] = Counter()
        for node, name in self._typed_nodes():
            if node.get("is_head_node") or (alive_only and node.get("state") != "ALIVE"):
                continue
            counts[name] += 1
        return dict(counts)

    def node_type(self, node_id: str) -> str:
        """The node type of a node id (``head`` for the head), e.g. where a job's driver
        ran (``driver_node_id`` of the job API)."""
        for node, name in self._typed_nodes():
            if node["node_id"] == node_id:
                return "head" if node.get("is_head_node") else name
        return "?"

    def _typed_nodes(self) -> list[tuple[dict[str, Any], str]]:
        named = {n["raylet"]["nodeId"]: n["raylet"].get("nodeTypeName") or ""
                 for n in self.api("/nodes?view=summary")["data"]["summary"]}
        return [(node, named.get(node["node_id"])
                 or self._type_of(node.get("resources_total") or {})) for node in self.nodes()]

    def _type_of(self, resources: Mapping[str, float]) -> str:
        types = yaml.safe_load(self.config_path.read_text())["available_node_types"]
        for name, spec in types.items():
            if name == FAKE_HEAD_NODE_TYPE:
                continue
            declared = {k: float(v) for k, v in spec.get("resources", {}).items()
                        if k != "object_store_memory"}
            if declared and all(resources.get(k) == v for k, v in declared.items()):
                return str(name)
        return "?"

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        """``ray.init`` this process to the cluster (token and all) for the block; restores
        the auth environment afterwards. Ray caches the token per process, so the cache is
        reset on the way in and out (another cluster in this process has another token)."""
        import ray

        keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        _reset_token_cache()
        try:
            ray.init(address=self.address, log_to_driver=False)
            yield ray
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _reset_token_cache()


def _reset_token_cache() -> None:
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # re-reads RAY_AUTH_MODE
    AuthenticationTokenLoader.instance().reset_cache()


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


__all__ = ["MARKER", "FakeCluster", "fake_cluster_config", "free_port", "node_ip"]
