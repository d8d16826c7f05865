"""The failure-case settings of the paper's Table 5 (appendix 6.6): how errors of one stage
propagate to the next.

Each *variant* turns an item's annotation into the :class:`GenerationInput` of one setting:

==================== ====================== ==============================================
variant              trajectory             prompts
==================== ====================== ==============================================
``gt_manual``        GT masks (stage 1 off) given ("manual")
``generated_manual`` stage 1 samples it     given
``noisy_mild``       GT + mild mask noise   given
``noisy_strong``     GT + strong mask noise given
``gt_llm``           GT masks               re-written by the LLM from the caption
``gt_dropout``       GT masks               given, words dropped at random
``gt_wrong``         GT masks               another item's prompts
==================== ====================== ==============================================

Outside the harness, generation uses ``generated`` (stage 1 from the front-end's s0, the
front-end's prompts) or ``given_trajectory`` (the item's annotation as the trajectory).

Mask noise (Decision; the paper does not define it): per object and frame, a random
translation of up to ``shift`` of the image size and a random dilation or erosion of up to
``morph`` of it, drawn from the item's seed, so a setting is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ttm_ray.config import constrained
from ttm_ray.inference.annotation import generation_input
from ttm_ray.inference.generate import GenerationInput

VARIANTS = ("generated", "given_trajectory", "gt_manual", "generated_manual", "noisy_mild",
            "noisy_strong", "gt_llm", "gt_dropout", "gt_wrong")
TABLE5 = ("gt_manual", "generated_manual", "noisy_mild", "noisy_strong", "gt_llm",
          "gt_dropout", "gt_wrong")
#: Variants whose trajectory stage 1 samples (they need c_motion and s0).
STAGE1_VARIANTS = frozenset({"generated", "generated_manual"})
#: Variants that condition stage 2 on the item's annotation (they need one).
NEEDS_TRAJECTORY = frozenset(VARIANTS) - STAGE1_VARIANTS
#: Variants that need the item's given (manual) prompts.
NEEDS_GIVEN_PROMPTS = frozenset(TABLE5)


@dataclass
class HarnessConfig:
    """Strengths of the perturbations of the failure-case settings."""

    mild_shift: float = constrained(0.02, ge=0, le=1, help="noisy_mild: max shift / size")
    mild_morph: float = constrained(0.02, ge=0, le=1, help="noisy_mild: max dilate/erode")
    strong_shift: float = constrained(0.10, ge=0, le=1, help="noisy_strong: max shift / size")
    strong_morph: float = constrained(0.08, ge=0, le=1, help="noisy_strong: max dilate/erode")
    word_dropout: float = constrained(
        0.3, ge=0, lt=1, help="gt_dropout: probability of dropping each word of each prompt")


def noisy_masks(masks: np.ndarray, shift: float, morph: float, rng: np.random.Generator
                ) -> np.ndarray:
    """``bool [K, T, H, W]`` with a random shift and dilation/erosion per object and frame."""
    k, t, h, w = masks.shape
    out = np.zeros_like(masks, dtype=bool)
    max_dy, max_dx = round(shift * h), round(shift * w)
    max_r = round(morph * min(h, w))
    for o in range(k):
        for f in range(t):
            m = torch.from_numpy(masks[o, f].astype(np.float32))[None, None]
            r = int(rng.integers(-max_r, max_r + 1)) if max_r else 0
            if r:
                pooled = F.max_pool2d(m if r > 0 else 1 - m, 2 * abs(r) + 1, 1, abs(r))
                m = pooled if r > 0 else 1 - pooled
            dy = int(rng.integers(-max_dy, max_dy + 1)) if max_dy else 0
            dx = int(rng.integers(-max_dx, max_dx + 1)) if max_dx else 0
            shifted = np.zeros((h, w), dtype=bool)
            src = m[0, 0].numpy() > 0.5
            ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h),
                                                                       slice(0, h + dy))
            xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w),
                                                                       slice(0, w + dx))
            shifted[yd, xd] = src[ys, xs]
            out[o, f] = shifted
    return out


def drop_words(text: str, p: float, rng: np.random.Generator) -> str:
    """Each word kept with probability ``1 - p`` (at least one word survives)."""
    words = text.split()
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept or words[:1])


def wrong_prompts(response: dict[str, Any], donor: dict[str, Any]) -> dict[str, Any]:
    """``response`` with the caption and prompts of another item (object k takes the donor's
    object k mod n), keeping its own names so masks still pair with prompts."""
    donor_local = donor.get("c_local") or []
    if not donor_local:
        raise ValueError(f"item {donor.get('item_id')!r} has no object prompts to lend")
    local = [{"name": o["name"], "prompt": donor_local[i % len(donor_local)]["prompt"]}
             for i, o in enumerate(response.get("c_local") or [])]
    return {**response, "caption": donor["caption"], "c_motion": donor.get("c_motion"),
            "c_local": local}


def variant_input(variant: str, response: dict[str, Any], image: np.ndarray, seed: int,
                  cfg: HarnessConfig, donor: dict[str, Any] | None = None) -> GenerationInput:
    """The :class:`GenerationInput` of ``variant`` for one annotated item."""
    notes = {"variant": variant}
    if variant in NEEDS_GIVEN_PROMPTS and response.get("prompt_source") != "given":
        raise ValueError(f"variant {variant} needs the item's own prompts (motion_prompt and "
                         "object_prompts in the manifest)")
    if variant in ("generated", "generated_manual"):
        return generation_input(response, image, seed, notes=notes)
    if variant in ("given_trajectory", "gt_manual"):
        return generation_input(response, image, seed, use_trajectory=True,
                                notes={**notes, "trajectory_source": "annotation"})
    if variant in ("noisy_mild", "noisy_strong"):
        inp = generation_input(response, image, seed, use_trajectory=True,
                               notes={**notes, "trajectory_source": f"annotation+{variant}"})
        strong = variant == "noisy_strong"
        shift = cfg.strong_shift if strong else cfg.mild_shift
        morph = cfg.strong_morph if strong else cfg.mild_morph
        assert inp.trajectory is not None
        rng = np.random.default_rng([seed, 1 + strong])
        return replace(inp, trajectory=noisy_masks(inp.trajectory, shift, morph, rng))
    if variant == "gt_llm":
        return generation_input(response, image, seed, use_trajectory=True, prompts="llm",
                                notes={**notes, "trajectory_source": "annotation"})
    if variant == "gt_dropout":
        inp = generation_input(response, image, seed, use_trajectory=True,
                               notes={**notes, "trajectory_source": "annotation"})
        rng = np.random.default_rng([seed, 7])
        objects = [replace(o, prompt=drop_words(o.prompt, cfg.word_dropout, rng))
                   for o in inp.objects]
        return replace(inp, caption=drop_words(inp.caption, cfg.word_dropout, rng),
                       c_motion=drop_words(inp.c_motion, cfg.word_dropout, rng),
                       objects=objects)
    if variant == "gt_wrong":
        if donor is None:
            raise ValueError("variant gt_wrong needs at least two items (prompts are taken "
                             "from another item)")
        return generation_input(wrong_prompts(response, donor), image, seed,
                                use_trajectory=True,
                                notes={**notes, "trajectory_source": "annotation",
                                       "prompts_from": donor.get("item_id")})
    raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")


__all__ = ["NEEDS_GIVEN_PROMPTS", "NEEDS_TRAJECTORY", "STAGE1_VARIANTS", "TABLE5", "VARIANTS",
           "HarnessConfig", "drop_words", "noisy_masks", "variant_input", "wrong_prompts"]
