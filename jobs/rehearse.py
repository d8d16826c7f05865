"""Rehearse production on this machine: the shipped production configs, end to end, submitted
with `ray job submit` to a real multi-node autoscaling Ray cluster that starts from zero.

The cluster is Ray's fake multi-node provider ("Testing Autoscaling Locally"): its node types
are generated from cluster/aws.yaml (same names and custom resources, GPUs declared as
resources, every worker group min_workers 0, counts scaled down; ttm_ray/ops/fake_config.py),
with its own ports, --temp-dir and token. Each job runs one config of jobs/configs/rehearsal/:
a declared overlay whose base is the shipped file, changing only roots, inputs, tiny model
folders and sizes, counts, the device and the declared stand-ins (ttm_ray/ops/overlay.py checks
every changed key before anything starts). In order:

    prep-unet      jobs/configs/prep/production.yaml   (16 frames, 512x512)
    prep-dit       jobs/configs/prep/dit.yaml          (121 frames, 256x256)
    train-*        jobs/configs/train/{dit,unet}_stage{1,2}.yaml
    generate       jobs/configs/generate/production.yaml, a batch (--manifest)
    evaluate       jobs/configs/evaluate/production.yaml
    rebuild        the nightly rebuild of the U-Net dataset (nothing new: no new version)

Inputs (tiny models built with the libraries' own save format, a generated corpus of videos
long enough for 121-frame clips, an items manifest and a benchmark) are made under --root
first (kept for a rerun). Every job is submitted with the shipped jobs/runtime_env.yaml and
the entrypoint resource flags cluster/README.md documents (JOBS below, CPU counts scaled), so
drivers that hold data run on a cpu_workers node, not on the CPU: 0 head; the code is the
checkout installed in this venv (no --working-dir: the fake nodes share one disk, see
submit()). The table and the last line (JSON) give each job's status, seconds and driver
node, and the nodes launched per node type. Exit 0 only when every job SUCCEEDED; a failed
job's log is under --root/logs and the jobs after it are SKIPPED. Only the processes this
command started are stopped.

MLflow as on the clusters: the jobs log to a real `mlflow server` this command starts on
127.0.0.1 (a free port; backend SQLite and artifacts under --root/mlflow, the SQLite file
written by that one process only), reached over HTTP through MLFLOW_TRACKING_URI in every
fake node's environment, as cluster/aws.yaml and cluster/kuberay/raycluster.yaml set it. It
is stopped by its process group id at the end.

    ttm-ray rehearse                       # everything, ~20 minutes on 2 cores
    ttm-ray rehearse --only prep-unet prep-dit --root /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from jobs.common import repo_path, setup_logging

ROOT_VAR = "TTM_REHEARSAL_ROOT"
OVERLAYS = "jobs/configs/rehearsal"


@dataclass(frozen=True)
class Job:
    name: str
    module: str  # python -m <module>
    overlay: str  # file under jobs/configs/rehearsal/
    #: ``ray job submit`` entrypoint flags: the shipped clusters' values (cluster/README.md)
    #: with CPU counts scaled to the fake nodes; resource names are the same.
    entrypoint: tuple[str, ...] = field(default_factory=tuple)


#: Drivers that hold data (publish, scoring) go to a CPU worker node; the training driver only
#: waits on Ray Train (its export runs on a training node), so it stays on the head.
ON_CPU_WORKER = ("--entrypoint-num-cpus", "1", "--entrypoint-resources", '{"cpu_worker": 1}')
JOBS: tuple[Job, ...] = (
    Job("prep-unet", "jobs.build_dataset", "prep_unet.yaml", ON_CPU_WORKER),
    Job("prep-dit", "jobs.build_dataset", "prep_dit.yaml", ON_CPU_WORKER),
    Job("train-dit-stage1", "jobs.train", "dit_stage1.yaml"),
    Job("train-dit-stage2", "jobs.train", "dit_stage2.yaml"),
    Job("train-unet-stage1", "jobs.train", "unet_stage1.yaml"),
    Job("train-unet-stage2", "jobs.train", "unet_stage2.yaml"),
    Job("generate", "jobs.generate", "generate.yaml"),
    Job("evaluate", "jobs.evaluate", "evaluate.yaml", ON_CPU_WORKER),
    Job("rebuild", "jobs.rebuild_dataset", "rebuild.yaml", ON_CPU_WORKER),
)


def build_inputs(root: Path, videos: int, seed: int) -> None:
    """Tiny models, the corpus and the manifests the overlays name (kept across reruns)."""
    from data_prep.synthetic import generate_corpus, write_benchmark_manifest
    from data_prep.tiny_models import build_tiny_clip
    from ttm_ray.conditioning.tiny import (
        build_tiny_clip_text,
        build_tiny_image_vae,
        build_tiny_t5,
        build_tiny_video_vae,
    )
    from ttm_ray.evaluation.tiny import (
        build_tiny_fvd_weights,
        build_tiny_raft_weights,
        build_tiny_xclip,
    )
    from ttm_ray.models.tiny import build_tiny_t2v_dit

    models = root / "models"
    build_tiny_clip(models / "tiny-clip")
    build_tiny_t5(models / "tiny-t5")
    build_tiny_clip_text(models / "tiny-clip-text")
    build_tiny_image_vae(models / "tiny-sd-vae")
    # The paper's tokenizer shape: Cosmos CV8x8x8, 16 latent channels.
    build_tiny_video_vae(models / "tiny-cosmos-cv8x8x8", latent_channels=16)
    build_tiny_t2v_dit(models / "dit-tiny-t2v", "dit-tiny", latent_channels=16)
    build_tiny_xclip(models / "tiny-xclip")
    build_tiny_fvd_weights(models / "tiny-fvd")
    build_tiny_raft_weights(models / "tiny-raft", arch="raft_small")
    corpus = root / "corpus" / "manifest.parquet"
    if not corpus.is_file():
        # 121 sampled frames at 8 fps (the DiT clips) need videos of at least 15.1 s.
        generate_corpus(corpus.parent, videos, seed=seed, min_seconds=16.0)
    for rel in ("shared/items/manifest.jsonl", "shared/benchmarks/sa-v-128/manifest.jsonl"):
        if not (root / rel).is_file():
            write_benchmark_manifest(corpus, root / rel, limit=1)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 and a free port, for as long as the ``with`` block.

    Backend ``sqlite:///<dir>/mlflow.db`` (only this process writes it), artifacts proxied to
    ``<dir>/artifacts`` (``mlflow-artifacts:/`` URIs, as on the clusters). Started in its own
    session so that stopping its process group also stops its uvicorn workers, and nothing
    else: no search by name, no machine-wide kill.
    """

    def __init__(self, directory: Path, timeout_s: float = 120.0) -> None:
        self.dir = directory
        self.timeout_s = timeout_s
        self.db = directory / "mlflow.db"
        self.log = directory / "server.log"
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def __enter__(self) -> MlflowServer:
        (self.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:  # a free port; the server binds it a moment later
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{port}"
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.dir / "artifacts"), "--serve-artifacts"]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not become healthy at {self.uri} "
                                   f"(log {self.log}):\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the server's process group (the one this Popen created, by its id),
        SIGKILL if it is not empty in 20 s. The ``mlflow`` parent can exit before its
        uvicorn workers do, so the wait is for the group, not the parent."""
        if self.proc is None:
            return
        group = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the parent; the workers are reparented and reaped
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.proc.poll()
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_overlays(jobs: tuple[Job, ...]) -> None:
    from ttm_ray.config import ConfigError
    from ttm_ray.ops.overlay import overlay_problems

    problems = [p for job in jobs for p in overlay_problems(repo_path(OVERLAYS, job.overlay))]
    if problems:
        raise ConfigError(problems, "rehearsal overlays")


def submit(job: Job, cluster: object, root: Path, log_dir: Path, timeout_s: float
           ) -> dict[str, object]:
    """``ray job submit`` (blocking, logs to a file); returns status and seconds."""
    submission_id = f"rehearse-{job.name}-{int(time.time())}"
    # The overlays name their root as ${TTM_REHEARSAL_ROOT}; the job's environment sets it.
    entrypoint = ["env", f"{ROOT_VAR}={root}", sys.executable, "-m", job.module, "--config",
                  f"{OVERLAYS}/{job.overlay}"]
    # No --working-dir: every fake node shares this machine's disk and unpacks a working-dir
    # package into the same session folder, replacing it under a running driver (whose cwd
    # then vanishes). The jobs run the checkout installed in this venv, as the shipped image
    # runs its own release; on a real cluster add `--working-dir .` (cluster/README.md).
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit",
           "--address", cluster.dashboard_url, "--submission-id", submission_id,
           "--runtime-env", str(repo_path("jobs", "runtime_env.yaml")), *job.entrypoint,
           "--", *entrypoint]
    log = log_dir / f"{job.name}.log"
    start = time.perf_counter()
    print(f"[rehearse] {job.name}: {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr)
    with log.open("w") as out:
        try:
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                           env={**os.environ, **cluster.env}, check=False)
        except subprocess.TimeoutExpired:
            subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "stop",
                            "--address", cluster.dashboard_url, submission_id],
                           env={**os.environ, **cluster.env}, check=False, capture_output=True)
    seconds = round(time.perf_counter() - start, 1)
    info = cluster.api(f"/api/jobs/{submission_id}")
    status = str(info["status"])
    driver = cluster.node_type(info["driver_node_id"]) if info.get("driver_node_id") else "?"
    print(f"[rehearse] {job.name}: {status} in {seconds:.0f}s, driver on {driver} (log {log})",
          file=sys.stderr)
    return {"status": status, "seconds": seconds, "driver": driver, "log": str(log),
            "submission_id": submission_id}


def table(results: dict[str, dict[str, object]], nodes: dict[str, int]) -> str:
    lines = [f"{'job':<20} {'status':<10} {'seconds':>8}  driver on"]
    lines += [f"{name:<20} {r['status']!s:<10} {r['seconds']!s:>8}  {r.get('driver', '-')}"
              for name, r in results.items()]
    lines.append("nodes launched from zero: " + (", ".join(
        f"{k} x{v}" for k, v in sorted(nodes.items())) or "none"))
    return "\n".join(lines)


def run_jobs(jobs: tuple[Job, ...], args: argparse.Namespace, root: Path, log_dir: Path,
             node_env: dict[str, str]
             ) -> tuple[dict[str, dict[str, object]], dict[str, int], bool]:
    """The fake cluster up, every job submitted in order (the ones after a failure SKIPPED);
    returns the results, the nodes launched per type and whether a job failed."""
    from ttm_ray.ops.fake_cluster import FakeCluster

    results: dict[str, dict[str, object]] = {}
    # The cluster's --temp-dir stays short (under /tmp): Ray's Unix socket paths live there
    # and may not exceed 107 bytes.
    cluster = FakeCluster(repo_path(args.cluster), node_env=node_env)
    with cluster:
        print(f"[rehearse] fake autoscaling cluster up in {cluster.started_s:.0f}s "
              f"(dashboard {cluster.dashboard_url}, config {cluster.config_path}); "
              f"worker nodes now: {cluster.nodes_launched() or 'none'}", file=sys.stderr)
        failed = False
        for job in jobs:
            if failed:
                results[job.name] = {"status": "SKIPPED", "seconds": 0}
                continue
            results[job.name] = submit(job, cluster, root, log_dir, args.job_timeout)
            failed = results[job.name]["status"] != "SUCCEEDED"
        nodes = cluster.nodes_launched()
    return results, nodes, failed


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/rehearsal",
                        help="inputs, outputs and job logs (the cluster's own temp dir is a "
                             "short /tmp/ttm-fc-* folder, removed at the end)")
    parser.add_argument("--cluster", default="cluster/aws.yaml",
                        help="launcher YAML whose node types the fake cluster copies")
    parser.add_argument("--videos", type=int, default=3, help="generated corpus videos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="JOB", choices=[j.name for j in JOBS],
                        help="run only these jobs (in the order above)")
    parser.add_argument("--job-timeout", type=float, default=1200.0,
                        help="seconds one job may take before it is stopped")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from ttm_ray.config import ConfigError

    root = Path(args.root).resolve()
    jobs = tuple(j for j in JOBS if not args.only or j.name in args.only)
    try:
        check_overlays(jobs)
    except ConfigError as exc:
        print(f"rehearse: an overlay changes what it may not:\n{exc}", file=sys.stderr)
        print(json.dumps({"status": "config_error", "error": str(exc)}))
        return 2
    start = time.perf_counter()
    print(f"[rehearse] building inputs under {root}", file=sys.stderr)
    build_inputs(root, args.videos, args.seed)
    os.environ[ROOT_VAR] = str(root)
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # The rehearsal's own tracking server (whatever MLFLOW_TRACKING_URI this shell has),
    # named in every fake node's environment as the clusters name theirs: drivers and Ray
    # Train's rank 0 inherit it, and run.mlflow_tracking_uri is null in every overlay.
    mlflow_server = MlflowServer(root / "mlflow")
    with mlflow_server:
        mlflow_uri = mlflow_server.uri
        print(f"[rehearse] mlflow server at {mlflow_uri} (log {mlflow_server.log})",
              file=sys.stderr)
        # What every fake node's processes inherit: DeepSpeed's CPU accelerator, the JIT
        # extension cache the tests and CI reuse (the image ships the ops prebuilt instead)
        # and the tracking server.
        node_env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(repo_path(".cache", "torch_extensions"))),
            "MLFLOW_TRACKING_URI": mlflow_uri}
        results, nodes, failed = run_jobs(jobs, args, root, log_dir, node_env)
    ok = not failed
    print(table(results, nodes), file=sys.stderr)
    print(json.dumps({"status": "succeeded" if ok else "failed",
                      "seconds": round(time.perf_counter() - start, 1),
                      "jobs": {k: {"status": v["status"], "seconds": v["seconds"]}
                               for k, v in results.items()},
                      "nodes_launched": nodes,
                      "drivers": {k: v.get("driver") for k, v in results.items()},
                      "root": str(root), "mlflow": mlflow_uri,
                      "mlflow_backend": f"sqlite:///{mlflow_server.db}"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
