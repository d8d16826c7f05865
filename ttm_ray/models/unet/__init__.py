"""The AnimateDiff-style U-Net family: ``UNetConfig`` + named sizes, ``TTMUNet`` on diffusers'
``UNetMotionModel``, masked-attention processors."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ttm_ray.config import from_dict, to_dict
from ttm_ray.models.unet.config import UNET_FIELDS, UNET_SIZES, UNetConfig
from ttm_ray.models.unet.model import MASKED_PREFIXES, TTMUNet, build_unet

if TYPE_CHECKING:
    from ttm_ray.models.config import ModelConfig


def unet_config_from(cfg: ModelConfig) -> UNetConfig:
    """The :class:`UNetConfig` a :class:`ModelConfig` asks for: the named size, its overrides,
    then what the run decides (channels from the stage's conditioning layout, the frame count,
    K masked blocks in stage 2 and none in stage 1). Raises ValueError with the offending
    field."""
    from ttm_ray.conditioning.layout import visual_channels

    if cfg.size not in UNET_SIZES:
        raise ValueError(f"size {cfg.size!r} is not a unet size; known: {sorted(UNET_SIZES)}")
    unknown = sorted(set(cfg.overrides) - UNET_FIELDS)
    if unknown:
        raise ValueError(f"overrides: unknown UNetConfig field(s) {unknown}; "
                         f"valid: {sorted(UNET_FIELDS)}")
    # Through from_dict so override values get the same type/bound checks as YAML keys.
    base = from_dict(UNetConfig, {**to_dict(UNET_SIZES[cfg.size]), **cfg.overrides},
                     source=f"model.overrides ({cfg.size})")
    factor = base.downsample_factor
    if cfg.height % factor or cfg.width % factor:
        raise ValueError(f"latent height/width {cfg.height}x{cfg.width} must be divisible by "
                         f"{factor} (the {cfg.size} U-Net halves them {base.levels - 1} times)")
    masked = base.masked_blocks if cfg.masked_attention_blocks is None \
        else cfg.masked_attention_blocks
    available = len(base.encoder_transformer_levels)
    if masked > available:
        raise ValueError(f"masked_attention_blocks {masked} exceeds the {available} encoder "
                         f"transformer blocks of {cfg.size}")
    out = dataclasses.replace(
        base,
        in_channels=cfg.latent_channels,
        visual_channels=visual_channels(cfg.stage, cfg.latent_channels),
        num_frames=cfg.num_frames,
        # Positions sized to cover this run (random init); a loaded adapter brings its own
        # table and the loader checks it covers num_frames.
        motion_max_seq_length=max(base.motion_max_seq_length, cfg.num_frames),
        masked_blocks=masked if cfg.stage == 2 else 0,
        activation_checkpointing=cfg.activation_checkpointing,
    )
    out.validate()
    return out


__all__ = [
    "MASKED_PREFIXES",
    "UNET_FIELDS",
    "UNET_SIZES",
    "TTMUNet",
    "UNetConfig",
    "build_unet",
    "unet_config_from",
]
