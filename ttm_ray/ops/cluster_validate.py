"""``validate_cluster``: every check of ``cluster/`` that needs no cloud and no cluster.

What is checked against what:

- **Ray launcher YAMLs** (any ``*.yaml`` under the cluster dir with ``provider:`` and
  ``available_node_types:``): Ray's own cluster-config JSON schema from the installed ``ray``
  package (``ray/autoscaler/ray-schema.json``, what ``ray up`` validates with: unknown keys
  and wrong types in node types are errors), then the checks ``ray up`` makes after it
  (``head_node_type`` names a node type; the sum of ``min_workers`` fits ``max_workers``)
  and ``min_workers <= max_workers`` per node type.
- **Kubernetes manifests** (documents with ``apiVersion`` and ``kind``): core kinds against
  the strict Kubernetes JSON schemas shipped by ``kubernetes-validate`` (generated from the
  Kubernetes OpenAPI, unknown fields rejected); ``RayCluster`` / ``RayJob`` /
  ``Kustomization`` against the trimmed schemas in ``<cluster_dir>/kuberay/schemas/``
  (transcribed from the KubeRay v1.7.0 field reference), whose pod templates are checked
  against the Kubernetes PodTemplateSpec schema. A kind with no schema is a Problem, never
  skipped. The kustomization's ``resources`` must exist; a RayJob's ``clusterSelector``
  must name a RayCluster defined here.
- **One image** (this and the next: ``ttm_ray.ops.cluster_policy``): every launcher
  ``docker`` image equals ``TTM_IMAGE`` in ``<cluster_dir>/image.env``; every Kubernetes
  container says ``image: ttm-ray`` and the kustomization's ``images:`` entry for it
  resolves to ``TTM_IMAGE``.
- **Exposure and secrets**: launcher heads bind the dashboard to loopback and set
  ``RAY_AUTH_MODE=token``; RayClusters use ``authOptions.mode: token``, a ClusterIP head
  service and no ingress; no Service is a LoadBalancer or NodePort; no Secret manifests and
  no literal values for env vars that look like credentials.
- **Job configs vs clusters** (``ttm_ray.ops.cluster_capacity``): every custom resource and
  accelerator type a job config under ``job_config_dir`` asks for (merged with its bases;
  files named ``_*`` skipped) is offered by some node type of *each* cluster definition,
  one actor's or worker's bundle fits on one node, and ``scaling.num_workers`` fit in the
  node types' max counts.
- **EFA on training nodes** (``ttm_ray.ops.efa_policy``): a node type on p4d/p4de/p5 has
  one EFA interface per network card, a placement group, the EFA devices, memlock and
  libfabric env in the container (KubeRay: the ``vpc.amazonaws.com/efa`` resource).

Not checked (only a cloud or an API server knows): that instance/machine types, AMIs,
images, IAM names, storage classes exist; quotas; CRD CEL rules and admission webhooks;
what kustomize renders. Parse errors and missing files are Problems, not exceptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ttm_ray.config import ConfigError, load_merged
from ttm_ray.ops.cluster_capacity import (
    ClusterDef,
    check_request,
    job_requests,
    kuberay_cluster,
    launcher_cluster,
)
from ttm_ray.ops.cluster_policy import (
    check_cluster_selectors,
    container_checks,
    kustomization_checks,
    launcher_policy,
    raycluster_policy,
    read_image,
)
from ttm_ray.ops.cluster_schemas import ManifestSchemas, ray_launcher_schema, schema_problems
from ttm_ray.ops.efa_policy import launcher_efa, raycluster_efa
from ttm_ray.ops.problems import Problem, field_path

SCHEMA_DIR = Path("kuberay") / "schemas"


def validate_cluster(cluster_dir: str | Path, job_config_dir: str | Path) -> list[Problem]:
    cluster_dir, job_config_dir = Path(cluster_dir), Path(job_config_dir)
    problems: list[Problem] = []
    for d in (cluster_dir, job_config_dir):
        if not d.is_dir():
            problems.append(Problem(str(d), "<dir>", "directory not found"))
    if problems:
        return problems
    image = read_image(cluster_dir, problems)
    schemas = ManifestSchemas(cluster_dir / SCHEMA_DIR)
    problems.extend(schemas.problems)
    clusters: list[ClusterDef] = []
    manifests: list[tuple[str, dict]] = []
    for path, docs in load_yaml_files(cluster_dir, problems):
        for index, doc in enumerate(docs):
            if not isinstance(doc, dict):
                continue
            if "provider" in doc and "available_node_types" in doc:
                problems.extend(check_launcher(doc, str(path), image))
                clusters.append(launcher_cluster(doc, str(path)))
            elif "apiVersion" in doc and "kind" in doc:
                file = str(path) if index == 0 else f"{path}#{index + 1}"  # which document
                problems.extend(check_manifest(doc, path, file, schemas, image, clusters))
                manifests.append((file, doc))
    problems.extend(check_cluster_selectors(manifests))
    if not clusters:
        problems.append(Problem(str(cluster_dir), "<dir>",
                                "no cluster definition (launcher YAML or RayCluster) found"))
    problems.extend(check_job_configs(job_config_dir, clusters))
    return sorted(set(problems))


# ---------------------------------------------------------------- files


def load_yaml_files(root: Path, problems: list[Problem]) -> list[tuple[Path, list[Any]]]:
    out = []
    for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
        try:
            out.append((path, list(yaml.safe_load_all(path.read_text()))))
        except (OSError, yaml.YAMLError) as exc:
            message = " ".join(str(exc).split())
            problems.append(Problem(str(path), "<file>", f"not valid YAML: {message}"))
    return out


# ---------------------------------------------------------------- launcher YAMLs


def check_launcher(cfg: dict, file: str, image: str | None) -> list[Problem]:
    out = schema_problems(jsonschema.Draft7Validator(ray_launcher_schema()), cfg, file)
    types = cfg.get("available_node_types")
    types = types if isinstance(types, dict) else {}
    head = cfg.get("head_node_type")
    if head not in types:
        out.append(Problem(file, "head_node_type", f"must name one of available_node_types "
                                                   f"({', '.join(map(str, types))}), got {head!r}"))
    mins = {n: t.get("min_workers", 0) for n, t in types.items() if isinstance(t, dict)}
    most = cfg.get("max_workers", 2)
    if all(isinstance(v, int) for v in (*mins.values(), most)) and sum(mins.values()) > most:
        out.append(Problem(file, "max_workers", f"{most} is below the sum of min_workers "
                                                f"({sum(mins.values())})"))
    for name, node in types.items():
        low, high = (node.get(k) if isinstance(node, dict) else None
                     for k in ("min_workers", "max_workers"))
        if isinstance(low, int) and isinstance(high, int) and low > high:
            out.append(Problem(file, field_path(("available_node_types", name, "min_workers")),
                               f"{low} is above max_workers {high}"))
    out.extend(launcher_policy(cfg, file, image))
    out.extend(launcher_efa(cfg, file))
    return out


# ---------------------------------------------------------------- Kubernetes manifests


def check_manifest(doc: dict, path: Path, file: str, schemas: ManifestSchemas,
                   image: str | None, clusters: list[ClusterDef]) -> list[Problem]:
    kind, api = str(doc["kind"]), str(doc["apiVersion"])
    validator, source = schemas.validator(api, kind)
    out = ([Problem(file, "kind", source)] if validator is None
           else schema_problems(validator, doc, file))
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    name = (doc.get("metadata") or {}).get("name", "?")
    if kind == "RayCluster" and spec:
        clusters.append(kuberay_cluster(spec, f"{file} (RayCluster {name})", file,
                                        ("spec",), out))
        out.extend(raycluster_policy(spec, file, ("spec",)))
        out.extend(raycluster_efa(spec, file, ("spec",)))
    elif kind == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        clusters.append(kuberay_cluster(spec["rayClusterSpec"], f"{file} (RayJob {name})",
                                        file, ("spec", "rayClusterSpec"), out))
        out.extend(raycluster_policy(spec["rayClusterSpec"], file, ("spec", "rayClusterSpec")))
        out.extend(raycluster_efa(spec["rayClusterSpec"], file, ("spec", "rayClusterSpec")))
    elif kind == "Kustomization":
        out.extend(kustomization_checks(doc, path, file, image))
    elif kind == "Secret":
        out.append(Problem(file, "kind", "no Secret manifests in the repo: create secrets "
                                         "out of band or let the KubeRay operator generate them"))
    elif kind == "Service" and spec.get("type") in ("LoadBalancer", "NodePort"):
        out.append(Problem(file, "spec.type", f"{spec['type']} exposes the service outside the "
                                              "cluster; use ClusterIP and port-forward"))
    if kind != "Kustomization":
        out.extend(container_checks(doc, file))
    return out


# ---------------------------------------------------------------- job configs


def check_job_configs(job_config_dir: Path, clusters: list[ClusterDef]) -> list[Problem]:
    out: list[Problem] = []
    for path in sorted([*job_config_dir.rglob("*.yaml"), *job_config_dir.rglob("*.yml")]):
        if path.name.startswith("_"):
            continue  # fragments merged into other files, not jobs of their own
        try:
            data = load_merged(path)
        except ConfigError as exc:
            out.append(Problem(str(path), "<file>", " ".join(str(exc).split())))
            continue
        for request in job_requests(data, str(path)):
            for cluster in clusters:
                out.extend(check_request(request, cluster))
    return out
