"""ViCLIP-T (text-video similarity) and ViCLIP-V (video vs reference video similarity).

The paper scores with ViCLIP (InternVid), whose weights are not a transformers model. The
backbone therefore sits behind :class:`VideoTextEncoder` (``encode_video``, ``encode_text``:
``[N, D]`` embeddings) and the default is an X-CLIP model (``transformers.XCLIPModel`` +
``XCLIPProcessor``) loaded from a local folder, named in results as "X-CLIP (stand-in for
ViCLIP)": its numbers are *not* comparable to the paper's. A real ViCLIP plugs in by
implementing the protocol and passing it to :class:`ViClip`.

* ViCLIP-V: cosine similarity of the generated video's embedding and the reference video's.
* ViCLIP-T: cosine similarity of the video's and the caption's embeddings, unless the
  encoder has ``paired_text_similarity(videos, texts)`` (X-CLIP does): X-CLIP was trained to
  score text *after* its video-specific prompt generator adapts the text embedding to the
  video, so a stand-in is used the way it was trained.

Frames: the encoder's own frame count (X-CLIP's ``vision_config.num_frames``, 8 for the
public checkpoints, as ViCLIP) sampled uniformly over the whole video.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ttm_ray.config import constrained
from ttm_ray.evaluation.clip_embed import processor_short_side, quiet_transformers
from ttm_ray.evaluation.metric import Metric, PerItemScorer
from ttm_ray.evaluation.video import VideoLike, shrink_to_short_side, to_uint8, uniform_indices
from ttm_ray.evaluation.weights import (
    CONFIG_KEY,
    random_model_dir,
    require_model_dir,
    resolve_device,
)

STAND_IN = "X-CLIP (stand-in for ViCLIP)"


@runtime_checkable
class VideoTextEncoder(Protocol):
    """A joint video-text embedding model (ViCLIP, X-CLIP, ...)."""

    name: str

    def encode_video(self, videos: Sequence[VideoLike]) -> torch.Tensor:
        """``[N, D]`` embeddings of ``N`` videos (any frame count; see the module doc)."""
        ...

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` embeddings of ``N`` texts, in the same space as the videos."""
        ...


def _pooled(out: Any) -> torch.Tensor:
    """The projected features of ``get_video_features``/``get_text_features``: transformers
    5.x returns an output whose ``pooler_output`` holds them, earlier releases the tensor."""
    return (out.pooler_output if hasattr(out, "pooler_output") else out).float()


class XClipEncoder:
    """:class:`VideoTextEncoder` over a ``transformers.XCLIPModel`` + ``XCLIPProcessor``."""

    def __init__(self, model: Any, processor: Any, name: str, batch_size: int = 8) -> None:
        self.model, self.processor, self.name = model, processor, name
        self.batch_size = batch_size
        self.num_frames = int(model.config.vision_config.num_frames)
        self.short = processor_short_side(processor.image_processor)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, batch_size: int = 8,
                        name: str | None = None) -> XClipEncoder:
        from transformers import XCLIPModel, XCLIPProcessor

        with quiet_transformers():
            model = XCLIPModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        processor = XCLIPProcessor.from_pretrained(path, local_files_only=True)
        model = model.to(resolve_device(str(device))).eval()
        return cls(model, processor, name or f"{STAND_IN}: {Path(path).name}", batch_size)

    def _pixels(self, videos: Sequence[VideoLike]) -> torch.Tensor:
        """``[N, num_frames, 3, S, S]`` processor output."""
        clips = []
        for i, v in enumerate(videos):
            frames = to_uint8(v, name=f"video[{i}]")
            frames = shrink_to_short_side(frames[uniform_indices(len(frames), self.num_frames)],
                                          self.short)
            clips.append(list(frames))
        pixels = self.processor(videos=clips, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.processor(text=list(texts), padding=True, truncation=True,
                                return_tensors="pt")
        return {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def encode_video(self, videos: Sequence[VideoLike]) -> torch.Tensor:
        step = self.batch_size
        out = [_pooled(self.model.get_video_features(pixel_values=self._pixels(videos[i:i + step])))
               for i in range(0, len(videos), step)]
        return torch.cat(out).cpu() if out else torch.zeros(0, self._dim())

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        step = self.batch_size
        out = [_pooled(self.model.get_text_features(**self._tokens(texts[i:i + step])))
               for i in range(0, len(texts), step)]
        return torch.cat(out).cpu() if out else torch.zeros(0, self._dim())

    @torch.inference_mode()
    def paired_text_similarity(self, videos: Sequence[VideoLike], texts: Sequence[str]
                               ) -> torch.Tensor:
        """``[N]`` cosine similarity of video i and text i, with X-CLIP's video-specific
        prompting (its full forward; ``logits / logit_scale``)."""
        sims = []
        for i in range(0, len(videos), self.batch_size):
            out = self.model(pixel_values=self._pixels(videos[i:i + self.batch_size]),
                             **self._tokens(texts[i:i + self.batch_size]))
            # text_embeds [B, B, D]: every text adapted to every video; keep the pairs.
            pairs = torch.arange(out.video_embeds.shape[0], device=out.video_embeds.device)
            text = out.text_embeds[pairs, pairs].float()
            sims.append(F.cosine_similarity(out.video_embeds.float(), text, dim=-1))
        return torch.cat(sims).cpu() if sims else torch.zeros(0)

    def _dim(self) -> int:
        return int(self.model.config.projection_dim)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).numpy()


class ViClip:
    """ViCLIP-T and ViCLIP-V over any :class:`VideoTextEncoder`."""

    def __init__(self, encoder: VideoTextEncoder) -> None:
        if not isinstance(encoder, VideoTextEncoder):
            raise TypeError(f"{type(encoder).__name__} does not implement VideoTextEncoder "
                            "(name, encode_video, encode_text)")
        self.encoder = encoder

    @property
    def name(self) -> str:
        return self.encoder.name

    def text_similarity(self, videos: Sequence[VideoLike], texts: Sequence[str]) -> np.ndarray:
        """ViCLIP-T: ``[N]`` similarity of video i and its caption i."""
        if len(videos) != len(texts):
            raise ValueError(f"{len(videos)} videos but {len(texts)} captions")
        paired = getattr(self.encoder, "paired_text_similarity", None)
        if callable(paired):
            return paired(videos, texts).double().numpy()
        return _cosine(self.encoder.encode_video(videos), self.encoder.encode_text(texts))

    def video_similarity(self, videos: Sequence[VideoLike], references: Sequence[VideoLike]
                         ) -> np.ndarray:
        """ViCLIP-V: ``[N]`` similarity of video i and reference video i."""
        if len(videos) != len(references):
            raise ValueError(f"{len(videos)} videos but {len(references)} references")
        return _cosine(self.encoder.encode_video(videos), self.encoder.encode_video(references))


@dataclass
class ViClipConfig:
    backbone: Literal["xclip"] = constrained(
        "xclip", help="xclip: transformers XCLIPModel as a stand-in for ViCLIP (not on HF "
                      "transformers); a real ViCLIP plugs in as a VideoTextEncoder in code",
    )
    path: str | None = constrained(
        None, help="local folder of an XCLIPModel + XCLIPProcessor saved with "
                   "save_pretrained (e.g. microsoft/xclip-base-patch32)",
    )
    batch_size: int = constrained(8, gt=0, help="videos (or captions) per forward pass")
    dtype: Literal["float32", "float16", "bfloat16"] = constrained(
        "float32", help="weights/activations of the video-text model")

    def build(self, device: torch.device | str = "cpu", allow_random_init: bool = False,
              key: str = f"{CONFIG_KEY}.viclip") -> ViClip:
        if not self.path and allow_random_init:
            folder = random_model_dir("build_tiny_xclip")
            name = f"{STAND_IN}: {folder.name} (random init)"
        else:
            folder = require_model_dir(f"{key}.path", self.path, "an X-CLIP model",
                                       "build_tiny_xclip")
            name = None
        encoder = XClipEncoder.from_pretrained(folder, device, getattr(torch, self.dtype),
                                               self.batch_size, name=name)
        return ViClip(encoder)


def _text_scorer(viclip: ViClip) -> PerItemScorer:
    return PerItemScorer(viclip.name, lambda batch: [
        float(s) for s in viclip.text_similarity(batch.videos, batch.captions)])


def _video_scorer(viclip: ViClip) -> PerItemScorer:
    return PerItemScorer(viclip.name, lambda batch: [
        float(s) for s in viclip.video_similarity(batch.videos, batch.references)])


# Both read the one model of the `viclip` section (loaded once for the two).
VICLIP_T = Metric(name="viclip_t", label="ViCLIP-T", decimals=3, higher_is_better=True,
                  section="viclip", build=_text_scorer, needs_caption=True)
VICLIP_V = Metric(name="viclip_v", label="ViCLIP-V", decimals=3, higher_is_better=True,
                  section="viclip", build=_video_scorer, needs_reference=True)

__all__ = ["STAND_IN", "VICLIP_T", "VICLIP_V", "ViClip", "ViClipConfig", "VideoTextEncoder",
           "XClipEncoder"]
