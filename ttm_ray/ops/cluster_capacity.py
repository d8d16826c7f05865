"""Do the job configs' resource requests exist on, and fit, each cluster definition?

A *request* is any mapping in a job config (after ``base:`` merging) that names a custom
resource (``custom_resources``) or an accelerator type (``accelerator_type``): a prep stage's
``resources.<stage>`` or a training ``scaling``. Its bundle is what one actor / training
worker asks Ray for: ``num_cpus`` / ``cpus_per_worker`` as CPU, ``num_gpus`` (or 1 when
``use_gpu``) as GPU, the custom resources, and 0.001 of ``accelerator_type:<type>`` (what Ray
Train asks per worker). Amounts a file does not state are not assumed.

A node type's resources are what it advertises to Ray: a launcher's ``resources`` mapping, a
KubeRay group's ``rayStartParams`` (num-cpus, num-gpus, the ``resources`` JSON) and group
``resources``, else the container's cpu / nvidia.com/gpu limits. CPU or GPU a node type does
not state (the AWS launcher detects them from the instance type) count as unknown, never as
a shortage. How many of a node type can exist: 1 for the head, else its max_workers (capped
by the launcher's global max_workers) or maxReplicas x numOfHosts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ttm_ray.ops.problems import Problem, field_path

ACCELERATOR_PREFIX = "accelerator_type:"  # ray._common.utils.RESOURCE_CONSTRAINT_PREFIX
ACCELERATOR_REQUEST = 0.001  # what ScalingConfig(accelerator_type=...) asks per worker
DETECTED = ("CPU", "GPU")  # Ray can fill these in from the machine itself
KUBERAY_MAX_REPLICAS = 2**31 - 1  # WorkerGroupSpec.maxReplicas default


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]
    max_count: int


@dataclass
class ClusterDef:
    label: str  # e.g. "cluster/aws.yaml" or "cluster/kuberay/raycluster.yaml (RayCluster x)"
    node_types: list[NodeType]


@dataclass
class Request:
    file: str
    path: tuple
    bundle: dict[str, float]
    named: dict[str, tuple]  # resource name -> key path that asks for it
    num_workers: int | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# ---------------------------------------------------------------- cluster side


def launcher_cluster(cfg: dict, label: str) -> ClusterDef:
    global_max = cfg.get("max_workers", 2)  # Ray's default when the file leaves it out
    global_max = global_max if isinstance(global_max, int) else 0
    head = cfg.get("head_node_type")
    types = []
    for name, node in (cfg.get("available_node_types") or {}).items():
        if not isinstance(node, dict):
            continue
        raw = node.get("resources") or {}
        resources = {k: n for k, v in raw.items() if (n := _number(v)) is not None}
        most = node.get("max_workers", global_max)
        count = 1 if name == head else min(most if isinstance(most, int) else 0, global_max)
        types.append(NodeType(str(name), resources, count))
    return ClusterDef(label, types)


def quantity(value: Any) -> float | None:
    """A Kubernetes CPU/GPU quantity: 8, "8", "500m"."""
    if (n := _number(value)) is not None:
        return n
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(m?)\s*", str(value))
    if not match:
        return None
    return float(match[1]) / (1000 if match[2] else 1)


def parse_resources_param(text: str) -> dict[str, float]:
    """``rayStartParams.resources``: KubeRay passes it to a shell as ``--resources=<text>``,
    so its documented form is a quoted, escaped JSON object: ``'"{\\"gpu\\": 1}"'``."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"')
    data = json.loads(text)
    if not isinstance(data, dict) or any(_number(v) is None for v in data.values()):
        raise ValueError("expected a JSON object of resource amounts")
    return {str(k): float(v) for k, v in data.items()}


def kuberay_group(group: dict, name: str, count: int, file: str, path: tuple,
                  problems: list[Problem]) -> NodeType:
    params = group.get("rayStartParams") or {}
    resources: dict[str, float] = {}
    containers = (((group.get("template") or {}).get("spec") or {}).get("containers")) or [{}]
    limits = ((containers[0] or {}).get("resources") or {}).get("limits") or {}
    for key, param, limit in (("CPU", "num-cpus", "cpu"), ("GPU", "num-gpus", "nvidia.com/gpu")):
        amount = quantity(params[param]) if param in params else quantity(limits.get(limit))
        if amount is not None:
            resources[key] = amount
    if "resources" in params:
        try:
            resources.update(parse_resources_param(str(params["resources"])))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            problems.append(Problem(file, field_path(path, "rayStartParams", "resources"),
                                    f"not a JSON object of resource amounts: {exc}"))
    for key, value in (group.get("resources") or {}).items():  # KubeRay >= 1.5 group field
        if (amount := quantity(value)) is not None:
            resources[str(key)] = amount
    return NodeType(name, resources, count)


def kuberay_cluster(spec: dict, label: str, file: str, path: tuple,
                    problems: list[Problem]) -> ClusterDef:
    types = []
    if isinstance(spec.get("headGroupSpec"), dict):
        types.append(kuberay_group(spec["headGroupSpec"], "head", 1, file,
                                   (*path, "headGroupSpec"), problems))
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        if not isinstance(group, dict):
            continue
        most = group.get("maxReplicas", KUBERAY_MAX_REPLICAS)
        hosts = group.get("numOfHosts", 1)
        count = 0 if group.get("suspend") else (most if isinstance(most, int) else 0) * (
            hosts if isinstance(hosts, int) else 1)
        types.append(kuberay_group(group, str(group.get("groupName", i)), count, file,
                                   (*path, "workerGroupSpecs", i), problems))
    return ClusterDef(label, types)


# ---------------------------------------------------------------- job side


def job_requests(data: Any, file: str, path: tuple = ()) -> list[Request]:
    """Every mapping under ``data`` that names a custom resource or an accelerator type."""
    out: list[Request] = []
    if isinstance(data, list):
        for i, item in enumerate(data):
            out.extend(job_requests(item, file, (*path, i)))
        return out
    if not isinstance(data, dict):
        return out
    custom = data.get("custom_resources")
    accelerator = data.get("accelerator_type")
    named: dict[str, tuple] = {}
    bundle: dict[str, float] = {}
    if isinstance(custom, dict):
        for key, value in custom.items():
            named[str(key)] = (*path, "custom_resources", key)
            bundle[str(key)] = _number(value) or 0.0
    if isinstance(accelerator, str) and accelerator:
        name = ACCELERATOR_PREFIX + accelerator
        named[name] = (*path, "accelerator_type")
        bundle[name] = ACCELERATOR_REQUEST
    if named:
        request = Request(file, path, bundle, named)
        cpu = _number(data.get("num_cpus", data.get("cpus_per_worker")))
        gpu = _number(data.get("num_gpus"))
        if gpu is None and data.get("use_gpu") is True:
            gpu = 1.0
        for key, amount in (("CPU", cpu), ("GPU", gpu)):
            if amount:
                bundle[key] = amount
        workers = data.get("num_workers")
        if isinstance(workers, int) and not isinstance(workers, bool):
            request.num_workers = workers
        out.append(request)
    for key, value in data.items():
        out.extend(job_requests(value, file, (*path, key)))
    return out


# ---------------------------------------------------------------- matching


def per_node(bundle: dict[str, float], node: NodeType) -> float:
    """How many bundles one node of this type holds (inf when nothing limits it)."""
    fits = math.inf
    for key, amount in bundle.items():
        if amount <= 0:
            continue
        if key not in node.resources:
            if key in DETECTED:
                continue  # unknown here: Ray detects it on the machine
            return 0
        fits = min(fits, math.floor(node.resources[key] / amount + 1e-9))
    return fits


def _what(name: str) -> str:
    return "accelerator type" if name.startswith(ACCELERATOR_PREFIX) else "custom resource"


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def check_request(request: Request, cluster: ClusterDef) -> list[Problem]:
    offered = {k for node in cluster.node_types for k in node.resources}
    missing = [name for name in request.named if name not in offered]
    if missing:
        return [Problem(request.file, field_path(request.named[name]),
                        f"{_what(name)} {name!r} is not offered by any node type of "
                        f"{cluster.label}")
                for name in missing]
    slots = {node.name: per_node(request.bundle, node) for node in cluster.node_types}
    if not any(slots.values()):
        return [Problem(request.file, field_path(request.path),
                        f"no node type of {cluster.label} holds one {_fmt(request.bundle)} "
                        "(an actor or worker needs all of it on one node)")]
    if request.num_workers is None:
        return []
    room = sum(node.max_count * slots[node.name] for node in cluster.node_types
               if slots[node.name] and node.max_count)
    if room >= request.num_workers:
        return []
    detail = ", ".join(f"{node.name}: {node.max_count} x {slots[node.name]:g}"
                       for node in cluster.node_types if slots[node.name])
    return [Problem(request.file, field_path(request.path, "num_workers"),
                    f"{request.num_workers} workers of {_fmt(request.bundle)} do not fit on "
                    f"{cluster.label}: room for {room:g} (nodes x workers per node: {detail})")]
