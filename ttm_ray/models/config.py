"""``ModelConfig``: which denoiser a run trains or samples, in one family-neutral record.

The size is a *name* from the family's registry (``dit-4b``, ``dit-tiny``, ``unet-1.4b``,
``unet-tiny``); ``overrides`` changes single fields of that named config (e.g.
``{"depth": 2}``) without a new name. The latent shape fields describe the tensors the model
sees, which are **latents** (the autoencoder's output grid), never pixels: for the paper's DiT,
128x256x256 RGB -> 16 latent frames of 32x32 with 16 channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ttm_ray.config import constrained


@dataclass
class ModelConfig:
    family: Literal["dit", "unet"] = constrained("dit", help="dit (MovieGen-style) | unet")
    size: str = constrained(
        "dit-tiny", nonempty=True,
        help="a registered size of the family: dit-4b, dit-tiny, unet-1.4b, unet-tiny",
    )
    stage: Literal[1, 2] = constrained(
        1, help="1: image-to-motion (no masked layers); 2: motion-to-video (masked layers)"
    )
    latent_channels: int = constrained(16, gt=0, help="channels of the target latent x_t")
    num_frames: int = constrained(
        16, gt=0, help="LATENT frames T of x_t (pixel frames / the autoencoder's T factor)"
    )
    height: int = constrained(32, gt=0, help="LATENT rows H of x_t (pixel height / factor)")
    width: int = constrained(32, gt=0, help="LATENT columns W of x_t (pixel width / factor)")
    overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "per-size field overrides of the family config, e.g. {depth: 2}"},
    )
    activation_checkpointing: bool = constrained(
        False, help="recompute blocks in backward to save activation memory"
    )
    masked_attention_blocks: int | None = constrained(
        None, ge=0,
        help="K: blocks with the added masked layers (stage 2); null: the size's default "
             "(10 for dit-4b, 6 for unet-1.4b)",
    )
    condition_frames: Literal["first", "repeat"] = constrained(
        "first",
        help="how the one-frame condition latents E(x0) (and E(s0) in stage 1) fill the "
             "clip: first (frame 0, zeros after) or repeat (on every latent frame); see "
             "ttm_ray.conditioning.layout",
    )
    init_from: str | None = constrained(
        None, help="pretrained weights (.safetensors / .pt state dict) loaded after building"
    )

    def validate(self) -> None:
        # Lazy: the family registry imports the model code, which imports this module.
        from ttm_ray.models import resolve_family_config

        resolve_family_config(self)  # raises ValueError naming the problem
