"""One config section that picks the objective: what training and inference hold.

The DiT uses flow matching, the U-Net DDIM; both share :class:`GuidanceConfig`. Training and
inference build an objective from this config and call ``loss`` / ``sample`` without
branching on the model family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ttm_ray.config.schema import constrained
from ttm_ray.diffusion.common import DiffusionObjective
from ttm_ray.diffusion.ddim import DDIMConfig
from ttm_ray.diffusion.flow_matching import FlowMatchingConfig
from ttm_ray.diffusion.guidance import GuidanceConfig


@dataclass
class DiffusionConfig:
    """The ``diffusion:`` section: which objective, its settings, and the CFG settings.

    Both objectives' sections are always present (and validated), so switching the model
    family only flips ``objective``; the unused section is ignored.
    """

    objective: Literal["flow_matching", "ddim"] = constrained(
        "flow_matching", help="flow_matching (DiT, MovieGen) or ddim (U-Net, AnimateDiff V3)"
    )
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    ddim: DDIMConfig = field(default_factory=DDIMConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)

    def build(self) -> DiffusionObjective:
        """The selected objective (guidance is built separately: it needs the null prompt)."""
        if self.objective == "ddim":
            return self.ddim.build()
        return self.flow_matching.build()
