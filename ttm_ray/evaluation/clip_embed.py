"""CLIP image embeddings of video frames, and the cosine similarity of consecutive frames.

One implementation for both consumers of "CLIP similarity of consecutive frames": the
CLIPFrame metric here and data prep's temporal (omega) score, which thresholds the minimum of
the same similarities (``data_prep/stages/score.py`` re-exports ``load_clip``,
``ClipEmbedder``, ``temporal_consistency`` and ``quiet_transformers`` from here, importing
this module lazily; keep their signatures stable for it).

CLIP loads from a local folder: a ``CLIPModel`` or ``CLIPVisionModelWithProjection``
checkpoint with its ``CLIPImageProcessor``. Only the vision tower is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttm_ray.evaluation.video import shrink_to_short_side
from ttm_ray.evaluation.weights import resolve_device


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers at error verbosity for the duration (its load reports are noise here)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def temporal_consistency(embeddings: Any) -> tuple[float | None, float | None]:
    """``(min, mean)`` cosine similarity of consecutive rows of ``embeddings`` ``[T, D]``,
    in float64. Fewer than two frames have no consecutive pair: ``(None, None)``."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"expected [T, D] embeddings, got shape {e.shape}")
    if e.shape[0] < 2:
        return None, None
    # Zero vectors would divide by zero; they have no direction, so count them as dissimilar.
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    sims = (e[:-1] * e[1:]).sum(axis=1)
    return float(sims.min()), float(sims.mean())


def load_clip(path: str | Path, device: str | torch.device = "auto",
              dtype: str = "auto") -> tuple[Any, Any]:
    """``(vision model with projection, image processor)`` from a local folder, in eval mode.

    A full ``CLIPModel`` checkpoint loads only its vision tower: the vision config does not
    carry the shared ``projection_dim``, so it is copied over (else the projection would be
    re-initialised at the default 512 width, or refuse to load). ``dtype`` auto: float16 on
    cuda, float32 on cpu.
    """
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
    elif config.model_type == "clip_vision_model":
        vision = config
    else:
        raise ValueError(f"{path}: a CLIP checkpoint is needed, found model_type "
                         f"{config.model_type!r}")
    dev = resolve_device(str(device))
    if dtype == "auto":
        dtype = "float16" if dev.type == "cuda" else "float32"
    # Loading the vision tower of a full CLIPModel leaves the text weights unused on purpose;
    # transformers would print a table of them (per Ray worker), so hush it for this load.
    with quiet_transformers():
        model = CLIPVisionModelWithProjection.from_pretrained(
            path, config=vision, dtype=getattr(torch, dtype), local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    return model.to(dev).eval(), processor


def processor_short_side(processor: Any) -> int:
    """The side the processor resizes to (``shortest_edge``, else its largest target side)."""
    size = processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    short = get("shortest_edge")
    if short:
        return int(short)
    return int(max(get("height") or 0, get("width") or 0)) or 224


class ClipEmbedder:
    """Frames (``uint8 [T, H, W, 3]``) -> L2-normalised CLIP image embeddings, ``float32
    [T, D]`` numpy."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model, self.processor = model, processor
        self.short = processor_short_side(processor)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def shrink(self, frames: np.ndarray) -> np.ndarray:
        """Downscale (aspect kept) so the shorter side is the processor's resize target.

        The processor then only crops and normalises: the same geometry as letting it resize,
        but an antialiased torch resize instead of resizing 1080p frames in the processor.
        """
        return shrink_to_short_side(frames, self.short)

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        return self.processor(images=list(self.shrink(frames)), return_tensors="pt")[
            "pixel_values"]

    def embed(self, pixel_values: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
            emb = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        return emb.cpu().numpy()

    def embed_frames(self, frames: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """All of ``frames`` embedded, ``batch_size`` frames per forward pass."""
        parts = [self.embed(self.pixels(frames[i:i + batch_size]))
                 for i in range(0, len(frames), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


__all__ = ["ClipEmbedder", "load_clip", "processor_short_side", "quiet_transformers",
           "temporal_consistency"]
