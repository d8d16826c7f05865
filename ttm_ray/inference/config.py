"""``GenerationConfig``: which exported models two-stage generation runs, and how it samples.

Each stage points at an export written by ``ttm-ray train`` (``<run>/export``). The export
carries the model, its encoders and its diffusion settings; every field here that is null
keeps the export's value, so a config names only what it changes (steps, guidance scales, an
encoder folder that lives elsewhere on this machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ttm_ray.config import constrained


@dataclass
class StageModelConfig:
    """One stage's exported model and its sampling settings."""

    export: str | None = constrained(
        None, help="export folder of the stage's training run (model.safetensors, model.yaml, "
                   "encoders.yaml, diffusion.yaml), e.g. runs/dit-stage1/export")
    steps: int | None = constrained(
        None, ge=2, help="sampler steps; null: the export's (50 in the paper's runs)")
    scale_visual: float | None = constrained(
        None, ge=0, help="S_I, visual guidance scale; null: the export's (paper 1.5)")
    scale_text: float | None = constrained(
        None, ge=0, help="S_T, text guidance scale; null: the export's (paper 8.5)")
    text_encoder_path: str | None = constrained(
        None, help="text encoder folder on this machine; null: the one the run trained with")
    autoencoder_path: str | None = constrained(
        None, help="autoencoder folder on this machine; null: the one the run trained with")
    mask_rule: Literal["area", "box"] = constrained(
        "area", help="stage 2: masks -> token ids, as data.mask_rule of the training run")
    mask_threshold: float = constrained(
        0.5, gt=0, le=1, help="stage 2: coverage that claims a token (data.mask_threshold)")


@dataclass
class GenerationConfig:
    """Section ``generation:``: the two stages, the device and what is written."""

    stage1: StageModelConfig = field(default_factory=StageModelConfig)
    stage2: StageModelConfig = field(default_factory=StageModelConfig)
    device: str = constrained("auto", nonempty=True, help="auto (cuda if present) | cpu | cuda:N")
    dtype: Literal["float32", "bfloat16"] = constrained(
        "float32", help="denoiser weights/activations (bfloat16 on GPUs)")
    seed: int = constrained(0, ge=0, help="noise seed (per item: seed + the item's index)")
    fps: float = constrained(8.0, gt=0, help="frame rate of the written mp4s")
    overlay_alpha: float = constrained(0.5, ge=0, le=1, help="trajectory opacity in the preview")

    def require_exports(self, need_stage1: bool = True) -> None:
        """The export folders the run will load exist (a ConfigError naming the key).
        Separate from validation so a config can be checked where the weights are not."""
        from pathlib import Path

        from ttm_ray.config import ConfigError
        from ttm_ray.models.export import MODEL_CONFIG

        errors = []
        for key, stage in (("stage1", self.stage1), ("stage2", self.stage2)):
            if key == "stage1" and not need_stage1:
                continue
            if stage.export is None:
                errors.append(f"generation.{key}.export: required: the export folder of the "
                              f"{key} training run (<run.root>/<run.name>/export)")
            elif not (Path(stage.export) / MODEL_CONFIG).is_file():
                errors.append(f"generation.{key}.export: {stage.export} holds no {MODEL_CONFIG}:"
                              " point at a folder written by `ttm-ray train`")
        if errors:
            raise ConfigError(errors)


__all__ = ["GenerationConfig", "StageModelConfig"]
