"""Building the inner ``diffusers.UNetMotionModel``: from the config (random weights) or from a
local SD1.5-style U-Net plus an AnimateDiff motion adapter, checked against the config.

Local folders only (``local_files_only``): a training job must never reach a model hub, and a
path that is wrong should fail at build time with the path and the fix, not as a hub error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from ttm_ray.models.unet.config import UNetConfig

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlockMotion", "DownBlockMotion"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlockMotion", "UpBlockMotion"
#: Config keys diffusers accepts either as one int or as one value per level.
_PER_LEVEL = ("layers_per_block", "num_attention_heads", "motion_num_attention_heads")


def motion_unet_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """``UNetMotionModel(**kwargs)`` for ``cfg`` (the spatial input is ``in_channels`` only;
    ``TTMUNet`` widens it for the condition channels afterwards)."""
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.output_channels,
        "down_block_types": tuple(_CROSS_DOWN if a else _PLAIN_DOWN
                                  for a in cfg.attention_levels),
        "up_block_types": tuple(_CROSS_UP if a else _PLAIN_UP
                                for a in reversed(cfg.attention_levels)),
        "block_out_channels": tuple(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "cross_attention_dim": cfg.text_dim,
        "num_attention_heads": cfg.attention_heads,
        "motion_num_attention_heads": cfg.motion_heads,
        "motion_max_seq_length": cfg.motion_max_seq_length,
        "use_motion_mid_block": cfg.use_motion_mid_block,
    }


def build_motion_unet(cfg: UNetConfig) -> UNetMotionModel:
    """Random weights from ``cfg`` (also what a meta-device build uses: nothing is read)."""
    return UNetMotionModel(**motion_unet_kwargs(cfg))


def load_motion_unet(cfg: UNetConfig) -> UNetMotionModel:
    """``UNet2DConditionModel.from_pretrained(pretrained_unet)`` +
    ``MotionAdapter.from_pretrained(motion_adapter)`` -> ``UNetMotionModel.from_unet2d``;
    ValueError when the loaded shapes differ from ``cfg`` (so counts and plans stay true)."""
    assert cfg.pretrained_unet is not None
    unet_dir = _model_dir(
        cfg.pretrained_unet, field="pretrained_unet", subfolder="unet",
        fix="a diffusers UNet2DConditionModel folder (config.json + weights), or an SD1.5 "
            "pipeline folder with unet/; e.g. `huggingface-cli download "
            "stable-diffusion-v1-5/stable-diffusion-v1-5 --include 'unet/*' --local-dir DIR`")
    unet = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True)
    adapter = None
    if cfg.motion_adapter:
        adapter_dir = _model_dir(
            cfg.motion_adapter, field="motion_adapter", subfolder=None,
            fix="a diffusers MotionAdapter folder (config.json + weights); e.g. "
                "`huggingface-cli download guoyww/animatediff-motion-adapter-v1-5-3 "
                "--local-dir DIR`")
        adapter = MotionAdapter.from_pretrained(adapter_dir, local_files_only=True)
    model = UNetMotionModel.from_unet2d(unet, adapter)
    _check_matches(model, cfg, f"{unet_dir}" + (f" + {cfg.motion_adapter}" if adapter else ""))
    return model


def _model_dir(path: str, *, field: str, subfolder: str | None, fix: str) -> Path:
    root = Path(path).expanduser()
    candidates = [root] + ([root / subfolder] if subfolder else [])
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    looked = " or ".join(str(c / "config.json") for c in candidates)
    raise FileNotFoundError(
        f"model.overrides.{field}: no model at {root} (looked for {looked}); give {fix}; "
        f"or set {field}: null to start from random weights")


def _check_matches(model: UNetMotionModel, cfg: UNetConfig, source: str) -> None:
    expected = motion_unet_kwargs(cfg)
    got = dict(model.config)
    problems = []
    for key, want in expected.items():
        have = got.get(key)
        if key == "motion_max_seq_length":
            if have < cfg.num_frames:
                problems.append(f"motion_max_seq_length {have} < num_frames {cfg.num_frames}")
            continue
        if _norm(key, have, cfg.levels) != _norm(key, want, cfg.levels):
            problems.append(f"{key}: loaded {have!r}, size expects {want!r}")
    if problems:
        raise ValueError(f"pretrained weights {source} do not match the configured U-Net: "
                         + "; ".join(problems)
                         + ". Pick the size that matches them or override those fields")


def _norm(key: str, value: Any, levels: int) -> Any:
    """Diffusers configs mix ints, tuples and lists; compare per-level values as lists."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if key in _PER_LEVEL and isinstance(value, int):
        return [value] * levels
    return value
