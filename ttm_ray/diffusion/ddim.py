"""DDIM with v-prediction and zero terminal SNR (the U-Net path, AnimateDiff V3 design).

Convention (diffusers'; note it runs the other way from flow matching's t):

* Integer timesteps ``t`` in ``[0, num_train_timesteps)``; **t = 999 is the noisiest**, t = 0
  almost clean. ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]``.
* v-prediction: the model predicts ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0``.
* Zero terminal SNR (``rescale_betas_zero_snr``): the betas are rescaled so that
  ``alphas_cumprod[-1] == 0``: at t = 999 the input is pure noise, exactly what sampling starts
  from, so the model cannot lean on leftover signal it never sees at inference. The paper calls
  this critically important for image-to-trajectory. It needs v- (or x0-) prediction: with
  epsilon prediction x0 = (x_t - sqrt(1-a) eps) / sqrt(a) divides by zero at t = 999.
* Trailing spacing: the 50 inference timesteps are 999, 979, ..., 19, so sampling does start at
  the terminal (pure-noise) timestep.
* The model receives ``t`` as int64 ``[B]`` (diffusers U-Nets take integer timesteps).

The schedule arithmetic is diffusers' ``DDIMScheduler`` (``clip_sample=False``: latents are
not bounded to [-1, 1]); this module adds the training loss and the sampling loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.config.schema import constrained
from ttm_ray.diffusion.common import ModelFn, randint, randn
from ttm_ray.diffusion.guidance import Guidance

if TYPE_CHECKING:
    from diffusers import DDIMScheduler


@dataclass
class DDIMConfig:
    """DDIM schedule, objective and sampler settings (AnimateDiff V3 + zero terminal SNR)."""

    num_train_timesteps: int = constrained(1000, gt=0, help="training timesteps")
    beta_schedule: Literal["linear", "scaled_linear"] = constrained(
        "linear", help="beta schedule (AnimateDiff: linear from beta_start to beta_end)"
    )
    beta_start: float = constrained(0.00085, gt=0, lt=1)
    beta_end: float = constrained(0.012, gt=0, lt=1)
    prediction_type: Literal["v_prediction", "epsilon", "sample"] = constrained(
        "v_prediction", help="what the model predicts; zero terminal SNR needs v or sample"
    )
    rescale_betas_zero_snr: bool = constrained(
        True, help="rescale betas so alphas_cumprod[-1] == 0 (t=999 is pure noise)"
    )
    timestep_spacing: Literal["trailing", "leading", "linspace"] = constrained(
        "trailing", help="inference timesteps; trailing starts at the terminal timestep"
    )
    num_inference_steps: int = constrained(50, gt=0, help="DDIM steps at sampling")
    set_alpha_to_one: bool = constrained(
        True, help="last step lands on alpha=1 (the clean sample) rather than alphas_cumprod[0]"
    )
    eta: float = constrained(0.0, ge=0, le=1, help="DDIM stochasticity (0: deterministic)")

    def validate(self) -> None:
        if self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end={self.beta_end} must exceed beta_start={self.beta_start}")
        if self.num_inference_steps > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} exceeds "
                             f"num_train_timesteps={self.num_train_timesteps}")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ValueError("rescale_betas_zero_snr with prediction_type='epsilon' cannot "
                             "recover x0 at the terminal timestep (alpha=0); use v_prediction")

    def build(self) -> DDIM:
        self.validate()
        return DDIM(self)


def build_scheduler(cfg: DDIMConfig | None = None) -> DDIMScheduler:
    """A fresh diffusers ``DDIMScheduler`` for ``cfg`` (schedulers are stateful: one per loop)."""
    # Imported here: importing diffusers costs seconds, and ``ttm_ray.diffusion`` should stay
    # cheap for code that only needs flow matching or guidance.
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    cfg = cfg or DDIMConfig()
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing=cfg.timestep_spacing,
        clip_sample=False,
        set_alpha_to_one=cfg.set_alpha_to_one,
        # steps_offset only shifts "leading" spacing; 0 keeps trailing at 999, 979, ..., 19.
        steps_offset=0,
    )


def sample_timesteps(batch: int, num_train_timesteps: int,
                     generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Training timesteps, uniform over ``[0, num_train_timesteps)``, int64 ``[batch]``."""
    return randint(num_train_timesteps, (batch,), generator, device)


def ddim_training_target(scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor,
                         t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)`` in float32 for the scheduler's ``prediction_type``."""
    x0, noise = x0.float(), noise.float()
    x_t = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif kind == "epsilon":
        target = noise
    else:
        target = x0
    return x_t, target


def ddim_loss(model_fn: ModelFn, x0: torch.Tensor, cond: ModelConditioning,
              generator: torch.Generator | None = None, cfg: DDIMConfig | None = None,
              scheduler: DDIMScheduler | None = None) -> torch.Tensor:
    """Scalar float32 MSE between ``model_fn(x_t, t, cond)`` and the v target (t uniform).

    ``x0`` is the clean latent ``[B, C, T, H, W]``; the model gets ``x_t`` in ``x0``'s dtype and
    int64 ``t``. Pass ``scheduler`` to reuse one across steps (``add_noise`` only reads it).
    """
    cfg = cfg or DDIMConfig()
    scheduler = scheduler or build_scheduler(cfg)
    t = sample_timesteps(x0.shape[0], cfg.num_train_timesteps, generator, x0.device)
    noise = randn(x0.shape, generator, x0.device)
    x_t, target = ddim_training_target(scheduler, x0, noise, t)
    pred = model_fn(x_t.to(x0.dtype), t, cond)
    return F.mse_loss(pred.float(), target)


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, shape: Sequence[int], cond: ModelConditioning,
                cfg: DDIMConfig | None = None, *, generator: torch.Generator | None = None,
                guidance: Guidance | None = None, noise: torch.Tensor | None = None,
                num_inference_steps: int | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DDIM from pure noise at t = 999 down to the clean latent; returns x0 (float32).

    ``noise`` (the starting ``x_T``) defaults to a draw from ``generator``; ``guidance`` applies
    two-condition CFG to the model output (v). The state is float32; the model gets ``x`` in
    ``dtype`` and int64 ``t`` ``[B]``.
    """
    cfg = cfg or DDIMConfig()
    cfg.validate()
    scheduler = build_scheduler(cfg)
    device = cond.visual.device
    scheduler.set_timesteps(num_inference_steps or cfg.num_inference_steps, device=device)
    x = randn(shape, generator, device) if noise is None else noise.to(device, torch.float32)
    # init_noise_sigma is 1 for DDIM; kept so a scheduler swap stays correct.
    x = x * scheduler.init_noise_sigma
    fn = guidance.wrap(model_fn) if guidance is not None else model_fn
    b = x.shape[0]
    for t in scheduler.timesteps:
        out = fn(x.to(dtype), t.expand(b), cond).float()
        # Our own seeded noise for eta > 0, so a CPU generator reproduces on any device.
        var_noise = randn(x.shape, generator, device) if cfg.eta > 0 else None
        x = scheduler.step(out, t, x, eta=cfg.eta, variance_noise=var_noise).prev_sample
    return x


class DDIM:
    """The DDIM objective bound to its config (see :class:`DiffusionObjective`)."""

    def __init__(self, cfg: DDIMConfig) -> None:
        self.cfg = cfg
        # Training only reads alphas_cumprod from it; sampling builds its own per call.
        self.scheduler = build_scheduler(cfg)

    def loss(self, model_fn: ModelFn, x_data: torch.Tensor, cond: ModelConditioning,
             generator: torch.Generator | None = None) -> torch.Tensor:
        return ddim_loss(model_fn, x_data, cond, generator, self.cfg, self.scheduler)

    def sample(self, model_fn: ModelFn, shape: Sequence[int], cond: ModelConditioning,
               generator: torch.Generator | None = None, guidance: Guidance | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        return ddim_sample(model_fn, shape, cond, self.cfg, generator=generator,
                           guidance=guidance, noise=noise)
