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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ttm_ray.conditioning.trajectory import masks_from_rle
from ttm_ray.inference.generate import GenerationInput, ObjectPrompt

Annotator = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


class AnnotationRejected(ValueError):
    """The front-end could not condition this item (the reason is data-prep's)."""

    def __init__(self, item_id: str, reason: str, detail: str) -> None:
        self.item_id, self.reason, self.detail = item_id, reason, detail
        super().__init__(f"item {item_id!r}: {reason}: {detail[:500]}")


def objects_with_masks(c_local: Sequence[dict[str, Any]], masks: Sequence[dict[str, Any]]
                       ) -> tuple[list[ObjectPrompt], list[dict[str, Any]]]:
    """Pair each mask with its local prompt by name: ``(objects, their masks)`` in colour
    order. Objects whose masks were dropped (no box, empty mask) have no pixels to animate and
    are left out, so no prompt is ever bound to another object's colour."""
    prompts = {str(o["name"]): str(o["prompt"]) for o in c_local}
    objects, kept = [], []
    for m in sorted(masks, key=lambda m: int(m["color_index"])):
        name = str(m["name"])
        if name in prompts:
            objects.append(ObjectPrompt(name, prompts[name], int(m["color_index"])))
            kept.append(m)
    return objects, kept


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
    if response.get(local_key) is None:
        raise ValueError(f"item {item_id!r}: the annotation has no {local_key} (ask the "
                         "annotator with want_llm for LLM prompts)")
    objects, masks = objects_with_masks(response[local_key], response.get("masks") or [])
    if not objects:
        raise AnnotationRejected(item_id, "no_objects", "no object has both a mask and a "
                                 "local prompt")
    h, w = image.shape[:2]
    decoded, _ = masks_from_rle(masks)
    stack = np.stack(decoded)  # [K, T, H_src, W_src]
    if stack.shape[2:] != (h, w):
        raise ValueError(f"item {item_id!r}: masks are {stack.shape[3]}x{stack.shape[2]}, the "
                         f"image {w}x{h}: annotations must be at the image's resolution")
    return GenerationInput(
        item_id=item_id, image=image, caption=str(response["caption"]),
        c_motion=str(response.get(motion_key) or ""), objects=objects,
        first_masks=stack[:, 0], trajectory=stack if use_trajectory else None, seed=seed,
        notes={"prompt_source": response.get("prompt_source") if prompts == "given"
               else "llm", "mask_source": response.get("mask_source"), **(notes or {})})


__all__ = ["AnnotationRejected", "Annotator", "generation_input", "objects_with_masks"]
