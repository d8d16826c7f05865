"""Two-stage image-to-video generation (appendix sec. 9):

    x0, s0, c_motion  --stage 1-->  trajectory s-hat  --stage 2 (+ c, c_local)-->  video

Stage 1 samples the colour-coded trajectory video from the image x0, its first-frame
segmentation s0 and the motion prompt; the sample is mapped back to per-object masks by
nearest colour (:func:`~ttm_ray.conditioning.trajectory.trajectory_to_object_ids`) and
re-rendered with the exact colours. Stage 2 samples the video from x0, that trajectory, the
caption and one local prompt per object, the masks giving the token ids of its masked
attention. A user-supplied trajectory skips stage 1.

The conditions go through :meth:`Encoders.conditions`, the call training makes, and each stage
uses the encoders, objective and guidance its run was trained with (:class:`StageModel`).
Images and masks are brought to each stage's pixel size with the shared resize + centre-crop
rule, so stages of different resolutions compose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ttm_ray.conditioning.encoders import from_model_video, to_model_video
from ttm_ray.conditioning.masks import trajectory_token_ids
from ttm_ray.conditioning.trajectory import (
    render_trajectory,
    resize_masks,
    trajectory_to_object_ids,
)
from ttm_ray.dataset.video import resize_center_crop
from ttm_ray.inference.config import GenerationConfig
from ttm_ray.inference.stage_model import StageModel, resolve_device


@dataclass
class ObjectPrompt:
    """One animated object: its grounding name, its local prompt and its trajectory colour."""

    name: str
    prompt: str
    color_index: int


@dataclass
class GenerationInput:
    """Everything generation conditions on, at the image's own resolution.

    ``first_masks``: s0, ``bool [K, H, W]`` in ``objects`` order (needed by stage 1).
    ``trajectory``: ``bool [K, T, H, W]`` in ``objects`` order: a given trajectory (user, GT,
    noised GT) that skips stage 1.
    """

    item_id: str
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    c_motion: str
    objects: list[ObjectPrompt]
    first_masks: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)  # provenance for the record

    def check(self) -> None:
        """Shapes and required fields; ValueError naming the item."""
        def fail(msg: str) -> None:
            raise ValueError(f"item {self.item_id!r}: {msg}")

        if self.image.ndim != 3 or self.image.shape[-1] != 3 or self.image.dtype != np.uint8:
            fail(f"image must be uint8 [H, W, 3], got {self.image.dtype} {self.image.shape}")
        if not self.objects:
            fail("no objects: stage 2 needs at least one object mask and local prompt")
        h, w = self.image.shape[:2]
        k = len(self.objects)
        if self.trajectory is None:
            if self.first_masks is None:
                fail("neither a trajectory nor first-frame masks (s0) were given")
            elif self.first_masks.shape != (k, h, w):
                fail(f"first_masks must be [K={k}, {h}, {w}], got {self.first_masks.shape}")
            if not self.c_motion.strip():
                fail("empty motion prompt (c_motion): stage 1 conditions on it")
        elif self.trajectory.ndim != 4 or self.trajectory.shape[0] != k \
                or self.trajectory.shape[2:] != (h, w):
            fail(f"trajectory must be [K={k}, T, {h}, {w}], got {self.trajectory.shape}")
        if not self.caption.strip():
            fail("empty caption: stage 2 conditions on it")


@dataclass
class GenerationOutput:
    """A generated clip at stage 2's resolution, and what made it."""

    item_id: str
    video: np.ndarray  # uint8 [T, H, W, 3]
    trajectory: np.ndarray  # uint8 [T, H, W, 3], the rendered trajectory stage 2 used
    masks: np.ndarray  # bool [K, T, H, W]
    image: np.ndarray  # uint8 [H, W, 3]: x0 at stage 2's size
    stage1_ran: bool
    seconds: dict[str, float]
    record: dict[str, Any]


def _resample_time(masks: np.ndarray, frames: int) -> np.ndarray:
    """``[K, T, H, W]`` -> ``[K, frames, H, W]`` by nearest frame (stage 1 and stage 2 may
    have been trained with different clip lengths)."""
    if masks.shape[1] == frames:
        return masks
    pick = np.linspace(0, masks.shape[1] - 1, frames).round().astype(int)
    return masks[:, pick]


def fit_masks(masks: np.ndarray, frames: int, height: int, width: int) -> np.ndarray:
    """Object masks ``[K, T, H, W]`` at any size -> ``[K, frames, height, width]``, mapped like
    frames (resize to cover, centre-crop, >= 50% coverage)."""
    masks = _resample_time(np.asarray(masks, dtype=bool), frames)
    return np.stack([resize_masks(m, height, width) for m in masks])


class TwoStageGenerator:
    """Loads the two stages once; :meth:`generate` turns one input into one clip."""

    def __init__(self, cfg: GenerationConfig, load_stage1: bool = True) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        dtype = getattr(torch, cfg.dtype)
        self.stage1 = (StageModel(cfg.stage1, 1, "generation.stage1", self.device, dtype)
                       if load_stage1 else None)
        self.stage2 = StageModel(cfg.stage2, 2, "generation.stage2", self.device, dtype)

    # ------------------------------------------------------------------ stages
    def _image_latent(self, stage: StageModel, image: np.ndarray) -> tuple[np.ndarray,
                                                                           torch.Tensor]:
        x0 = resize_center_crop(image, stage.height, stage.width)
        latent = stage.encoders.autoencoder.encode_image(
            to_model_video([x0[None]], self.device))
        return x0, latent

    def trajectory(self, inp: GenerationInput, generator: torch.Generator) -> np.ndarray:
        """Stage 1: ``bool [K, T, H, W]`` object masks at stage 1's size."""
        stage = self.stage1
        if stage is None:
            raise ValueError(f"item {inp.item_id!r}: no trajectory given and stage 1 was not "
                             "loaded (generation.stage1.export)")
        assert inp.first_masks is not None
        colours = [o.color_index for o in inp.objects]
        _, x0_latent = self._image_latent(stage, inp.image)
        s0_masks = fit_masks(inp.first_masks[:, None], 1, stage.height, stage.width)
        s0 = render_trajectory(list(s0_masks), colours)
        ae = stage.encoders.autoencoder
        s0_latent = ae.encode_image(to_model_video([s0], self.device))
        cond = stage.encoders.conditions(1, stage.model_cfg.num_frames, x0_latent, s0_latent,
                                         [inp.c_motion], names=[f"item {inp.item_id!r}"],
                                         frames=stage.model_cfg.condition_frames)
        latent = stage.sample(cond, generator)
        rgb = from_model_video(ae.decode(latent.to(ae.dtype or latent.dtype))[0])
        ids = trajectory_to_object_ids(rgb, colours)
        return np.stack([ids == c for c in colours])

    def video(self, inp: GenerationInput, masks: np.ndarray, generator: torch.Generator
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Stage 2: ``(video, trajectory, masks, x0)`` at stage 2's size."""
        stage = self.stage2
        ae = stage.encoders.autoencoder
        colours = [o.color_index for o in inp.objects]
        masks = fit_masks(masks, stage.frames, stage.height, stage.width)
        trajectory = render_trajectory(list(masks), colours)
        x0, x0_latent = self._image_latent(stage, inp.image)
        s_latent = ae.encode(to_model_video([trajectory], self.device))
        ids = trajectory_token_ids(list(masks), colours, stage.token_grid,
                                   time_factor=ae.factors[0], causal=ae.causal,
                                   rule=stage.cfg.mask_rule,
                                   threshold=stage.cfg.mask_threshold)
        cond = stage.encoders.conditions(
            2, stage.model_cfg.num_frames, x0_latent, s_latent, [inp.caption],
            local_prompts=[[o.prompt for o in inp.objects]], local_ids=[colours],
            token_ids=ids[None], names=[f"item {inp.item_id!r}"],
            frames=stage.model_cfg.condition_frames)
        latent = stage.sample(cond, generator)
        video = from_model_video(ae.decode(latent.to(ae.dtype or latent.dtype))[0])
        return video, trajectory, masks, x0

    # ------------------------------------------------------------------ one item
    def generate(self, inp: GenerationInput) -> GenerationOutput:
        inp.check()
        seconds: dict[str, float] = {}
        # One CPU generator per item: the same seed gives the same clip on any device.
        generator = torch.Generator().manual_seed(int(inp.seed))
        start = time.perf_counter()
        ran_stage1 = inp.trajectory is None
        masks = self.trajectory(inp, generator) if ran_stage1 else inp.trajectory
        seconds["stage1"] = time.perf_counter() - start
        video, trajectory, masks, x0 = self.video(inp, masks, generator)
        seconds["stage2"] = time.perf_counter() - start - seconds["stage1"]
        record = {
            "item_id": inp.item_id, "seed": int(inp.seed), "caption": inp.caption,
            "c_motion": inp.c_motion,
            "objects": [{"name": o.name, "prompt": o.prompt, "color_index": o.color_index}
                        for o in inp.objects],
            "trajectory_source": "stage1" if ran_stage1 else
            inp.notes.get("trajectory_source", "given"),
            "stage1": self.stage1.describe() if ran_stage1 and self.stage1 else None,
            "stage2": self.stage2.describe(), "device": str(self.device),
            "dtype": self.cfg.dtype, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            **({"notes": inp.notes} if inp.notes else {}),
        }
        return GenerationOutput(inp.item_id, video, trajectory, masks, x0, ran_stage1,
                                seconds, record)


__all__ = ["GenerationInput", "GenerationOutput", "ObjectPrompt", "TwoStageGenerator",
           "fit_masks"]
