"""One stage ready to sample: an exported denoiser with the encoders, objective and guidance
it was trained with (read from the export, then the generation config's overrides).

Everything is loaded through the training side's own formats and builders
(:func:`~ttm_ray.models.export.exported_model_config` + ``build_model``, ``EncodersConfig``,
``DiffusionConfig``), so a model samples with exactly the conditioning it learned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.conditioning.encoders import Encoders, EncodersConfig
from ttm_ray.config import to_dict
from ttm_ray.diffusion import DiffusionConfig
from ttm_ray.inference.config import StageModelConfig
from ttm_ray.models import build_model
from ttm_ray.models.export import (
    DIFFUSION_CONFIG,
    ENCODERS_CONFIG,
    INFO,
    exported_model_config,
    read_export_config,
)
from ttm_ray.models.registry import token_grid

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def export_pixel_shape(export: str | Path) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the clips an export's model makes, from ``export.json``
    (written by training) or, for older exports, from its autoencoder config."""
    info_path = Path(export) / INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("pixel_shape"):
        frames, height, width = (int(v) for v in info["pixel_shape"])
        return frames, height, width
    m = exported_model_config(export)
    ae = read_export_config(export, ENCODERS_CONFIG, EncodersConfig).autoencoder.build("cpu")
    _, frames, height, width = ae.pixel_shape(m.num_frames, m.height, m.width)
    return frames, height, width


class StageModel:
    """The stage-``stage`` model of an export, its frozen encoders and its sampler."""

    def __init__(self, cfg: StageModelConfig, stage: int, key: str,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if cfg.export is None:
            raise ValueError(f"{key}.export: required (an export folder of `ttm-ray train`)")
        self.key, self.export = key, str(cfg.export)
        self.device, self.dtype = torch.device(device), dtype
        self.model_cfg = exported_model_config(cfg.export)
        if self.model_cfg.stage != stage:
            raise ValueError(f"{key}.export: {cfg.export} holds a stage-{self.model_cfg.stage} "
                             f"model; {key} needs stage {stage}")
        encoders = read_export_config(cfg.export, ENCODERS_CONFIG, EncodersConfig)
        if cfg.text_encoder_path:
            encoders = replace(encoders, text_encoder=replace(encoders.text_encoder,
                                                              path=cfg.text_encoder_path))
        if cfg.autoencoder_path:
            encoders = replace(encoders, autoencoder=replace(encoders.autoencoder,
                                                             path=cfg.autoencoder_path))
        diffusion = read_export_config(cfg.export, DIFFUSION_CONFIG, DiffusionConfig)
        self.diffusion = diffusion.with_sampling(cfg.steps, cfg.scale_visual, cfg.scale_text)
        self.encoders_cfg = encoders
        self.cfg = cfg
        log.info("%s: loading %s (%s stage %d)", key, cfg.export, self.model_cfg.size, stage)
        self.model = build_model(self.model_cfg, device=self.device).to(dtype).eval()
        self.encoders: Encoders = encoders.build(self.device)
        self.objective = self.diffusion.build()
        self.guidance = self.diffusion.guidance.build(*self.encoders.null_text(1))
        ae = self.encoders.autoencoder
        m = self.model_cfg
        if ae.latent_channels != m.latent_channels:
            raise ValueError(f"{key}: the autoencoder gives {ae.latent_channels} latent "
                             f"channels, the model takes {m.latent_channels}")
        _, self.frames, self.height, self.width = ae.pixel_shape(m.num_frames, m.height, m.width)
        self.token_grid = token_grid(m)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        m = self.model_cfg
        return m.latent_channels, m.num_frames, m.height, m.width

    def model_fn(self, x_t: torch.Tensor, t: torch.Tensor, cond: ModelConditioning
                 ) -> torch.Tensor:
        """The denoiser in its dtype, returning float32 (samplers integrate in fp32)."""
        return self.model(x_t.to(self.dtype), t, cond.to(x_t.device, self.dtype)).float()

    @torch.no_grad()
    def sample(self, cond: ModelConditioning, generator: torch.Generator) -> torch.Tensor:
        """A guided sample ``[B, C, T, H, W]`` (latent) for ``cond``."""
        shape = (cond.visual.shape[0], *self.latent_shape)
        return self.objective.sample(self.model_fn, shape, cond, generator=generator,
                                     guidance=self.guidance)

    def describe(self) -> dict[str, Any]:
        """What the generation record says about this stage (reproducibility)."""
        info_path = Path(self.export) / INFO
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        d = self.diffusion
        steps = (d.flow_matching.num_steps if d.objective == "flow_matching"
                 else d.ddim.num_inference_steps)
        return {"export": self.export, "model": to_dict(self.model_cfg),
                "objective": d.objective, "steps": steps,
                "scale_visual": d.guidance.scale_visual, "scale_text": d.guidance.scale_text,
                "pixels": [self.frames, self.height, self.width],
                "text_encoder": self.encoders_cfg.text_encoder.path,
                "autoencoder": self.encoders_cfg.autoencoder.kind, "trained": info}


__all__ = ["StageModel", "export_pixel_shape", "resolve_device"]
