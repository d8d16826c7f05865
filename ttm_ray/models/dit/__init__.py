"""The MovieGen-style DiT family: ``DiTConfig`` + named sizes, blocks, ``TTMDiT``."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ttm_ray.config import from_dict, to_dict
from ttm_ray.models.dit.config import DIT_FIELDS, DIT_SIZES, DiTConfig
from ttm_ray.models.dit.model import TTMDiT, build_dit

if TYPE_CHECKING:
    from ttm_ray.models.config import ModelConfig


def dit_config_from(cfg: ModelConfig) -> DiTConfig:
    """The :class:`DiTConfig` a :class:`ModelConfig` asks for: the named size, its overrides,
    then what the run decides (channels from the stage's conditioning layout, positional
    tables grown if the latent grid needs more, K masked blocks in stage 2 and none in
    stage 1, activation checkpointing).
    Raises ValueError with the offending field."""
    from ttm_ray.conditioning.layout import visual_channels

    if cfg.size not in DIT_SIZES:
        raise ValueError(f"size {cfg.size!r} is not a dit size; known: {sorted(DIT_SIZES)}")
    unknown = sorted(set(cfg.overrides) - DIT_FIELDS)
    if unknown:
        raise ValueError(f"overrides: unknown DiTConfig field(s) {unknown}; "
                         f"valid: {sorted(DIT_FIELDS)}")
    data = {**to_dict(DIT_SIZES[cfg.size]), **cfg.overrides}
    if "masked_blocks" not in cfg.overrides and isinstance(data["depth"], int):
        # A shallower override ({depth: 2}) keeps the size's K only where it fits; an explicit
        # K (masked_attention_blocks) is still checked against the depth below.
        data["masked_blocks"] = min(data["masked_blocks"], data["depth"])
    # Through from_dict so override values get the same type/bound checks as YAML keys.
    base = from_dict(DiTConfig, data, source=f"model.overrides ({cfg.size})")
    pt, ph, pw = base.patch
    dims = {"num_frames": (cfg.num_frames, pt), "height": (cfg.height, ph),
            "width": (cfg.width, pw)}
    for name, (size, p) in dims.items():
        if size % p:
            raise ValueError(f"{name} {size} (latent) is not divisible by patch {base.patch}")
    masked = base.masked_blocks if cfg.masked_attention_blocks is None \
        else cfg.masked_attention_blocks
    if masked > base.depth:
        raise ValueError(f"masked_attention_blocks {masked} exceeds depth {base.depth} "
                         f"of {cfg.size}")
    out = dataclasses.replace(
        base,
        in_channels=cfg.latent_channels,
        visual_channels=visual_channels(cfg.stage, cfg.latent_channels),
        # The size's tables (what its checkpoints hold), grown only when this run's grid needs
        # more: a smaller grid slices them, so one checkpoint serves every grid up to its own.
        max_t_tokens=max(base.max_t_tokens, cfg.num_frames // pt),
        max_h_tokens=max(base.max_h_tokens, cfg.height // ph),
        max_w_tokens=max(base.max_w_tokens, cfg.width // pw),
        masked_blocks=masked if cfg.stage == 2 else 0,
        activation_checkpointing=cfg.activation_checkpointing or base.activation_checkpointing,
    )
    out.validate()
    return out


__all__ = ["DIT_FIELDS", "DIT_SIZES", "DiTConfig", "TTMDiT", "build_dit", "dit_config_from"]
