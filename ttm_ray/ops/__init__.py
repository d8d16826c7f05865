"""Operations: static checks of the cluster definitions under ``cluster/``.

``validate_cluster(cluster_dir, job_config_dir)`` checks the Ray launcher YAMLs, the KubeRay
and Kubernetes manifests and the image references against their schemas, and the job
configs' resource requests against the node groups (see ``cluster_validate``). It needs no
cloud account, cluster or network; ``ttm-ray cluster validate`` is its command line.

At run time (imported from their modules, not re-exported here: they need Ray):
``capacity.ensure_capacity`` (every job, before placing its actors: wait for an autoscaling
cluster to add nodes, fail fast on a fixed one) and ``fake_cluster.FakeCluster`` (a real
autoscaling Ray cluster on one machine, from cluster/aws.yaml, for rehearsals and tests).
"""

from ttm_ray.ops.cluster_validate import validate_cluster
from ttm_ray.ops.problems import Problem

__all__ = ["Problem", "validate_cluster"]
