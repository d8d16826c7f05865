"""The frozen encoders of a run and the one function that turns encoded inputs into a
:class:`ModelConditioning`, shared by training (``ttm_ray.training.data``) and two-stage
inference (``ttm_ray.inference``), so both condition a model in exactly the same way.

What each stage is conditioned on (``method_notes.md``):

* stage 1 (image-to-motion): visual = [E(x0) | E(s0) | given] at latent frame 0; text =
  c_motion.
* stage 2 (motion-to-video): visual = [E(x0) @ frame 0 | E(s) | given]; text = the caption;
  local_text / local_text_ids = every object's c_local prompt tagged with its colour index;
  token_ids = the trajectory masks on the model's token grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ttm_ray.conditioning.autoencoders import Autoencoder, AutoencoderConfig
from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.conditioning.layout import build_visual
from ttm_ray.conditioning.text_encoders import TextEncoder, TextEncoderConfig
from ttm_ray.config import absolute_path, constrained


@dataclass
class LocalTextConfig:
    """How stage 2's per-object prompts become ``local_text`` (training and inference)."""

    tokens_per_object: int | None = constrained(
        None, gt=0, help="cap on each local prompt's tokens; null: the text encoder's length")
    tokens: int | None = constrained(
        None, gt=0, help="fixed M (local tokens per sample, padded); null: the batch's longest")


@dataclass
class EncodersConfig:
    """Section ``encoders:``: the frozen autoencoder and text encoder of a run."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def build(self, device: torch.device | str | None = None) -> Encoders:
        return Encoders(self.autoencoder.build(device), self.text_encoder.build(device))

    def with_absolute_paths(self) -> EncodersConfig:
        """Weights folders made absolute (see :func:`ttm_ray.config.absolute_path`): what a
        training run hands its workers and what an encoded version records, so the two
        compare equal."""
        ae, text = self.autoencoder, self.text_encoder
        return replace(self, autoencoder=replace(ae, path=absolute_path(ae.path)),
                       text_encoder=replace(text, path=absolute_path(text.path),
                                            tokenizer_path=absolute_path(text.tokenizer_path)))


def to_model_video(frames: Sequence[np.ndarray], device: torch.device | str) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` per item -> float ``[B, 3, T, H, W]`` in [-1, 1] on ``device``."""
    x = torch.from_numpy(np.stack(frames)).to(device)
    return x.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


def from_model_video(video: torch.Tensor) -> np.ndarray:
    """float ``[3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]`` (the inverse, clamped)."""
    rgb = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return rgb.permute(1, 2, 3, 0).cpu().numpy()


class Encoders:
    """The frozen encoders on one device (neither stage trains them)."""

    def __init__(self, autoencoder: Autoencoder, text: TextEncoder) -> None:
        self.autoencoder = autoencoder
        self.text = text

    def null_text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's ``(emb [batch, L, D], mask [batch, L])``: dropped text in
        training, the unconditional branch of guidance."""
        return self.text.null(batch)

    @torch.no_grad()
    def conditions(
        self,
        stage: int,
        num_frames: int,
        first_frame_latent: torch.Tensor,
        trajectory_latent: torch.Tensor,
        prompts: Sequence[str],
        *,
        local_prompts: Sequence[Sequence[str]] | None = None,
        local_ids: Sequence[Sequence[int]] | None = None,
        token_ids: torch.Tensor | None = None,
        local: LocalTextConfig | None = None,
        names: Sequence[str] | None = None,
        frames: str = "first",
    ) -> ModelConditioning:
        """Encoded inputs -> the model's conditioning (float32 on the latents' device).

        ``first_frame_latent``: E(x0) ``[B, C, 1, h, w]``; ``trajectory_latent``: E(s0)
        (stage 1) or E(s) (stage 2); ``prompts``: c_motion (stage 1) or the caption (stage 2).
        Stage 2 also needs ``local_prompts`` / ``local_ids`` (each object's prompt and colour
        index) and ``token_ids [B, t, h, w]`` on the model's token grid. ``names`` name the
        items in text-encoder errors (e.g. an empty caption); ``frames`` is the model's
        ``condition_frames`` (:func:`~ttm_ray.conditioning.layout.build_visual`).
        """
        emb, mask = self.text.encode(list(prompts), names=names)
        local_text = None
        if stage == 2:
            if local_prompts is None or local_ids is None or token_ids is None:
                raise ValueError("stage 2 needs local_prompts, local_ids and token_ids")
            local = local or LocalTextConfig()
            local_text = self.text.encode_local(local_prompts, local_ids,
                                                max_tokens_per_object=local.tokens_per_object,
                                                num_tokens=local.tokens)
        return assemble_conditions(stage, num_frames, first_frame_latent, trajectory_latent,
                                   (emb, mask), local_text, token_ids, frames=frames)


def assemble_conditions(stage: int, num_frames: int, first_frame_latent: torch.Tensor,
                        trajectory_latent: torch.Tensor,
                        text: tuple[torch.Tensor, torch.Tensor],
                        local_text: tuple[torch.Tensor, torch.Tensor] | None = None,
                        token_ids: torch.Tensor | None = None, *,
                        frames: str = "first") -> ModelConditioning:
    """Encoder outputs -> :class:`ModelConditioning` (float32, masks bool, ids long).

    The one place the conditioning is put together: :meth:`Encoders.conditions` calls it with
    fresh encoder outputs, training on an encoded-latent cache with stored ones, so both give
    the model the same tensors. ``text``: ``(emb [B, L, D], mask [B, L])``; stage 2 also takes
    ``local_text = (local [B, M, D], ids [B, M])`` and ``token_ids [B, t, h, w]``.
    """
    visual = build_visual(stage, first_frame_latent.float(), trajectory_latent.float(),
                          num_frames, frames)
    emb, mask = text
    cond = ModelConditioning(visual=visual, text=emb.float().to(visual.device),
                             text_mask=mask.bool().to(visual.device))
    if stage == 1:
        return cond
    if local_text is None or token_ids is None:
        raise ValueError("stage 2 needs local_prompts, local_ids and token_ids")
    local, ids = local_text
    return cond.replace(local_text=local.float().to(visual.device),
                        local_text_ids=ids.long().to(visual.device),
                        token_ids=token_ids.to(visual.device).long())


__all__ = ["Encoders", "EncodersConfig", "LocalTextConfig", "assemble_conditions",
           "from_model_video", "to_model_video"]
