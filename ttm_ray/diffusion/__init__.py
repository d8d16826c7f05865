"""Diffusion objectives and samplers shared by both model families; plain PyTorch, no Ray.

* ``flow_matching``: DiT path (MovieGen): x_t = t x1 + (1 - (1 - sigma_min) t) x0, t = 0 is
  noise, velocity target, logit-normal t, Euler on the linear-quadratic grid.
* ``ddim``: U-Net path (AnimateDiff V3): diffusers DDIM, v-prediction, zero terminal SNR,
  trailing spacing; integer t, t = 999 is noise.
* ``guidance``: InstructPix2Pix two-condition CFG: training dropout and the 3B-batched guided
  prediction, used by both samplers.

diffusers is imported only when a DDIM scheduler is built, so this import stays cheap.
"""

from ttm_ray.diffusion.common import DiffusionObjective, ModelFn
from ttm_ray.diffusion.ddim import (
    DDIM,
    DDIMConfig,
    build_scheduler,
    ddim_loss,
    ddim_sample,
    ddim_training_target,
    sample_timesteps,
)
from ttm_ray.diffusion.flow_matching import (
    FlowMatching,
    FlowMatchingConfig,
    euler_sample,
    flow_matching_loss,
    interpolate,
    linear_quadratic_schedule,
    sample_t,
    training_target,
)
from ttm_ray.diffusion.guidance import (
    Guidance,
    GuidanceConfig,
    apply_condition_dropout,
    combine,
    drop_conditions,
    guidance_conditions,
    guided_prediction,
    sample_dropout,
)
from ttm_ray.diffusion.objective import DiffusionConfig

__all__ = [
    "DDIM",
    "DDIMConfig",
    "DiffusionConfig",
    "DiffusionObjective",
    "FlowMatching",
    "FlowMatchingConfig",
    "Guidance",
    "GuidanceConfig",
    "ModelFn",
    "apply_condition_dropout",
    "build_scheduler",
    "combine",
    "ddim_loss",
    "ddim_sample",
    "ddim_training_target",
    "drop_conditions",
    "euler_sample",
    "flow_matching_loss",
    "guidance_conditions",
    "guided_prediction",
    "interpolate",
    "linear_quadratic_schedule",
    "sample_dropout",
    "sample_t",
    "sample_timesteps",
    "training_target",
]
