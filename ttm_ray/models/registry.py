"""The model families and their named sizes, and ``build_model``: the one way to get a denoiser.

Training and inference know models only through :func:`build_model`; they never import a
family's module. A family registers three things (torchtitan's "model spec" idea):

* ``sizes``: its named configs (``dit-4b``, ``dit-tiny``, ...);
* ``config_from(ModelConfig) -> family config``: the named size plus overrides, with the
  run's choices applied (stage, channels from the conditioning layout, latent grid, K);
* ``build(family config) -> nn.Module`` implementing
  ``model(x_t [B, C, T, H, W], t [B], cond: ModelConditioning) -> [B, C, T, H, W]``.

Families are imported lazily so ``import ttm_ray.models`` stays cheap (the U-Net pulls in
diffusers).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttm_ray.models.config import ModelConfig
from ttm_ray.models.weights import load_weights


@dataclass(frozen=True)
class Family:
    """How to build one model family (see the module docstring)."""

    name: str
    sizes: Mapping[str, Any]
    config_from: Callable[[ModelConfig], Any]
    build: Callable[[Any], nn.Module]
    #: Default objective of the family (training and inference read it from the run config;
    #: this is what the job configs start from).
    objective: str


# family name -> (module, sizes attr, config_from attr, build attr, objective)
_FAMILY_MODULES: dict[str, tuple[str, str, str, str, str]] = {
    "dit": ("ttm_ray.models.dit", "DIT_SIZES", "dit_config_from", "build_dit", "flow_matching"),
    "unet": ("ttm_ray.models.unet", "UNET_SIZES", "unet_config_from", "build_unet", "ddim"),
}


def get_family(name: str) -> Family:
    """The registered family ``name``; ValueError listing the known ones otherwise."""
    if name not in _FAMILY_MODULES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(_FAMILY_MODULES)}")
    module_name, sizes, config_from, build, objective = _FAMILY_MODULES[name]
    module = importlib.import_module(module_name)
    return Family(name, getattr(module, sizes), getattr(module, config_from),
                  getattr(module, build), objective)


def resolve_family_config(cfg: ModelConfig) -> Any:
    """The family config (``DiTConfig`` / ``UNetConfig``) that ``cfg`` describes, validated.
    Raises ValueError naming the problem (unknown size, bad override, grid vs patch, ...)."""
    family = get_family(cfg.family)
    if cfg.size not in family.sizes:
        raise ValueError(f"size {cfg.size!r} is not a {cfg.family} size; "
                         f"known: {sorted(family.sizes)}")
    return family.config_from(cfg)


def token_grid(cfg: ModelConfig) -> tuple[int, int, int]:
    """The model's token grid ``(t, h, w)`` over its latent grid: the family's ``patch`` (the
    DiT's patchify) divides it; families without one (the U-Net) attend on the latent grid.
    Stage-2 ``token_ids`` live on this grid."""
    patch = getattr(resolve_family_config(cfg), "patch", (1, 1, 1))
    pt, ph, pw = (int(p) for p in patch)
    return cfg.num_frames // pt, cfg.height // ph, cfg.width // pw


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> nn.Module:
    """Build the denoiser of ``cfg`` (family, size, stage, overrides) and load ``init_from``.

    ``device="meta"`` builds without allocating (parameter counts of the paper sizes) and
    skips ``init_from``. Weights
    in ``init_from`` are a safetensors file or a directory holding ``model.safetensors`` (what
    training exports); missing keys are allowed only for the stage-2 additions, so a stage-2
    model can start from a stage-1 / text-to-video checkpoint, and a text-to-video
    checkpoint's narrow input layer loads into the widened one (``models.weights``;
    ``check_init_from`` checks a file without loading it).
    """
    family = get_family(cfg.family)
    family_cfg = resolve_family_config(cfg)
    if device is not None:
        with torch.device(device):
            model = family.build(family_cfg)
    else:
        model = family.build(family_cfg)
    # On the meta device there is nothing to load into (reports and plans count shapes).
    if cfg.init_from and str(device) != "meta":
        load_weights(model, cfg.init_from)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters by component (the model's ``component_of(name)``, else the top-level module
    name), plus ``total``. Works on the meta device."""
    component_of = getattr(model, "component_of", None)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        key = component_of(name) if component_of else name.split(".", 1)[0]
        counts[key] = counts.get(key, 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts
