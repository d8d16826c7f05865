"""``ttm-ray cluster``: check the cluster definitions before anything is launched.

    ttm-ray cluster validate
    ttm-ray cluster validate --cluster-dir cluster --configs jobs/configs

``validate`` checks the Ray launcher YAMLs against Ray's own schema, the KubeRay and
Kubernetes manifests against theirs, the one-image rule, that the dashboard and job API are
not exposed, and that every custom resource, accelerator type and training worker count the
job configs ask for exists and fits on each cluster definition (ttm_ray.ops). It prints one
line per problem, ``FILE: FIELD: MESSAGE``, and exits 0 when there are none, 1 otherwise.
No cloud account, cluster or network is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.common import repo_path


def _dir(path: str) -> str:
    """Paths are relative to the working dir; fall back to the repository (installed use)."""
    if Path(path).exists():
        return path
    in_repo = repo_path(path)
    return str(in_repo) if in_repo.exists() else path


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("validate", help="check cluster YAMLs and manifests against schemas "
                                        "and the job configs",
                       description="Exit 0 when clean, 1 with one FILE: FIELD: MESSAGE line "
                                   "per problem.")
    p.add_argument("--cluster-dir", default="cluster",
                   help="launcher YAMLs, kuberay/, image.env (default: cluster)")
    p.add_argument("--configs", default="jobs/configs",
                   help="job configs whose resource requests must fit (default: jobs/configs)")
    args = parser.parse_args(argv)

    from ttm_ray.ops import validate_cluster

    problems = validate_cluster(_dir(args.cluster_dir), _dir(args.configs))
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.cluster_dir}: ok (checked against {args.configs})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
