"""Where a Ray stage runs: batch size, CPUs/GPUs, actor pool bounds, node-group pinning.

Shared by data prep's stages (``resources.<stage>``) and batch generation
(``resources.annotate`` / ``resources.generate``), so placement reads the same in every job
and ``ttm-ray cluster validate`` finds custom resources in one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ttm_ray.config.schema import constrained


@dataclass
class StageResources:
    """Batch size, per-worker CPUs/GPUs and actor pool bounds of one pipeline stage.

    ``custom_resources`` pins a stage to a node group (e.g. ``{"gpu_infer": 0.01}``) named in
    the cluster YAMLs; ``accelerator_type`` asks for a GPU model (e.g. ``A100``).
    """

    batch_size: int = constrained(8, gt=0, help="rows per batch handed to the stage")
    num_cpus: float = constrained(1.0, gt=0)
    num_gpus: float = constrained(0.0, ge=0, help="GPUs per task/actor (model stages)")
    min_actors: int = constrained(1, ge=1, help="actor pool lower bound (model stages)")
    max_actors: int = constrained(1, ge=1, help="actor pool upper bound (model stages)")
    accelerator_type: str | None = constrained(None, help="Ray accelerator type, e.g. 'A100'")
    custom_resources: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")


def ray_remote_args(res: StageResources) -> dict:
    """``num_cpus`` / ``num_gpus`` / ``resources`` / ``accelerator_type`` for Ray Data's
    ``map_batches`` (or ``ray.remote``) from one stage's placement."""
    args: dict = {"num_cpus": res.num_cpus}
    if res.num_gpus:
        args["num_gpus"] = res.num_gpus
    if res.custom_resources:
        args["resources"] = dict(res.custom_resources)
    if res.accelerator_type:
        args["accelerator_type"] = res.accelerator_type
    return args
