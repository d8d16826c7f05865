"""Flow matching with a first-order Euler sampler (the DiT path, MovieGen design).

Convention (MovieGen's; every function here uses it):

* ``x0`` is Gaussian noise, ``x1`` the data (a clean latent), ``t`` in [0, 1], **t = 0 is pure
  noise** and t = 1 is data.
* ``x_t = t * x1 + (1 - (1 - sigma_min) * t) * x0``  (``sigma_min = 1e-5``: at t = 1 a trace
  ``sigma_min * x0`` of noise is left, which keeps the path invertible).
* Velocity target ``v = d x_t / d t = x1 - (1 - sigma_min) * x0``; the model predicts ``v``
  and the loss is the MSE between the two.
* Training ``t ~ sigmoid(N(mean, std))`` (logit-normal, mean 0, std 1): mid-way noise levels,
  where the velocity is hardest to predict, are sampled most.
* The model receives ``t`` as float32 ``[B]`` in [0, 1] in this same direction (0 = noise);
  a timestep embedding that wants a larger range scales it itself.
* Sampling integrates ``dx/dt = v(x, t)`` from t = 0 (noise) to t = 1 with Euler steps on a
  t-grid ``0 = t_0 < t_1 < ... < t_N = 1``; the "noise level" (diffusers' ``sigma``, the
  weight of the noise for sigma_min = 0) is ``sigma = 1 - t``.

Plain PyTorch; no Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.config.schema import constrained
from ttm_ray.diffusion.common import ModelFn, per_sample, randn
from ttm_ray.diffusion.guidance import Guidance


@dataclass
class FlowMatchingConfig:
    """Flow-matching objective and Euler sampler settings (paper/MovieGen defaults)."""

    sigma_min: float = constrained(
        1e-5, ge=0, lt=1, help="noise weight left at t=1: x_t = t*x1 + (1-(1-sigma_min)*t)*x0"
    )
    logit_normal_mean: float = constrained(0.0, help="training t ~ sigmoid(N(mean, std))")
    logit_normal_std: float = constrained(1.0, gt=0, help="training t ~ sigmoid(N(mean, std))")
    num_steps: int = constrained(50, gt=0, help="Euler steps at sampling")
    schedule: Literal["linear_quadratic", "linear"] = constrained(
        "linear_quadratic", help="sampling t-grid: MovieGen's linear-quadratic or uniform"
    )
    lq_linear_steps_fraction: float = constrained(
        0.5, gt=0, lt=1, help="linear-quadratic: share of the steps in the linear (noisy) part"
    )
    lq_threshold_noise: float = constrained(
        0.025, gt=0, lt=1, help="linear-quadratic: the t (1 - noise level) the linear part ends at"
    )

    def validate(self) -> None:
        if self.schedule == "linear_quadratic":
            linear = self.linear_steps()
            if not 0 < linear < self.num_steps:
                raise ValueError(
                    f"linear-quadratic schedule with num_steps={self.num_steps} and "
                    f"lq_linear_steps_fraction={self.lq_linear_steps_fraction:g} has {linear} "
                    "linear steps; it needs at least one linear and one quadratic step")
            # Too few linear steps for the threshold make the quadratic part non-monotone:
            # building the grid checks that (50 floats, cheap).
            self.timesteps()

    def linear_steps(self, num_steps: int | None = None) -> int:
        n = self.num_steps if num_steps is None else num_steps
        # floor, as Mochi's num_steps // 2 for 0.5; the epsilon absorbs 0.29 * 100 = 28.99...
        return math.floor(n * self.lq_linear_steps_fraction + 1e-9)

    def timesteps(self, num_steps: int | None = None) -> torch.Tensor:
        """The sampling t-grid ``[num_steps + 1]`` (float64, 0 -> 1)."""
        n = self.num_steps if num_steps is None else num_steps
        if self.schedule == "linear":
            return torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
        return linear_quadratic_schedule(n, self.lq_threshold_noise, self.linear_steps(n))

    def build(self) -> FlowMatching:
        self.validate()
        return FlowMatching(self)


def linear_quadratic_schedule(num_steps: int, threshold_noise: float = 0.025,
                              linear_steps: int | None = None) -> torch.Tensor:
    """MovieGen's linear-quadratic sampling grid, as t values ``[num_steps + 1]`` from 0 to 1.

    Same numbers as diffusers' Mochi ``linear_quadratic_schedule`` (pipeline_mochi.py), in our
    direction: Mochi returns ``num_steps`` noise levels ``sigma`` from 1 down (its scheduler
    appends the final 0); here ``t = 1 - sigma`` with the final ``t = 1`` included, so
    ``1 - linear_quadratic_schedule(n)[:-1]`` equals Mochi's list. (Mochi's scheduler config
    sets ``invert_sigmas=True``, which turns that list back into these t values: its Euler loop
    is this module's, see tests/diffusion/test_flow_matching.py.)

    The first ``linear_steps`` steps (default ``num_steps // 2``) move t linearly from 0 to
    exactly ``threshold_noise`` (the noisiest 2.5% of the path gets half the steps: that is
    where the coarse layout, i.e. the motion, is decided); the remaining steps follow a
    quadratic from ``threshold_noise`` to 1 whose slope at the junction equals the linear
    part's step, so step sizes grow smoothly (by a constant amount per step; the first
    quadratic step is that slope plus half the growth).
    """
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 0 < linear_steps < num_steps:
        raise ValueError(f"linear_steps={linear_steps} must be in (0, num_steps={num_steps})")
    if not 0 < threshold_noise < 1:
        raise ValueError(f"threshold_noise={threshold_noise} must be in (0, 1)")
    # Mochi's formula verbatim (in its "1 - sigma" space, which is our t).
    linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    threshold_noise_step_diff = linear_steps - threshold_noise * num_steps
    quadratic_steps = num_steps - linear_steps
    quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
    linear_coef = (threshold_noise / linear_steps
                   - 2 * threshold_noise_step_diff / (quadratic_steps**2))
    const = quadratic_coef * (linear_steps**2)
    quadratic = [quadratic_coef * (i**2) + linear_coef * i + const
                 for i in range(linear_steps, num_steps)]
    t = torch.tensor([*linear, *quadratic, 1.0], dtype=torch.float64)
    if not bool((t[1:] > t[:-1]).all()):
        # The quadratic's slope falls towards the end when linear_steps is far below
        # threshold_noise * num_steps; a non-monotone grid would integrate backwards.
        raise ValueError(f"linear-quadratic schedule ({num_steps}, {threshold_noise}, "
                         f"{linear_steps}) is not increasing; use more linear steps")
    return t


def interpolate(x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                sigma_min: float = 1e-5) -> torch.Tensor:
    """``x_t = t * x1 + (1 - (1 - sigma_min) * t) * noise`` with ``t`` ``[B]``."""
    tt = per_sample(t, x1).to(torch.float32)
    return tt * x1.float() + (1 - (1 - sigma_min) * tt) * noise.float()


def training_target(x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    sigma_min: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, v)`` for data ``x1``, noise ``x0 = noise`` and ``t`` ``[B]`` (float32 both)."""
    x_t = interpolate(x1, noise, t, sigma_min)
    v = x1.float() - (1 - sigma_min) * noise.float()
    return x_t, v


def sample_t(batch: int, generator: torch.Generator | None = None, *, mean: float = 0.0,
             std: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Training times ``t ~ sigmoid(N(mean, std))``, float32 ``[batch]`` in (0, 1)."""
    return torch.sigmoid(mean + std * randn((batch,), generator, device))


def flow_matching_loss(model_fn: ModelFn, x1: torch.Tensor, cond: ModelConditioning,
                       generator: torch.Generator | None = None,
                       cfg: FlowMatchingConfig | None = None) -> torch.Tensor:
    """Scalar MSE between ``model_fn(x_t, t, cond)`` and the velocity target, float32.

    ``x1`` is the clean latent ``[B, C, T, H, W]``; noise and ``t`` are drawn with
    ``generator``. The model gets ``x_t`` in ``x1``'s dtype and float32 ``t``.
    """
    cfg = cfg or FlowMatchingConfig()
    t = sample_t(x1.shape[0], generator, mean=cfg.logit_normal_mean, std=cfg.logit_normal_std,
                 device=x1.device)
    noise = randn(x1.shape, generator, x1.device)
    x_t, v = training_target(x1, noise, t, cfg.sigma_min)
    pred = model_fn(x_t.to(x1.dtype), t, cond)
    return F.mse_loss(pred.float(), v)


@torch.no_grad()
def euler_sample(model_fn: ModelFn, shape: Sequence[int], cond: ModelConditioning,
                 cfg: FlowMatchingConfig | None = None, *,
                 timesteps: torch.Tensor | Sequence[float] | None = None,
                 num_steps: int | None = None, generator: torch.Generator | None = None,
                 guidance: Guidance | None = None, noise: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integrate from noise (t = 0) to data (t = 1) with first-order Euler steps; returns x1.

    The grid is ``timesteps`` (t values, increasing, 0 -> 1) if given, else
    ``cfg.timesteps(num_steps)``. ``noise`` (the starting ``x0``) defaults to a draw from
    ``generator``. ``guidance`` applies two-condition CFG to the predicted velocity. The state
    is kept in float32 (50 small updates would lose bits in bf16); the model gets ``x`` in
    ``dtype`` and float32 ``t`` ``[B]``.
    """
    cfg = cfg or FlowMatchingConfig()
    grid = (cfg.timesteps(num_steps) if timesteps is None
            else torch.as_tensor(timesteps, dtype=torch.float64))
    if grid.dim() != 1 or len(grid) < 2 or not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("timesteps must be an increasing 1-D grid of at least 2 t values")
    device = cond.visual.device
    x = randn(shape, generator, device) if noise is None else noise.to(device, torch.float32)
    fn = guidance.wrap(model_fn) if guidance is not None else model_fn
    b = x.shape[0]
    for t_now, t_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        t = torch.full((b,), t_now, dtype=torch.float32, device=device)
        v = fn(x.to(dtype), t, cond).float()
        x = x + (t_next - t_now) * v
    return x


class FlowMatching:
    """The flow-matching objective bound to its config (see :class:`DiffusionObjective`)."""

    def __init__(self, cfg: FlowMatchingConfig) -> None:
        self.cfg = cfg

    def training_target(self, x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        return training_target(x1, noise, t, self.cfg.sigma_min)

    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        return sample_t(batch, generator, mean=self.cfg.logit_normal_mean,
                        std=self.cfg.logit_normal_std, device=device)

    def loss(self, model_fn: ModelFn, x_data: torch.Tensor, cond: ModelConditioning,
             generator: torch.Generator | None = None) -> torch.Tensor:
        return flow_matching_loss(model_fn, x_data, cond, generator, self.cfg)

    def sample(self, model_fn: ModelFn, shape: Sequence[int], cond: ModelConditioning,
               generator: torch.Generator | None = None, guidance: Guidance | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        return euler_sample(model_fn, shape, cond, self.cfg, generator=generator,
                            guidance=guidance, noise=noise)
