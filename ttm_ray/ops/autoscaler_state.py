"""What a job driver can learn from the GCS about its cluster's nodes and autoscaler.

Is an autoscaler running? (Ray 2.60; checked against its source and on live clusters.)

* **v2** (``ray up`` since Ray 2.50, the fake cluster): the autoscaler reports its state to
  the GCS every tick; ``GetClusterStatus`` returns it with ``autoscaler_state_version > 0``.
  A cluster without a v2 autoscaler returns an empty state.
* **v1** (KubeRay's default, older ``ray up``): the monitor writes ``__autoscaling_status``
  to the GCS KV every tick. A plain ``ray.init()`` / ``ray start`` head runs the same
  monitor with a *read-only* provider that names every node ``node_<node id>``
  (``format_readonly_node_type``): that is a fixed cluster. A status older than
  :data:`STALE_S` is a monitor that died.
* Not used: the GCS's cluster-config key (``ray._private.state.state.get_cluster_config()``,
  what Ray Data's own ``is_autoscaling_enabled`` reads): neither autoscaler writes it in the
  open-source 2.60 (it stays empty on a fake v2 cluster), and ``is_autoscaler_v2()`` only
  says which version *would* run.

Node types with their resources and ``max_workers`` are not in the GCS. When the driver
runs on the head (``ray job submit``), :func:`node_type_catalog` reads them from the
autoscaling config the local autoscaler process was started with; elsewhere (KubeRay, whose
autoscaler is a sidecar container) they are unknown and messages name only what the
autoscaler reported (pending / failed launches, infeasible requests).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttm_ray.ops.cluster_capacity import NodeType, launcher_cluster

STALE_S = 60.0  # a v1 status older than this: the monitor is gone
NODE_GROUP_LABEL = "ray.io/node-group"
HEAD_RESOURCE = "node:__internal_head__"
# ray.core.generated.autoscaler_pb2.NodeStatus: RUNNING = 1, IDLE = 3 (DEAD 2, DRAINING 4).
SCHEDULABLE = (1, 3)


@dataclass
class Node:
    node_type: str
    resources: dict[str, float]


@dataclass
class ClusterView:
    """One look at the cluster: its schedulable nodes and what the autoscaler says."""

    nodes: list[Node]
    autoscaler: str | None  # "v1" | "v2" | None: no autoscaler (a fixed cluster)
    launching: Counter[str] = field(default_factory=Counter)  # node type -> nodes on the way
    failed: list[str] = field(default_factory=list)  # "<node type>: <reason>"
    infeasible: list[list[dict[str, float]]] = field(default_factory=list)  # v2 constraints


def _gcs(address: str) -> Any:
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def gcs_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def look(address: str | None = None) -> ClusterView:
    """The cluster the driver is connected to (``ray.init`` first), in one or two RPCs."""
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    client = _gcs(address or gcs_address())
    reply = GetClusterStatusReply()
    reply.ParseFromString(client.get_cluster_status(timeout_s=30))
    nodes = [Node(_type_name(n), dict(n.total_resources))
             for n in reply.cluster_resource_state.node_states if n.status in SCHEDULABLE]
    state = reply.autoscaling_state
    if state.autoscaler_state_version > 0:
        view = ClusterView(nodes, "v2")
        for req in state.pending_instance_requests:
            view.launching[req.ray_node_type_name] += req.count
        for inst in state.pending_instances:
            view.launching[inst.ray_node_type_name] += 1
        view.failed = [f"{f.ray_node_type_name}: {f.reason}"
                       for f in state.failed_instance_requests]
        view.infeasible = [[dict(r.request.resources_bundle) for r in c.resource_requests
                            for _ in range(r.count)]
                           for c in state.infeasible_cluster_resource_constraints]
        return view
    return _v1_view(client, nodes)


def _type_name(node: Any) -> str:
    """The node's type as its raylet reports it (RAY_NODE_TYPE_NAME, which the launchers
    set), else its ``ray.io/node-group`` label (KubeRay)."""
    if node.ray_node_type_name:
        return str(node.ray_node_type_name)
    labels = dict(node.labels)
    if NODE_GROUP_LABEL in labels:
        return labels[NODE_GROUP_LABEL]
    return "head" if HEAD_RESOURCE in node.total_resources else "?"


def _v1_view(client: Any, nodes: list[Node]) -> ClusterView:
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS

    raw = client.internal_kv_get(DEBUG_AUTOSCALING_STATUS.encode(), namespace=None)
    status = json.loads(raw) if raw else {}
    report = status.get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    readonly = all(t == f"node_{n}" for n, t in mapping.items())
    if not report or readonly or time.time() - float(status.get("time", 0)) > STALE_S:
        return ClusterView(nodes, None)
    view = ClusterView(nodes, "v1")
    view.launching.update(report.get("pending_launches") or {})
    for _ip, node_type, _status in report.get("pending_nodes") or []:
        view.launching[node_type] += 1
    view.failed = [f"{node_type}: failed (ip {ip})"
                   for ip, node_type in report.get("failed_nodes") or []]
    return view


def v2_enabled(address: str | None = None) -> bool:
    """The head was started with autoscaler v2 (the GCS flag ``is_autoscaler_v2`` reads):
    its autoscaler may just not have reported yet (the first seconds after ``ray start``)."""
    import ray._raylet as raylet

    value = _gcs(address or gcs_address()).internal_kv_get(
        raylet.GCS_AUTOSCALER_V2_ENABLED_KEY.encode(),
        namespace=raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
    return value == b"1"


def node_type_catalog(address: str | None = None) -> list[NodeType] | None:
    """Worker node types of the autoscaler serving ``address``, from the config file its
    process was started with (``--autoscaling-config``); None where that process is not on
    this machine or its file cannot be read."""
    import psutil
    import yaml

    address = address or gcs_address()
    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info["cmdline"] or []
        if not any(a.endswith("monitor.py") for a in args):
            continue
        if f"--gcs-address={address}" not in args:
            continue
        path = next((a.split("=", 1)[1] for a in args
                     if a.startswith("--autoscaling-config=")), None)
        if not path:
            return None
        try:
            cfg = yaml.safe_load(Path(path).expanduser().read_text())
        except (OSError, yaml.YAMLError):
            return None
        head = cfg.get("head_node_type")
        return [t for t in launcher_cluster(cfg, path).node_types if t.name != head]
    return None


def request(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for ``bundles`` (replaces the cluster's previous request; [] clears)."""
    from ray.autoscaler.sdk import request_resources
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    # request_resources picks v1 (KV) or v2 (RPC) from a per-process cached flag: refresh it,
    # this process may have talked to another cluster before.
    is_autoscaler_v2(fetch_from_server=True)
    request_resources(bundles=bundles)
