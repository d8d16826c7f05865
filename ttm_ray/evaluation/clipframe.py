"""CLIPFrame: mean CLIP image-embedding cosine similarity of consecutive frames (paper sec. 4).

Every frame of the video is embedded (no temporal subsampling: the metric is about
frame-to-frame consistency at the video's own frame rate). 1.0 means no visual change; the
paper reports .969 (U-Net) / .945 (DiT) on SA-V-128 single-object. Per-video values are
averaged over a benchmark subset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from ttm_ray.config import constrained
from ttm_ray.evaluation.clip_embed import ClipEmbedder, load_clip, temporal_consistency
from ttm_ray.evaluation.metric import Metric, PerItemScorer
from ttm_ray.evaluation.video import VideoLike, to_uint8
from ttm_ray.evaluation.weights import CONFIG_KEY, random_model_dir, require_model_dir

log = logging.getLogger(__name__)


@dataclass
class ClipFrameConfig:
    path: str | None = constrained(
        None, help="local folder of a CLIP model (CLIPModel or CLIPVisionModelWithProjection, "
                   "saved with save_pretrained) and its CLIPImageProcessor; the paper's "
                   "CLIPFrame uses a ViT CLIP (e.g. openai/clip-vit-large-patch14 saved locally)",
    )
    batch_size: int = constrained(64, gt=0, help="frames per CLIP forward pass")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = constrained(
        "float32", help="CLIP weights/activations; auto: float16 on cuda, float32 on cpu "
                        "(float32 default: reported numbers should not depend on the device)",
    )

    def build(self, device: torch.device | str = "cpu", allow_random_init: bool = False,
              key: str = f"{CONFIG_KEY}.clip") -> ClipFrame:
        """The metric with its CLIP loaded (errors name ``key.path`` and the fix)."""
        if not self.path and allow_random_init:
            folder, suffix = random_model_dir("build_tiny_clip"), " (random init)"
        else:
            folder = require_model_dir(f"{key}.path", self.path, "a CLIP model",
                                       "build_tiny_clip")
            suffix = ""
        embedder = ClipEmbedder(*load_clip(folder, device, self.dtype))
        return ClipFrame(embedder, name=f"CLIP ({folder.name}){suffix}",
                         batch_size=self.batch_size)


class ClipFrame:
    """``clipframe(video) -> float``; ``name`` says which CLIP computed it."""

    def __init__(self, embedder: ClipEmbedder, name: str, batch_size: int = 64) -> None:
        self.embedder, self.name, self.batch_size = embedder, name, batch_size

    def embeddings(self, video: VideoLike) -> torch.Tensor:
        """``[T, D]`` L2-normalised CLIP image embeddings of every frame."""
        frames = to_uint8(video)
        return torch.from_numpy(self.embedder.embed_frames(frames, self.batch_size))

    def __call__(self, video: VideoLike) -> float | None:
        """Mean cosine similarity of consecutive frames; None for a one-frame video."""
        _, mean = temporal_consistency(self.embeddings(video).numpy())
        return mean


def _scorer(clipframe: ClipFrame) -> PerItemScorer:
    return PerItemScorer(clipframe.name, lambda batch: [clipframe(v) for v in batch.videos])


CLIPFRAME = Metric(name="clipframe", label="CLIPFrame", decimals=3, higher_is_better=True,
                   section="clip", build=_scorer)

__all__ = ["CLIPFRAME", "ClipFrame", "ClipFrameConfig"]
