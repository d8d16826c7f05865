"""Operations: static checks of the cluster definitions under ``cluster/``.

``validate_cluster(cluster_dir, job_config_dir)`` checks the Ray launcher YAMLs, the KubeRay
and Kubernetes manifests and the image references against their schemas, and the job
configs' resource requests against the node groups (see ``cluster_validate``). It needs no
cloud account, cluster or network; ``ttm-ray cluster validate`` is its command line.
"""

from ttm_ray.ops.cluster_validate import validate_cluster
from ttm_ray.ops.problems import Problem

__all__ = ["Problem", "validate_cluster"]
