"""Two-condition classifier-free guidance (InstructPix2Pix style), shared by both objectives.

The paper guides on two conditions: the *visual* one ``I`` (every latent concatenated to
``x_t``, i.e. ``ModelConditioning.visual``) and the *text* one ``T`` (the global prompt and, in
stage 2, the local prompts). Training teaches the model the unconditional branches by dropping
them (:func:`apply_condition_dropout`); sampling combines three predictions
(:func:`guided_prediction`)::

    e = e(0, 0) + S_I [e(I, 0) - e(0, 0)] + S_T [e(I, T) - e(I, 0)]

The weights of ``e(0,0)``, ``e(I,0)``, ``e(I,T)`` are ``1 - S_I``, ``S_I - S_T``, ``S_T``: they
sum to one, so the combination is affine. Velocity (flow matching), v (DDIM) and epsilon
predictions are all affine in the model's (x0, noise) estimate for a fixed ``x_t``, so the same
formula applies to every objective and lives here once.

What "dropped" means (one definition for training and sampling, so the model sees at sampling
exactly the null conditions it was trained on):

* dropped visual: ``visual`` set to zeros (all its channels, including the "frame given" flag).
* dropped text: ``text`` set to the text encoder's embedding of the empty prompt (``null_text``,
  with its mask ``null_text_mask``); the local prompts go with the global one, because they
  are text too: ``local_text`` is zeroed and ``local_text_ids`` set to -1, so no latent token
  matches a local prompt and the masked cross-attention contributes nothing.
* ``token_ids`` (which object each latent token belongs to) is kept in every branch: it is the
  masks' layout that the masked self-attention needs, not a condition that is guided.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.config.schema import constrained
from ttm_ray.diffusion.common import ModelFn, per_sample, rand


@dataclass
class GuidanceConfig:
    """Condition dropout for training and guidance scales for sampling (paper: 5/5/5%, 1.5, 8.5).

    The three drop events are disjoint: per sample exactly one of {keep, drop text, drop
    visual, drop both} happens, so ``p_drop_text + p_drop_visual + p_drop_both <= 1``.
    """

    p_drop_text: float = constrained(
        0.05, ge=0, le=1, help="training: probability of dropping only the text (global + local)"
    )
    p_drop_visual: float = constrained(
        0.05, ge=0, le=1, help="training: probability of dropping only the visual condition"
    )
    p_drop_both: float = constrained(
        0.05, ge=0, le=1, help="training: probability of dropping text and visual together"
    )
    scale_visual: float = constrained(1.5, ge=0, help="sampling: S_I, visual guidance scale")
    scale_text: float = constrained(8.5, ge=0, help="sampling: S_T, text guidance scale")

    def validate(self) -> None:
        total = self.p_drop_text + self.p_drop_visual + self.p_drop_both
        if total > 1:
            raise ValueError(f"p_drop_text + p_drop_visual + p_drop_both = {total:g} > 1 "
                             "(the drop events are disjoint)")

    def build(self, null_text: torch.Tensor, null_text_mask: torch.Tensor | None = None
              ) -> Guidance:
        """Bind the config to the empty prompt's embedding (known once the text encoder is)."""
        self.validate()
        return Guidance(self, null_text, null_text_mask)


def _null_text(cond: ModelConditioning, null_text: torch.Tensor,
               null_text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``null_text`` ([L, D] or [1, L, D]) broadcast to ``cond.text``'s ``[B, L, D]`` + its mask.

    The null prompt must be encoded with the same padded length ``L`` as the batch's prompts
    (text encoders here pad to a fixed length), since dropped rows are swapped in place.
    """
    b, length, dim = cond.text.shape
    null = null_text.unsqueeze(0) if null_text.dim() == 2 else null_text
    if null.dim() != 3 or null.shape[0] != 1 or tuple(null.shape[1:]) != (length, dim):
        raise ValueError(f"null_text has shape {tuple(null_text.shape)}; expected [{length}, "
                         f"{dim}] or [1, {length}, {dim}] to match cond.text "
                         "(encode the empty prompt with the same padding length)")
    null = null.to(device=cond.text.device, dtype=cond.text.dtype).expand(b, length, dim)
    if cond.text_mask is None:
        # Without a mask the model attends to every token, so a null prompt with padding
        # would silently attend to its pad embeddings: refuse instead.
        if null_text_mask is not None and not bool(null_text_mask.all()):
            raise ValueError("cond.text_mask is None but null_text_mask masks tokens out; "
                             "give the batch a text_mask too")
        return null, None
    if null_text_mask is None:
        mask = torch.ones(b, length, dtype=torch.bool, device=cond.text.device)
    else:
        mask = null_text_mask.reshape(1, length).to(device=cond.text.device, dtype=torch.bool)
        mask = mask.expand(b, length)
    return null, mask


def _where(drop: torch.Tensor, dropped: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.where(per_sample(drop, kept), dropped, kept)


def drop_conditions(cond: ModelConditioning, drop_text: torch.Tensor, drop_visual: torch.Tensor,
                    null_text: torch.Tensor, null_text_mask: torch.Tensor | None
                    ) -> ModelConditioning:
    """``cond`` with the text / visual conditions of the samples flagged ``[B]`` bool dropped."""
    null, null_mask = _null_text(cond, null_text, null_text_mask)
    drop_text = drop_text.to(cond.text.device)
    drop_visual = drop_visual.to(cond.visual.device)
    changes: dict[str, torch.Tensor | None] = {
        "visual": _where(drop_visual, torch.zeros_like(cond.visual), cond.visual),
        "text": _where(drop_text, null, cond.text),
    }
    if cond.text_mask is not None:
        changes["text_mask"] = _where(drop_text, null_mask, cond.text_mask)
    if cond.local_text is not None:
        changes["local_text"] = _where(drop_text, torch.zeros_like(cond.local_text),
                                       cond.local_text)
    if cond.local_text_ids is not None:
        changes["local_text_ids"] = _where(drop_text, torch.full_like(cond.local_text_ids, -1),
                                           cond.local_text_ids)
    return cond.replace(**changes)


def sample_dropout(batch: int, cfg: GuidanceConfig, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(drop_text, drop_visual)`` ``[B]`` bool, one uniform draw per sample.

    ``u < p_text``: text only; ``< p_text + p_visual``: visual only; ``< ... + p_both``: both.
    """
    u = rand((batch,), generator, device)
    a = cfg.p_drop_text
    b = a + cfg.p_drop_visual
    c = b + cfg.p_drop_both
    only_text = u < a
    only_visual = (u >= a) & (u < b)
    both = (u >= b) & (u < c)
    return only_text | both, only_visual | both


def apply_condition_dropout(cond: ModelConditioning, null_text: torch.Tensor,
                            null_text_mask: torch.Tensor | None, cfg: GuidanceConfig,
                            generator: torch.Generator | None = None) -> ModelConditioning:
    """Training-time dropout: per sample keep, drop text, drop visual or drop both.

    Probabilities ``cfg.p_drop_text / p_drop_visual / p_drop_both`` (disjoint events). See the
    module docstring for what a dropped condition looks like.
    """
    cfg.validate()
    drop_text, drop_visual = sample_dropout(cond.text.shape[0], cfg, generator,
                                            cond.visual.device)
    return drop_conditions(cond, drop_text, drop_visual, null_text, null_text_mask)


def guidance_conditions(cond: ModelConditioning, null_text: torch.Tensor,
                        null_text_mask: torch.Tensor | None) -> ModelConditioning:
    """The ``3B`` batch of conditions, in order ``(I, T)``, ``(I, 0)``, ``(0, 0)``."""
    b = cond.text.shape[0]
    keep = torch.zeros(b, dtype=torch.bool, device=cond.visual.device)
    drop = torch.ones_like(keep)
    image_only = drop_conditions(cond, drop, keep, null_text, null_text_mask)
    neither = drop_conditions(cond, drop, drop, null_text, null_text_mask)
    return ModelConditioning.cat([cond, image_only, neither])


def combine(out: torch.Tensor, cfg: GuidanceConfig) -> torch.Tensor:
    """``[3B, ...]`` predictions (order of :func:`guidance_conditions`) -> guided ``[B, ...]``.

    Done in float32: ``S_T = 8.5`` amplifies the bf16 rounding of ``e(I,T) - e(I,0)``.
    """
    e_it, e_i0, e_00 = out.float().chunk(3)
    return e_00 + cfg.scale_visual * (e_i0 - e_00) + cfg.scale_text * (e_it - e_i0)


def _guided_call(model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor,
                 cond3: ModelConditioning, cfg: GuidanceConfig) -> torch.Tensor:
    # One forward pass over 3B samples instead of three over B: one weight read and better
    # device utilisation; the batch is what the memory plan for inference assumes.
    out = model_fn(torch.cat([x_t] * 3), torch.cat([t] * 3), cond3)
    return combine(out, cfg)


def guided_prediction(model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor,
                      cond: ModelConditioning, null_text: torch.Tensor, cfg: GuidanceConfig,
                      null_text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``e(0,0) + S_I [e(I,0) - e(0,0)] + S_T [e(I,T) - e(I,0)]`` from one 3B-batched call.

    Returns float32 ``[B, ...]``; ``t`` is ``[B]`` in whatever convention ``model_fn`` uses.
    """
    cond3 = guidance_conditions(cond, null_text, null_text_mask)
    return _guided_call(model_fn, x_t, t, cond3, cfg)


class Guidance:
    """A :class:`GuidanceConfig` bound to the null prompt: what the samplers' ``guidance`` takes.

    ``drop`` is the training-time dropout, ``predict`` one guided prediction, ``wrap`` turns a
    model into a guided model with the same call signature (what the samplers use).
    """

    def __init__(self, cfg: GuidanceConfig, null_text: torch.Tensor,
                 null_text_mask: torch.Tensor | None = None) -> None:
        self.cfg = cfg
        self.null_text = null_text
        self.null_text_mask = null_text_mask

    def drop(self, cond: ModelConditioning, generator: torch.Generator | None = None
             ) -> ModelConditioning:
        return apply_condition_dropout(cond, self.null_text, self.null_text_mask, self.cfg,
                                       generator)

    def predict(self, model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor,
                cond: ModelConditioning) -> torch.Tensor:
        return guided_prediction(model_fn, x_t, t, cond, self.null_text, self.cfg,
                                 self.null_text_mask)

    def wrap(self, model_fn: ModelFn) -> ModelFn:
        """``model_fn`` guided; the 3B conditions are built once per ``cond`` object.

        A sampler calls the model with the same ``cond`` at every step; rebuilding the 3B batch
        would copy the (large) visual latents at each of the 50 steps, so it is cached by
        identity.
        """
        cache: dict[str, ModelConditioning] = {}

        def guided(x_t: torch.Tensor, t: torch.Tensor, cond: ModelConditioning
                   ) -> torch.Tensor:
            if cache.get("cond") is not cond:
                cache["cond"] = cond
                cache["cond3"] = guidance_conditions(cond, self.null_text, self.null_text_mask)
            return _guided_call(model_fn, x_t, t, cache["cond3"], self.cfg)

        return guided
