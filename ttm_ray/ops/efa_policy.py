"""EFA for the training node types: what a 4-node NCCL job needs from the cluster YAMLs.

Without EFA, NCCL between p4d/p4de nodes falls back to TCP sockets over the ENA interface
(about a tenth of EFA's 400 Gb/s) and ZeRO's all-gathers dominate each step; nothing fails,
the run is just slow. So a missing piece is a validation problem, not a runtime error.

What a node type on an EFA instance type must carry:

- **Launcher** (``node_config.InstanceType`` in :data:`EFA_INTERFACES`): one
  ``InterfaceType: efa`` network interface per network card (``NetworkCardIndex`` 0..N-1),
  each with its ``SubnetId`` and ``Groups`` (Ray requires both per interface once
  ``NetworkInterfaces`` is set); a cluster placement group; docker run options that pass
  the EFA devices (``--device /dev/infiniband``), lift the locked-memory limit
  (``--ulimit memlock=-1``) and set :data:`EFA_ENV`.
- **KubeRay** (a worker group whose ``nodeSelector`` names such an instance type): the EFA
  device plugin's ``vpc.amazonaws.com/efa`` resource (all N interfaces) in requests and
  limits, and :data:`EFA_ENV` on the Ray container.
"""

from __future__ import annotations

import re
from typing import Any

from ttm_ray.ops.problems import Problem, field_path

#: EFA interfaces (= network cards) per instance type (AWS "Supported instance types" for EFA).
EFA_INTERFACES: dict[str, int] = {
    "p4d.24xlarge": 4, "p4de.24xlarge": 4,
    "p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16,
}
#: libfabric settings NCCL's aws-ofi-nccl plugin needs. ``FI_EFA_USE_DEVICE_RDMA``: GPUDirect
#: RDMA (p4d and later); ``FI_EFA_FORK_SAFE``: Ray forks worker processes after libfabric
#: may have registered memory.
EFA_ENV: dict[str, str] = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1",
                           "FI_EFA_FORK_SAFE": "1"}
EFA_RESOURCE = "vpc.amazonaws.com/efa"
INSTANCE_TYPE_LABEL = "node.kubernetes.io/instance-type"


def launcher_efa(cfg: dict, file: str) -> list[Problem]:
    """EFA checks for every launcher node type on an EFA instance type."""
    out: list[Problem] = []
    types = cfg.get("available_node_types")
    for name, node in (types.items() if isinstance(types, dict) else ()):
        node_config = node.get("node_config") if isinstance(node, dict) else None
        if not isinstance(node_config, dict):
            continue
        wanted = EFA_INTERFACES.get(str(node_config.get("InstanceType")))
        if wanted is None:
            continue
        at = ("available_node_types", name)
        out.extend(_interfaces(node_config.get("NetworkInterfaces"), wanted,
                               str(node_config["InstanceType"]), file,
                               (*at, "node_config", "NetworkInterfaces")))
        if not (node_config.get("Placement") or {}).get("GroupName"):
            out.append(Problem(file, field_path((*at, "node_config", "Placement")),
                               "EFA nodes need a cluster placement group (Placement.GroupName)"))
        docker = node.get("docker") if isinstance(node.get("docker"), dict) else {}
        options = " ".join(map(str, [*((cfg.get("docker") or {}).get("run_options") or []),
                                     *(docker.get("worker_run_options") or [])]))
        where = field_path((*at, "docker", "worker_run_options"))
        if not re.search(r"--device[= ]/dev/infiniband\b", options):
            out.append(Problem(file, where, "EFA devices are not passed to the container: "
                                            "add `--device /dev/infiniband`"))
        if not re.search(r"--ulimit[= ]memlock=-1\b", options):
            out.append(Problem(file, where, "EFA registers pinned memory: add "
                                            "`--ulimit memlock=-1:-1`"))
        for key, value in EFA_ENV.items():
            if not re.search(rf"--env[= ]{key}={re.escape(value)}(\s|$)", options):
                out.append(Problem(file, where, f"add `--env {key}={value}` (NCCL over EFA)"))
    return out


def _interfaces(interfaces: Any, wanted: int, instance: str, file: str,
                at: tuple) -> list[Problem]:
    if not isinstance(interfaces, list):
        return [Problem(file, field_path(at), f"{instance} has {wanted} EFA network cards: "
                                              f"declare {wanted} `InterfaceType: efa` "
                                              "interfaces, one per NetworkCardIndex")]
    out = []
    efa = [i for i in interfaces if isinstance(i, dict) and i.get("InterfaceType") == "efa"]
    cards = sorted(int(i.get("NetworkCardIndex", 0)) for i in efa)
    if cards != list(range(wanted)):
        out.append(Problem(file, field_path(at), f"{instance} needs {wanted} EFA interfaces on "
                                                 f"NetworkCardIndex 0..{wanted - 1}, got "
                                                 f"cards {cards}"))
    for i, interface in enumerate(interfaces):
        if isinstance(interface, dict) and not (interface.get("SubnetId")
                                                and interface.get("Groups")):
            out.append(Problem(file, field_path(at, i), "each interface needs SubnetId and "
                                                        "Groups (Ray takes them from here)"))
    return out


def raycluster_efa(spec: dict, file: str, at: tuple) -> list[Problem]:
    """EFA checks for every KubeRay worker group pinned to an EFA instance type."""
    out: list[Problem] = []
    for g, group in enumerate(spec.get("workerGroupSpecs") or []):
        pod = ((group.get("template") or {}).get("spec") or {}) if isinstance(group, dict) \
            else {}
        wanted = EFA_INTERFACES.get(str((pod.get("nodeSelector") or {}).get(
            INSTANCE_TYPE_LABEL)))
        if wanted is None:
            continue
        for c, container in enumerate(pod.get("containers") or []):
            where = (*at, "workerGroupSpecs", g, "template", "spec", "containers", c)
            resources = container.get("resources") or {}
            for kind in ("requests", "limits"):
                got = (resources.get(kind) or {}).get(EFA_RESOURCE)
                if str(got) != str(wanted):
                    out.append(Problem(file, field_path(where, "resources", kind),
                                       f"{EFA_RESOURCE}: \"{wanted}\" (every EFA interface of "
                                       f"the node), got {got!r}"))
            env = {e.get("name"): e.get("value") for e in container.get("env") or []
                   if isinstance(e, dict)}
            for key, value in EFA_ENV.items():
                if env.get(key) != value:
                    out.append(Problem(file, field_path(where, "env"),
                                       f"set {key}={value} (NCCL over EFA)"))
    return out
