"""What both objectives share: the denoiser's call signature, seeded noise, the objective API.

Plain PyTorch (no Ray, DeepSpeed or MLflow), like everything in ``ttm_ray.diffusion``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from ttm_ray.conditioning.batch import ModelConditioning

if TYPE_CHECKING:
    from ttm_ray.diffusion.guidance import Guidance

#: ``model_fn(x_t [B, C, T, H, W], t [B], cond) -> [B, C, T, H, W]``: a model from
#: ``ttm_ray.models`` or anything with the same call (a guided wrapper, a test oracle).
ModelFn = Callable[[torch.Tensor, torch.Tensor, ModelConditioning], torch.Tensor]


def _generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # Draw on the generator's own device: a CPU generator then gives the same numbers whether
    # the latents live on CPU or GPU (reproducible across machines for a fixed seed).
    return generator.device if generator is not None else device


def randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn with ``generator`` (on its device), returned on ``device``."""
    device = torch.device(device)
    out = torch.randn(tuple(shape), generator=generator,
                      device=_generator_device(generator, device), dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str
         ) -> torch.Tensor:
    """Uniform [0, 1) float32 draws with ``generator`` (on its device), returned on ``device``."""
    device = torch.device(device)
    out = torch.rand(tuple(shape), generator=generator,
                     device=_generator_device(generator, device), dtype=torch.float32)
    return out.to(device)


def randint(high: int, shape: Sequence[int], generator: torch.Generator | None,
            device: torch.device | str) -> torch.Tensor:
    """Uniform int64 draws in ``[0, high)`` with ``generator`` (on its device), on ``device``."""
    device = torch.device(device)
    out = torch.randint(0, high, tuple(shape), generator=generator,
                        device=_generator_device(generator, device))
    return out.to(device)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, 1, ...]`` so a per-sample scalar broadcasts against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


class DiffusionObjective(Protocol):
    """What training and inference need from an objective; flow matching and DDIM both fit.

    Training calls ``loss`` (after :meth:`Guidance.drop` applied condition dropout), inference
    calls ``sample``; neither needs to know which model family or objective it holds.
    """

    def loss(self, model_fn: ModelFn, x_data: torch.Tensor, cond: ModelConditioning,
             generator: torch.Generator | None = None) -> torch.Tensor: ...

    def sample(self, model_fn: ModelFn, shape: Sequence[int], cond: ModelConditioning,
               generator: torch.Generator | None = None, guidance: Guidance | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor: ...
