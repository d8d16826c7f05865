"""The fake autoscaling cluster (``ttm_ray.ops.fake_cluster``) and the capacity helper on it.

Unit tests check the config derived from cluster/aws.yaml. The slow ones start one real
cluster (head only; every worker group at 0) and drive it the way jobs do, from separate
driver processes (this process may hold another Ray, and Ray caches one auth token per
process): the capacity helper brings up a gpu_infer and a cpu_workers node from zero and a
GPU task runs there; a resource no node type offers fails fast; ``ray job submit`` of a job
that needs the training group scales it up. A fixed local Ray fails fast. Stopping leaves
none of the cluster's processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ttm_ray.ops.fake_cluster import FakeCluster
from ttm_ray.ops.fake_config import FAKE_HEAD_NODE_TYPE, fake_cluster_config

REPO = Path(__file__).resolve().parents[2]
AWS = REPO / "cluster" / "aws.yaml"
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ the config (fast)
def test_config_keeps_node_types_and_resources() -> None:
    cfg = fake_cluster_config(AWS, "10.0.0.1", 40000)
    types = cfg["available_node_types"]
    src = yaml.safe_load(AWS.read_text())["available_node_types"]
    assert set(types) == {*src} - {"head"} | {FAKE_HEAD_NODE_TYPE}
    assert cfg["head_node_type"] == FAKE_HEAD_NODE_TYPE
    assert types[FAKE_HEAD_NODE_TYPE]["resources"] == {"CPU": 0}
    assert types["cpu_workers"]["resources"]["cpu_worker"] == 1000
    assert types["gpu_infer"]["resources"]["gpu_infer"] == 1000
    assert types["gpu_infer"]["resources"]["GPU"] == 4  # GPUs declared as a resource
    train = types["train_a100"]["resources"]
    assert (train["GPU"], train["train_gpu"], train["accelerator_type:A100-80G"]) == (8, 8, 1)
    assert cfg["provider"]["module"].endswith("fake_multi_node.node_provider."
                                              "FakeMultiNodeProvider")
    assert cfg["provider"]["gcs_address"] == "10.0.0.1:40000"


def test_config_scales_counts_and_cpus_down() -> None:
    cfg = fake_cluster_config(AWS, "10.0.0.1", 40000, cpu_per_node=1.5,
                              max_workers_per_type=1, gpu_per_node=2, idle_timeout_minutes=0.5)
    workers = {k: v for k, v in cfg["available_node_types"].items()
               if k != FAKE_HEAD_NODE_TYPE}
    assert all(t["min_workers"] == 0 and t["max_workers"] == 1 for t in workers.values())
    assert cfg["max_workers"] == 3
    assert {t["resources"]["CPU"] for t in workers.values()} == {1.5}
    assert workers["gpu_infer"]["resources"]["GPU"] == 2
    assert workers["train_a100"]["resources"]["train_gpu"] == 2  # one per GPU, as declared
    assert workers["gpu_infer"]["resources"]["gpu_infer"] == 1000  # custom: as declared
    assert cfg["idle_timeout_minutes"] == 0.5


def test_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(fake_cluster_config(AWS, "10.0.0.1", 40000))


# ------------------------------------------------------------------ a live cluster (slow)
DRIVER = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from ttm_ray.ops.capacity import CapacityError, ensure_capacity
    bundles = json.loads(sys.argv[1])
    ray.init(log_to_driver=False)
    out = {}
    start = time.monotonic()
    try:
        ensure_capacity(bundles, timeout_s=float(sys.argv[2]), what="test", poll_s=2,
                        say=lambda m: print(m, file=sys.stderr, flush=True))
        out["ok"] = True
    except CapacityError as exc:
        out["error"] = str(exc)
    out["seconds"] = round(time.monotonic() - start, 1)
    if out.get("ok") and len(sys.argv) > 3:
        task = ray.remote(**json.loads(sys.argv[3]))(
            lambda: (os.environ.get("CUDA_VISIBLE_DEVICES"),
                     ray.get_runtime_context().get_node_id()))
        out["task"] = ray.get(task.remote(), timeout=120)
    print(json.dumps(out))
""")


def drive(env: dict[str, str], bundles: list[dict], timeout_s: float,
          task: dict | None = None) -> dict:
    args = [json.dumps(bundles), str(timeout_s)] + ([json.dumps(task)] if task else [])
    run = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout_s + 180)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fc() -> Iterator[FakeCluster]:
    cluster = FakeCluster(AWS, max_workers_per_type=1).start()
    print(f"fake cluster up in {cluster.started_s} s at {cluster.dashboard_url}",
          file=sys.stderr)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def driver_env(fc: FakeCluster) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("RAY_ADDRESS") and k != "RAY_AUTH_TOKEN"}
    return {**base, **fc.env}


@pytest.mark.slow
def test_starts_with_the_head_only_and_token_auth(fc: FakeCluster) -> None:
    assert fc.nodes_launched() == {}
    assert [n["is_head_node"] for n in fc.nodes()] == [True]
    assert fc.processes()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{fc.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code == 401


@pytest.mark.slow
def test_capacity_scales_gpu_and_cpu_groups_from_zero(fc: FakeCluster,
                                                      driver_env: dict[str, str]) -> None:
    out = drive(driver_env, [{"CPU": 1, "GPU": 1, "gpu_infer": 0.01}, {"cpu_worker": 1}],
                timeout_s=240, task={"num_gpus": 1, "resources": {"gpu_infer": 0.01}})
    print(f"capacity: nodes joined after {out.get('seconds')} s", file=sys.stderr)
    assert out.get("ok"), out
    launched = fc.nodes_launched()
    assert launched.get("gpu_infer", 0) >= 1 and launched.get("cpu_workers", 0) >= 1
    visible, node = out["task"]
    assert visible == "0"  # one (fake) GPU assigned
    assert node != next(n["node_id"] for n in fc.nodes() if n["is_head_node"])


@pytest.mark.slow
def test_resource_no_node_type_offers_fails_fast(fc: FakeCluster,
                                                 driver_env: dict[str, str]) -> None:
    start = time.monotonic()
    out = drive(driver_env, [{"CPU": 1, "tpu_v5": 1}], timeout_s=600)
    assert "tpu_v5 offered by no node type" in out.get("error", ""), out
    assert time.monotonic() - start < 60
    assert "train_a100" not in fc.nodes_launched()


@pytest.mark.slow
def test_ray_job_submit_scales_up_the_training_group(fc: FakeCluster,
                                                     driver_env: dict[str, str]) -> None:
    code = ("import ray; from ttm_ray.ops.capacity import ensure_capacity; ray.init(); "
            "b = {'CPU': 1, 'GPU': 1, 'train_gpu': 1, 'accelerator_type:A100-80G': 0.001}; "
            "ensure_capacity([b] * 2, timeout_s=240, what='train'); "
            "f = ray.remote(num_gpus=1, resources={'train_gpu': 1}, "
            "accelerator_type='A100-80G')(lambda: 'trained'); print(ray.get(f.remote()))")
    run = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", fc.dashboard_url, "--working-dir",
         ".", "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "-c", code],
        cwd=REPO, env=driver_env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "trained" in run.stdout
    assert fc.nodes_launched().get("train_a100") == 1  # 2 workers x 1 GPU: one 8-GPU node


@pytest.mark.slow
def test_fixed_local_cluster_fails_fast() -> None:
    code = ("import ray; from ttm_ray.ops.capacity import CapacityError, ensure_capacity; "
            "ray.init(num_cpus=1, include_dashboard=False)\n"
            "try:\n ensure_capacity([{'CPU': 1, 'gpu_infer': 0.01}], timeout_s=600)\n"
            "except CapacityError as e:\n print('ERROR', e)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    assert "ERROR" in run.stdout and "no autoscaler" in run.stdout, run.stderr[-3000:]
    assert time.monotonic() - start < 90


@pytest.mark.slow
def test_stop_leaves_none_of_its_processes(fc: FakeCluster) -> None:
    assert len(fc.processes()) > 10  # head daemons, raylets, agents, workers
    folder = fc.dir
    start = time.monotonic()
    fc.stop()
    print(f"stopped in {time.monotonic() - start:.1f} s", file=sys.stderr)
    assert fc.processes() == []
    assert folder is not None and not folder.exists()
