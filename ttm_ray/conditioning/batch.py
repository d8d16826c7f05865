"""What a TTM denoiser is called with: one dataclass both model families accept.

Both families (``models/dit``, ``models/unet``) implement::

    model(x_t: [B, C, T, H, W], t: [B], cond: ModelConditioning) -> [B, C, T, H, W]

``x_t`` is the noisy latent of the target (stage 1: the trajectory video's latent; stage 2: the
RGB video's latent). Everything the target is conditioned on rides in :class:`ModelConditioning`,
so training, guidance (which zeroes parts of it) and inference share one path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class ModelConditioning:
    """Conditions of one batch (already encoded: latents and text embeddings).

    visual: ``[B, Cv, T, H, W]`` channels concatenated to ``x_t`` (stage 1: E(x0), E(s0)
        and the "frame given" channel; stage 2: E(x0), E(s) over all frames and the "frame
        given" channel; the one-frame latents repeat on every frame or sit at frame 0 by
        ``model.condition_frames``, see ``conditioning.layout``). Zeros = the dropped visual
        condition.
    text: ``[B, L, D]`` global prompt embeddings (stage 1: c_motion; stage 2: c). Dropped
        text = the encoder's embedding of the empty prompt (``null_text``).
    text_mask: ``[B, L]`` bool, True for real tokens.
    local_text: ``[B, M, D]`` stage 2 only: all local prompts' token embeddings concatenated.
    local_text_ids: ``[B, M]`` long: which object each local-text token belongs to (-1 pad).
    token_ids: ``[B, T', H', W']`` long: which object each latent token belongs to (-1 none),
        on the model's own token grid (after patchify); built by
        ``ttm_ray.conditioning.masks`` from the trajectory masks.
    """

    visual: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor | None = None
    local_text: torch.Tensor | None = None
    local_text_ids: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None

    @property
    def has_local(self) -> bool:
        return self.local_text is not None and self.token_ids is not None

    def replace(self, **changes: torch.Tensor | None) -> ModelConditioning:
        return replace(self, **changes)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None
           ) -> ModelConditioning:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            if dtype is not None and x.is_floating_point():
                return x.to(device=device, dtype=dtype)
            return x.to(device=device)

        return ModelConditioning(*(move(getattr(self, f)) for f in
                                   ("visual", "text", "text_mask", "local_text",
                                    "local_text_ids", "token_ids")))

    @staticmethod
    def cat(items: list[ModelConditioning]) -> ModelConditioning:
        """Concatenate along the batch (guidance runs its three passes as one batch)."""
        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(i, name) for i in items]
            return None if values[0] is None else torch.cat(values, dim=0)

        return ModelConditioning(*(cat(f) for f in ("visual", "text", "text_mask",
                                                    "local_text", "local_text_ids",
                                                    "token_ids")))
