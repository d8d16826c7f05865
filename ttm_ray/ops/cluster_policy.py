"""House rules for cluster definitions: one image, nothing exposed, no secrets.

- One image: every launcher ``docker`` image equals ``TTM_IMAGE`` in ``image.env``; every
  Kubernetes container says ``image: ttm-ray`` and the kustomization's ``images:`` entry for
  that placeholder resolves to ``TTM_IMAGE``.
- Not exposed: launcher heads bind the dashboard to loopback and run with
  ``RAY_AUTH_MODE=token``; RayClusters use ``authOptions.mode: token``, a ClusterIP head
  service and no ingress; no Service is a LoadBalancer or NodePort.
- No secrets: no Secret manifests, no literal values for env vars named like credentials.
- References resolve: kustomization ``resources`` exist; a RayJob's ``clusterSelector``
  names a RayCluster defined in the same tree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ttm_ray.ops.problems import Problem, field_path

IMAGE_FILE = "image.env"
IMAGE_VAR = "TTM_IMAGE"
K8S_IMAGE_PLACEHOLDER = "ttm-ray"  # kustomization.yaml `images:` rewrites it
RAYJOB_CLUSTER_KEY = "ray.io/cluster"  # the clusterSelector label KubeRay matches on
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Env var names that hold credentials (RAY_AUTH_TOKEN, AWS_SECRET_ACCESS_KEY, ...), as whole
# words so TOKENIZERS_PARALLELISM is not one.
SECRET_LIKE = re.compile(
    r"(^|_)(TOKEN|PASSWORD|SECRET|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?|API_KEY)(_|$)", re.I)


def read_image(cluster_dir: Path, problems: list[Problem]) -> str | None:
    path = cluster_dir / IMAGE_FILE
    if not path.is_file():
        problems.append(Problem(str(path), "<file>", f"not found (it defines {IMAGE_VAR})"))
        return None
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == IMAGE_VAR:
            return value.strip().strip("'\"")
    problems.append(Problem(str(path), IMAGE_VAR, "not set"))
    return None


def launcher_policy(cfg: dict, file: str, image: str | None) -> list[Problem]:
    out = []
    docker = cfg.get("docker") if isinstance(cfg.get("docker"), dict) else {}
    images = {("docker", k): docker[k] for k in ("image", "head_image", "worker_image")
              if k in docker}
    for name, node in (cfg.get("available_node_types") or {}).items():
        node_docker = node.get("docker") if isinstance(node, dict) else None
        if isinstance(node_docker, dict) and "worker_image" in node_docker:
            images[("available_node_types", name, "docker", "worker_image")] = (
                node_docker["worker_image"])
    if not images:
        out.append(Problem(file, "docker.image", "no container image: nodes would install "
                                                 "packages at boot instead of running the image"))
    for path, value in images.items():
        if image is not None and value != image:
            out.append(Problem(file, field_path(path), f"{value!r} differs from {IMAGE_VAR}="
                                                       f"{image!r} in {IMAGE_FILE}"))
    head_cmds = " ".join(map(str, cfg.get("head_start_ray_commands") or []))
    for host in re.findall(r"--dashboard-host[= ]+['\"]?([^\s'\";]+)", head_cmds):
        if host not in LOOPBACK:
            out.append(Problem(file, "head_start_ray_commands",
                               f"--dashboard-host={host} exposes the dashboard and job API; "
                               "bind 127.0.0.1 and tunnel over SSH"))
    everything = " ".join(map(str, [*(docker.get("run_options") or []),
                                    *(cfg.get("head_start_ray_commands") or []),
                                    *(cfg.get("worker_start_ray_commands") or [])]))
    if not re.search(r"RAY_AUTH_MODE=token\b", everything):
        out.append(Problem(file, "docker.run_options",
                           "RAY_AUTH_MODE=token is not set: the cluster would run without "
                           "token authentication"))
    return out


def check_cluster_selectors(manifests: list[tuple[str, dict]]) -> list[Problem]:
    """A RayJob that runs on an existing cluster must name a RayCluster defined here."""
    names = {(d.get("metadata") or {}).get("name") for _, d in manifests
             if d.get("kind") == "RayCluster"}
    out = []
    for file, doc in manifests:
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        selector = spec.get("clusterSelector") if doc.get("kind") == "RayJob" else None
        if isinstance(selector, dict) and selector.get(RAYJOB_CLUSTER_KEY) not in names:
            out.append(Problem(file, field_path(("spec", "clusterSelector",
                                                 RAYJOB_CLUSTER_KEY)),
                               f"no RayCluster named {selector.get(RAYJOB_CLUSTER_KEY)!r} here "
                               f"(defined: {', '.join(sorted(map(str, names))) or 'none'})"))
    return out


def raycluster_policy(spec: dict, file: str, at: tuple) -> list[Problem]:
    out = []
    auth = spec.get("authOptions") if isinstance(spec.get("authOptions"), dict) else {}
    if auth.get("mode") != "token" and not auth.get("enableK8sTokenAuth"):
        out.append(Problem(file, field_path(at, "authOptions", "mode"),
                           "token authentication is off: set authOptions.mode: token"))
    head = spec.get("headGroupSpec") if isinstance(spec.get("headGroupSpec"), dict) else {}
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        out.append(Problem(file, field_path(at, "headGroupSpec", "serviceType"),
                           f"{head['serviceType']} exposes the dashboard and job API; use "
                           "ClusterIP and kubectl port-forward"))
    if head.get("enableIngress"):
        out.append(Problem(file, field_path(at, "headGroupSpec", "enableIngress"),
                           "an ingress exposes the dashboard and job API"))
    return out


def container_checks(doc: Any, file: str, at: tuple = ()) -> list[Problem]:
    """Containers anywhere in a manifest: the image placeholder, no literal credentials."""
    out: list[Problem] = []
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            out.extend(container_checks(item, file, (*at, i)))
        return out
    if not isinstance(doc, dict):
        return out
    for key in ("containers", "initContainers"):
        for i, container in enumerate(doc.get(key) or []):
            if not isinstance(container, dict):
                continue
            where = (*at, key, i)
            found = container.get("image")
            if found != K8S_IMAGE_PLACEHOLDER:
                out.append(Problem(file, field_path(where, "image"),
                                   f"must be {K8S_IMAGE_PLACEHOLDER!r} (kustomization.yaml "
                                   f"`images:` sets the one image), got {found!r}"))
            for j, env in enumerate(container.get("env") or []):
                if (isinstance(env, dict) and SECRET_LIKE.search(str(env.get("name", "")))
                        and env.get("value")):
                    out.append(Problem(file, field_path(where, "env", j, "value"),
                                       f"{env['name']} is a literal: use valueFrom.secretKeyRef"))
    for key, value in doc.items():
        if key not in ("containers", "initContainers"):
            out.extend(container_checks(value, file, (*at, key)))
    return out


def kustomization_checks(doc: dict, path: Path, file: str, image: str | None) -> list[Problem]:
    out = []
    for i, resource in enumerate(doc.get("resources") or []):
        if isinstance(resource, str) and "://" not in resource and not (
                path.parent / resource).exists():
            out.append(Problem(file, field_path(("resources", i)), f"{resource} not found"))
    entries = [e for e in doc.get("images") or []
               if isinstance(e, dict) and e.get("name") == K8S_IMAGE_PLACEHOLDER]
    if not entries:
        out.append(Problem(file, "images", f"no entry for {K8S_IMAGE_PLACEHOLDER!r}: the "
                                           "manifests' image placeholder would stay as is"))
    for entry in entries:
        name = entry.get("newName", K8S_IMAGE_PLACEHOLDER)
        ref = f"{name}@{entry['digest']}" if "digest" in entry else f"{name}:{entry.get('newTag')}"
        if image is not None and ref != image:
            out.append(Problem(file, "images", f"{K8S_IMAGE_PLACEHOLDER} -> {ref!r} differs "
                                               f"from {IMAGE_VAR}={image!r} in {IMAGE_FILE}"))
    return out
