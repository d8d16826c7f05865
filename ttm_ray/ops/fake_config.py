"""A fake multi-node autoscaling config derived from a cluster launcher YAML (``aws.yaml``).

Ray's fake multi-node provider ("Testing Autoscaling Locally") starts every "node" as a
raylet on this machine, so the same job configs, custom resources and node-type names as the
real cluster can be rehearsed with 2 real cores. What changes, and why:

* **Worker counts.** Every worker group gets ``min_workers: 0`` (the shipped clusters scale
  from zero: that is what a rehearsal must exercise) and ``max_workers`` capped at
  ``max_workers_per_type`` (each fake node is a raylet plus its workers: ~0.3-0.5 GB RSS).
* **CPU per node.** ``CPU = min(declared, cpu_per_node)``: logical CPUs decide how many task
  workers a node starts at once, and 64 busy workers on 2 real cores would thrash. A type
  that declares no CPU (the AWS launcher detects it from the instance) gets ``cpu_per_node``.
* **GPU per node.** Declared GPUs are kept as a *resource* (nothing here has a GPU; Ray only
  sets ``CUDA_VISIBLE_DEVICES`` for the tasks), unless ``gpu_per_node`` caps them: a cap
  bounds how many GPU actors (model replicas, each holding its weights in host RAM here) one
  fake node can run at once. ``train_gpu`` is capped the same way so "one train_gpu per GPU"
  stays true; other custom resources and ``accelerator_type:*`` are kept as declared (jobs
  select node groups by them, and their per-node amounts are what fractional requests pack
  against).
* **Object store.** Each node gets ``object_store_memory`` (``object_store_mb``): by default
  every raylet would reserve 30% of this machine's RAM.
* **Head.** The fake provider hard-codes the head's node type as ``ray.head.default``; the
  launcher's head type (``head`` in aws.yaml) is renamed to it, and keeps ``CPU: 0``.

A job whose actors ask more CPUs than ``cpu_per_node`` (the production prep configs ask 4)
fits no fake node: the capacity helper says so at once; rehearse it with a larger
``cpu_per_node`` or with ``--set`` overrides. GPUs stay as declared by default because how
many GPU workers pack on one node (4 per gpu_infer, 8 per training node) is what placement
decisions depend on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

#: ``ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_TYPE`` /
#: ``FAKE_HEAD_NODE_ID`` (repeated so this module imports without Ray).
FAKE_HEAD_NODE_TYPE = "ray.head.default"
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
MB = 1024 * 1024
OBJECT_STORE_MB = 256  # per node; Ray's floor is 75 MB
#: Resources capped together with GPU (one per GPU on the shipped clusters).
PER_GPU = ("train_gpu",)


def scale_resources(declared: Mapping[str, Any], cpu_per_node: float,
                    gpu_per_node: int | None) -> dict[str, float]:
    """One worker type's resources under the rule in the module docstring."""
    out = {k: float(v) for k, v in declared.items()
           if isinstance(v, int | float) and not isinstance(v, bool)}
    out["CPU"] = min(out.get("CPU", cpu_per_node), cpu_per_node)
    if gpu_per_node is not None and out.get("GPU", 0) > gpu_per_node:
        for key in ("GPU", *PER_GPU):
            if key in out:
                out[key] = min(out[key], float(gpu_per_node))
    # Whole numbers stay ints: ``ray start --num-gpus`` and the provider's RayParams want ints.
    return {k: int(v) if float(v).is_integer() else v for k, v in out.items()}


def fake_cluster_config(
    aws_yaml_path: str | Path,
    head_ip: str,
    port: int,
    *,
    cpu_per_node: float = 2,
    gpu_per_node: int | None = None,
    max_workers_per_type: int = 2,
    object_store_mb: int = OBJECT_STORE_MB,
    idle_timeout_minutes: float = 1.0,
    autoscaler_v2: bool = True,
) -> dict[str, Any]:
    """The ``fake_multinode`` autoscaling config of the launcher YAML at ``aws_yaml_path``.

    ``head_ip:port`` is the GCS the fake nodes join: without ``provider.gcs_address`` they
    dial ``<ip>:6379`` and never join a head on another port. ``autoscaler_v2`` matches what
    ``ray up`` starts since Ray 2.50 (v2 also wants ``launch_multiple`` and the head's id).
    """
    src = yaml.safe_load(Path(aws_yaml_path).read_text())
    head_type = src.get("head_node_type")
    types: dict[str, Any] = {}
    for name, node in (src.get("available_node_types") or {}).items():
        declared = node.get("resources") or {}
        if name == head_type:
            continue
        most = node.get("max_workers", src.get("max_workers", 2))
        resources = scale_resources(declared, cpu_per_node, gpu_per_node)
        resources["object_store_memory"] = object_store_mb * MB
        types[name] = {"resources": resources, "node_config": {}, "min_workers": 0,
                       "max_workers": max(0, min(int(most), max_workers_per_type))}
    head_resources = {k: v for k, v in ((src.get("available_node_types") or {})
                                        .get(head_type, {}).get("resources") or {}).items()}
    types[FAKE_HEAD_NODE_TYPE] = {"resources": {"CPU": 0, **head_resources}, "node_config": {},
                                  "max_workers": 0}
    provider: dict[str, Any] = {
        # Ray's FakeMultiNodeProvider, named as an `external` provider: with
        # `type: fake_multinode` the autoscaler reads fake_multi_node/example.yaml for its
        # defaults, a file the Ray 2.60 wheel does not ship: the autoscaler process dies at
        # start while `ray start` reports success.
        "type": "external",
        "module": FAKE_PROVIDER,
        "gcs_address": f"{head_ip}:{port}",
        # As Ray's fake_multi_node/example.yaml: no SSH updaters, node ids double as IPs.
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    }
    if autoscaler_v2:
        provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
    return {
        "cluster_name": f"{src.get('cluster_name', 'ray')}-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": src.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": provider,
        "auth": {},
        "docker": {},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
