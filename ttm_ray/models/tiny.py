"""Tiny text-to-video checkpoints for tests and the rehearsal (no model hub here).

A text-to-video model is the family's own model with no condition channels (its input layer
takes x_t's channels only, the shape a text-to-video ``patchify.weight`` has) and no masked
layers; ``init_from`` loads it into the stage-1/2 model, whose extra input channels start at
zero (:mod:`ttm_ray.models.widening`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from ttm_ray.models.config import ModelConfig


def build_tiny_t2v_dit(folder: str | Path, size: str = "dit-tiny", *, latent_channels: int,
                       num_frames: int = 16, height: int = 32, width: int = 32,
                       seed: int = 0) -> Path:
    """``folder/model.safetensors``: a randomly initialised text-to-video DiT of ``size``
    (kept when it exists). Returns the file."""
    from ttm_ray.models import resolve_family_config
    from ttm_ray.models.dit import build_dit

    path = Path(folder) / "model.safetensors"
    if path.is_file():
        return path
    cfg = ModelConfig(family="dit", size=size, stage=1, latent_channels=latent_channels,
                      num_frames=num_frames, height=height, width=width)
    resolved = dataclasses.replace(resolve_family_config(cfg), visual_channels=0)
    torch.manual_seed(seed)
    model = build_dit(resolved)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


__all__ = ["build_tiny_t2v_dit"]
