"""The schemas cluster definitions are checked against, and jsonschema errors as Problems.

- Ray launcher YAMLs: ``ray/autoscaler/ray-schema.json`` from the installed ``ray`` package,
  the schema ``ray up`` validates with (JSON Schema draft 7).
- Core Kubernetes kinds (CronJob, PersistentVolumeClaim, ServiceAccount, Namespace, ...) and
  every pod template: the *strict* JSON schemas (unknown fields rejected) generated from the
  Kubernetes OpenAPI that the ``kubernetes-validate`` package ships, newest version it has.
- KubeRay CRDs and the Kustomization: the trimmed schemas vendored under
  ``<cluster_dir>/kuberay/schemas/`` (each names its source in ``$comment``); their pod
  templates ``$ref`` the Kubernetes definitions above.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable

from ttm_ray.ops.problems import Problem, field_path, short

K8S_DEFINITIONS = "_definitions.json"


def package_dir(name: str) -> Path | None:
    """Where a package is installed, without importing it (importing ray costs seconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def ray_launcher_schema() -> dict:
    ray_dir = package_dir("ray")
    if ray_dir is None:
        raise FileNotFoundError("the ray package is not installed")
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


@lru_cache(maxsize=1)
def k8s_schema_dir() -> Path | None:
    """The newest ``v<version>-local-strict`` folder kubernetes-validate ships, if installed."""
    root = package_dir("kubernetes_validate")
    if root is None:
        return None
    found = []
    for d in (root / "kubernetes-json-schema").glob("v*-local-strict"):
        numbers = re.findall(r"\d+", d.name.split("-")[0])
        found.append((tuple(int(n) for n in numbers), d))
    return max(found)[1] if found else None


@lru_cache(maxsize=4)
def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def schema_file_name(api_version: str, kind: str) -> str:
    """kubernetes-validate's naming: ``batch/v1 CronJob`` -> ``cronjob-batch-v1.json``,
    ``v1 Namespace`` -> ``namespace-v1.json``, ``ray.io/v1 RayCluster`` ->
    ``raycluster-ray-v1.json`` (the group's first label only)."""
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    return f"{kind.lower()}-{api}.json"


@dataclass
class ManifestSchemas:
    """Finds and builds the validator for a manifest's apiVersion/kind."""

    vendored_dir: Path
    problems: list[Problem] = field(default_factory=list)  # why some schemas are missing

    def __post_init__(self) -> None:
        self.k8s_dir = k8s_schema_dir()
        resources = []
        if self.k8s_dir is None:
            self.problems.append(Problem(
                "kubernetes-validate", "<package>",
                "not installed: Kubernetes manifests and pod templates cannot be checked "
                "(pip install kubernetes-validate)"))
        else:
            resources.append(Resource.from_contents(_load_json(self.k8s_dir / K8S_DEFINITIONS)))
        self.vendored: dict[str, dict] = {}
        for path in sorted(self.vendored_dir.glob("*.json")):
            try:
                schema = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                self.problems.append(Problem(str(path), "<file>", f"unreadable schema: {exc}"))
                continue
            self.vendored[path.name] = schema
            resources.append(Resource.from_contents(schema))
        self.registry = Registry().with_resources((r.id(), r) for r in resources if r.id())

    def validator(self, api_version: str, kind: str) -> tuple[Any, str]:
        """(validator or None, where the schema comes from / why there is none)."""
        name = schema_file_name(api_version, kind)
        if name in self.vendored:
            schema, source = self.vendored[name], f"{self.vendored_dir.name}/{name}"
        elif self.k8s_dir is not None and (self.k8s_dir / name).is_file():
            schema, source = _load_json(self.k8s_dir / name), f"Kubernetes {self.k8s_dir.name}"
        else:
            where = [str(self.vendored_dir)]
            if self.k8s_dir is not None:
                where.append(f"kubernetes-validate {self.k8s_dir.name}")
            return None, f"no schema for {kind} ({api_version}) in {' or '.join(where)}"
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        return cls(schema, registry=self.registry), source


def schema_problems(validator: Any, doc: Any, file: str, prefix: tuple = ()) -> list[Problem]:
    """Every schema violation of ``doc``; an unknown key becomes one Problem naming the key."""
    out: list[Problem] = []
    try:
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
        for error in errors:
            out.extend(_error_problems(error, file, prefix))
    except Unresolvable as exc:  # a vendored schema points at a definition that is not there
        out.append(Problem(file, field_path(prefix), f"schema reference not found: {exc}"))
    return out


def _error_problems(error: jsonschema.ValidationError, file: str, prefix: tuple) -> list[Problem]:
    path = (*prefix, *error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        unknown = [k for k in error.instance
                   if k not in known and not any(re.search(p, str(k)) for p in patterns)]
        if unknown:
            return [Problem(file, field_path(path, key), "unknown key (not in the schema)")
                    for key in unknown]
    if error.context:  # anyOf/oneOf: the closest branch says more than "not valid under any"
        best = jsonschema.exceptions.best_match(error.context)
        if best is not None:
            return _error_problems(best, file, prefix)
    return [Problem(file, field_path(path), short(error.message))]
