"""The contract between generation and the image-understanding front-end that produces its
conditions (the motion prompt, the per-object prompts and the masks s0).

The front-end is data prep's own stages run on one image (``data_prep.annotate``: the LLM
prompt stage, Grounding DINO + SAM2 or GT masks). ``ttm_ray`` never imports ``data_prep``, so
it is injected: an :data:`Annotator` is any callable from request dicts to response dicts.

Request (one per item)::

    item_id          str
    source_uri       the image, or a reference video whose frame_indices[0] is the image
    frame_indices    [0] for an image; the sampled clip frames of a reference video
    caption          the global prompt c
    motion_prompt    given c_motion (manual prompts: skip the LLM), or None
    object_prompts   given c_local [{name, prompt}], or None
    annotation_uri   SA-V-format annotation (GT masks / a user trajectory), or None
    want_llm         also run the LLM on items with given prompts (the "GT + LLM" setting)
    need_motion      False when every requested setting gives the trajectory (stage 1 off):
                     then no c_motion is needed and given object prompts suffice

Response: the request plus ``status`` ("ok" | "rejected"), ``reject_reason`` /
``reject_detail``, ``c_motion``, ``c_local`` [{name, prompt}], ``prompt_source``
("given" | "llm"), ``masks`` in the dataset's format ([{name, color_index, rle: [COCO RLE
per frame]}], source resolution), ``mask_source``, and with ``want_llm`` ``llm_c_motion`` /
``llm_c_local``.

Masks and local prompts are bound by name with
:func:`~ttm_ray.inference.name_binding.bind_names`; every mask is kept, and how each got its
prompt is recorded in the generation record (``notes.name_binding``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ttm_ray.conditioning.trajectory import masks_from_rle
from ttm_ray.inference.generate import GenerationInput, ObjectPrompt
from ttm_ray.inference.name_binding import NameBinding, bind_names

log = logging.getLogger(__name__)

Annotator = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


class AnnotationRejected(ValueError):
    """The front-end could not condition this item (the reason is data-prep's)."""

    def __init__(self, item_id: str, reason: str, detail: str) -> None:
        self.item_id, self.reason, self.detail = item_id, reason, detail
        super().__init__(f"item {item_id!r}: {reason}: {detail[:500]}")


def objects_with_masks(c_local: Sequence[dict[str, Any]], masks: Sequence[dict[str, Any]],
                       fallback_prompt: str
                       ) -> tuple[list[ObjectPrompt], list[dict[str, Any]], NameBinding]:
    """Bind each mask to a local prompt by name: ``(objects, their masks, the binding)``, one
    object per mask, in colour order.

    Names are bound by :func:`~ttm_ray.inference.name_binding.bind_names` (exact, normalised,
    similar, then order), so an LLM that calls the GT "dog" "The Dogs" still animates it.
    Every mask is kept: a mask no prompt binds to (the LLM named fewer objects) gets
    ``fallback_prompt``, because dropping it would remove a GT object from the trajectory and
    turn a prompt ablation into a mask ablation. Prompts whose mask was dropped upstream (no
    box, empty mask) have no pixels to animate; they stay unused (``unused_prompts``).
    """
    prompts = [(str(o["name"]), str(o["prompt"])) for o in c_local]
    ordered = sorted(masks, key=lambda m: int(m["color_index"]))
    binding = bind_names([str(m["name"]) for m in ordered], [n for n, _ in prompts],
                         [int(m["color_index"]) for m in ordered])
    objects = [ObjectPrompt(b.mask_name, fallback_prompt if b.prompt_index is None
                            else prompts[b.prompt_index][1], b.color_index)
               for b in binding.bindings]
    return objects, ordered, binding


def generation_input(response: dict[str, Any], image: np.ndarray, seed: int, *,
                     use_trajectory: bool = False, prompts: str = "given",
                     notes: dict[str, Any] | None = None) -> GenerationInput:
    """An annotator response -> :class:`GenerationInput` for ``image`` (its frame 0).

    ``use_trajectory``: condition stage 2 on the response's masks over all its frames (GT or
    user trajectory) instead of sampling stage 1. ``prompts``: "given" (the response's
    c_motion / c_local) or "llm" (``llm_c_motion`` / ``llm_c_local``).
    """
    item_id = str(response["item_id"])
    if response.get("status") != "ok":
        raise AnnotationRejected(item_id, str(response.get("reject_reason")),
                                 str(response.get("reject_detail") or ""))
    motion_key, local_key = ("c_motion", "c_local") if prompts == "given" else (
        "llm_c_motion", "llm_c_local")
    if prompts != "given" and response.get("llm_status") not in (None, "ok"):
        # The LLM was asked but failed on this item: its own reason, not a config error.
        raise AnnotationRejected(item_id, str(response.get("llm_reject_reason")),
                                 "the LLM prompt stage rejected this item (GT + LLM prompts)")
    if response.get(local_key) is None:
        raise ValueError(f"item {item_id!r}: the annotation has no {local_key} (ask the "
                         "annotator with want_llm for LLM prompts)")
    caption = str(response["caption"])
    # An unbound mask's fallback prompt is the global caption: the text encoder rejects an
    # empty prompt, and the mask's own name comes from the manual prompts (under GT masks),
    # which the "GT + LLM" setting must not see; the caption is what the LLM itself was given.
    objects, masks, binding = objects_with_masks(response[local_key],
                                                 response.get("masks") or [], caption)
    if not objects:
        raise AnnotationRejected(item_id, "no_objects", "the annotation has no object mask")
    if binding.non_exact:
        log.warning("item %r: %s prompts bound to masks by name as %s; unused prompts: %s",
                    item_id, local_key, {b.mask_name: b.method for b in binding.bindings},
                    list(binding.unused_prompts))
    h, w = image.shape[:2]
    decoded, _ = masks_from_rle(masks)
    stack = np.stack(decoded)  # [K, T, H_src, W_src]
    if stack.shape[2:] != (h, w):
        raise ValueError(f"item {item_id!r}: masks are {stack.shape[3]}x{stack.shape[2]}, the "
                         f"image {w}x{h}: annotations must be at the image's resolution")
    return GenerationInput(
        item_id=item_id, image=image, caption=caption,
        c_motion=str(response.get(motion_key) or ""), objects=objects,
        first_masks=stack[:, 0], trajectory=stack if use_trajectory else None, seed=seed,
        notes={"prompt_source": response.get("prompt_source") if prompts == "given"
               else "llm", "mask_source": response.get("mask_source"),
               "name_binding": {"prompts": local_key, "fallback_prompt": "caption",
                                **binding.as_record()}, **(notes or {})})


__all__ = ["AnnotationRejected", "Annotator", "generation_input", "objects_with_masks"]
