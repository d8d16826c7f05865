"""One config section that picks the objective: what training and inference hold.

The DiT uses flow matching, the U-Net DDIM; both share :class:`GuidanceConfig`. Training and
inference build an objective from this config and call ``loss`` / ``sample`` without
branching on the model family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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

    def with_sampling(self, steps: int | None = None, scale_visual: float | None = None,
                      scale_text: float | None = None) -> DiffusionConfig:
        """A copy with the sampler's step count and the guidance scales changed (None keeps
        the current value); training dropout is untouched. Previews and inference use it."""
        out = self
        if steps is not None:
            out = replace(out, flow_matching=replace(out.flow_matching, num_steps=steps),
                          ddim=replace(out.ddim, num_inference_steps=steps))
        changes = {k: v for k, v in (("scale_visual", scale_visual),
                                     ("scale_text", scale_text)) if v is not None}
        if changes:
            out = replace(out, guidance=replace(out.guidance, **changes))
        return out

