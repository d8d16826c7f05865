"""Where a stage runs on Ray: the one place placement is configured (``resources.<stage>``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ttm_ray.config import constrained


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
