"""Segment: SAM2 turns the first-frame boxes into one mask per object per sampled frame.

Second half of the paper's recipe (``ground.py`` is the first): every box of ``boxes`` is a
SAM2 prompt on the clip's first sampled frame (object id = index in ``boxes``), and SAM2's
video predictor propagates the masks through all sampled frames. Output, per object in
``boxes`` order: one COCO RLE per sampled frame at *source* resolution, in ``masks``
(``color_index`` = position in ``masks``), with ``mask_source="sam2"`` and ``mask_model``.

Frames from memory: sam2 1.1.0's ``init_state`` only takes an mp4 path or a JPEG folder.
:func:`init_state_from_frames` builds the same inference state from frames already decoded
with :func:`~ttm_ray.dataset.video.read_frames` (the clip's *sampled* frames, not the whole
source video), so nothing is written to disk. It mirrors ``init_state`` key for key; a test
compares the two on a JPEG folder, so a sam2 upgrade that changes the state fails loudly.

Long clips: the predictor keeps every frame's image tensor and outputs in its state, so a
clip is tracked in *windows* of at most ``window`` frames. Consecutive windows share one frame:
the next window starts on the last frame of the previous one, prompted with the masks SAM2
produced there (``add_new_mask``), and that shared frame is written once. Memory is bounded by
the window; the price is that SAM2's memory restarts at each window boundary (it then
remembers the carried masks, not the original box prompt). An object whose mask is empty at a
boundary is carried as an empty mask: SAM2 then treats it as absent, so it may stay lost for
the rest of the clip. The default window (64) covers the U-Net's 16-frame clips and cuts the
DiT's 128-frame clips into 3 windows.

Track confidence: per object, the mean over sampled frames of ``sigmoid(object_score_logits)``
(SAM2's "object is present" score). :func:`track_objects` returns it; the stage writes it to
``object_scores[].track_confidence`` (the other score fields null: the score stage fills them
and keeps this one).

Objects whose mask is empty in every frame leave ``masks`` and go to ``dropped_objects``
(reason ``empty_mask``); ``boxes`` stays the grounding result. Rejects: ``segmentation_failed``
(no boxes, every mask empty: permanent); an exception while tracking takes the shared reason
of :func:`~data_prep.rows.reason_for` (frames that do not read: ``unreadable_input`` /
``unreadable_video`` / ``remote_read_error``; CUDA out of memory: ``out_of_memory``; anything
else, SAM2 raising included: ``stage_error`` with the traceback; the last two transient).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data_prep.rows import free_cuda_memory, map_rows, reject
from data_prep.stages.ground import resolve_device
from ttm_ray.config import constrained
from ttm_ray.dataset.rle import Rle, encode_masks
from ttm_ray.dataset.video import Video, read_frames

log = logging.getLogger(__name__)

STAGE = "segment"
CONFIG_KEY = "segment"  # where SegmentConfig sits in the prep config (for error messages)
# SAM2's image normalisation (sam2.utils.misc.load_video_frames defaults).
IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)
_RESIZE_CHUNK = 16  # frames resized at once (bounds the float copy of 1080p frames)

ReadFrames = Callable[[str, Sequence[int]], np.ndarray]


@dataclass
class SegmentConfig:
    sam2_config: str = constrained(
        "configs/sam2.1/sam2.1_hiera_t.yaml", nonempty=True,
        help="SAM2 model config, a name inside the sam2 package (configs/sam2.1/...yaml)")
    checkpoint: str | None = constrained(
        None, help="local SAM2 checkpoint (.pt) matching sam2_config; required unless "
        "allow_random_weights")
    allow_random_weights: bool = constrained(
        False, help="run without a checkpoint (random weights: tests and the tiny quickstart "
        "only; the masks are meaningless)")
    model_name: str | None = constrained(
        None, help="recorded in mask_model; null: sam2:<config>@<image_size>:<checkpoint>")
    image_size: int = constrained(
        1024, ge=64, help="SAM2 input size (its checkpoints are trained at 1024; smaller is "
        "faster and coarser); a multiple of 32")
    device: str = constrained(
        "auto", nonempty=True, help="torch device (cpu, cuda, cuda:1); auto: cuda if available")
    dtype: Literal["auto", "float32", "bfloat16"] = constrained(
        "auto", help="autocast dtype; auto: bfloat16 on cuda (SAM2's own demo setting), "
        "float32 on cpu")
    window: int = constrained(
        64, ge=2, help="max sampled frames per propagation window; longer clips are tracked "
        "in windows sharing one frame, the masks carried over as prompts")
    mask_threshold: float = constrained(
        0.0, help="mask logit threshold (SAM2's own is 0.0)")
    non_overlap_masks: bool = constrained(
        False, help="give each pixel to at most one object (the highest-scoring)")
    offload_video_to_cpu: bool = constrained(
        False, help="keep a window's preprocessed frames in CPU memory (saves GPU memory)")

    def validate(self) -> None:
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")

    def require_checkpoint(self) -> Path | None:
        """The checkpoint path (None with random weights), or a ValueError naming the key."""
        key = f"{CONFIG_KEY}.checkpoint"
        if self.checkpoint is None:
            if self.allow_random_weights:
                return None
            raise ValueError(
                f"{key} is not set: give a local SAM2 checkpoint matching {self.sam2_config!r} "
                f"(e.g. sam2.1_hiera_tiny.pt); {CONFIG_KEY}.allow_random_weights: true runs "
                f"without one (tests only: the masks are meaningless)")
        path = Path(self.checkpoint).expanduser()
        if not path.is_file():
            raise ValueError(f"{key}: {str(path)!r} is not a file")
        return path

    def mask_model(self) -> str:
        if self.model_name:
            return self.model_name
        weights = Path(self.checkpoint).name if self.checkpoint else "random-weights"
        return f"sam2:{Path(self.sam2_config).stem}@{self.image_size}:{weights}"


# ----------------------------------------------------------------------------- SAM2 glue
def build_predictor(cfg: SegmentConfig) -> Any:
    """SAM2's video predictor for ``cfg``, in eval mode on ``cfg.device``."""
    import sam2.sam2_video_predictor as video_predictor
    from sam2.build_sam import build_sam2_video_predictor
    from tqdm import tqdm

    checkpoint = cfg.require_checkpoint()
    side = cfg.image_size // 16  # memory attention works on the stride-16 feature map
    overrides = [
        f"++model.image_size={cfg.image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{side},{side}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{side},{side}]",
    ]
    predictor = build_sam2_video_predictor(
        cfg.sam2_config, ckpt_path=str(checkpoint) if checkpoint else None,
        device=resolve_device(cfg.device), hydra_overrides_extra=overrides)
    predictor.non_overlap_masks = cfg.non_overlap_masks
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        # Without the CUDA extension hole filling is skipped with a warning on every frame.
        predictor.fill_hole_area = 0
    # propagate_in_video opens a tqdm bar per window: thousands of bars in the Ray logs.
    video_predictor.tqdm = functools.partial(tqdm, disable=True)
    return predictor


def preprocess_frames(frames: np.ndarray, image_size: int, device: Any) -> Any:
    """``[T, H, W, 3]`` uint8 -> ``[T, 3, S, S]`` float32, resized and normalised as SAM2's
    frame loaders do (aspect ratio *not* kept: SAM2 squashes frames to a square)."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(IMG_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMG_STD, device=device).view(1, 3, 1, 1)
    out = torch.empty((len(frames), 3, image_size, image_size), device=device)
    for i in range(0, len(frames), _RESIZE_CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + _RESIZE_CHUNK])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (image_size, image_size):
            # Bicubic with antialiasing: what PIL's resize in sam2's JPEG loader does.
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic",
                              antialias=True, align_corners=False).clamp_(0.0, 1.0)
        out[i:i + len(x)] = (x - mean) / std
    return out


def init_state_from_frames(predictor: Any, images: Any, video_height: int, video_width: int,
                           offload_video_to_cpu: bool = False,
                           offload_state_to_cpu: bool = False) -> dict:
    """SAM2's ``init_state`` for frames already in memory (``images``: the output of
    :func:`preprocess_frames`). Mirrors sam2 1.1.0 ``SAM2VideoPredictor.init_state``."""
    import torch

    device = predictor.device
    images = images.cpu() if offload_video_to_cpu else images.to(device)
    state: dict[str, Any] = {
        "images": images,
        "num_frames": len(images),
        "offload_video_to_cpu": offload_video_to_cpu,
        "offload_state_to_cpu": offload_state_to_cpu,
        "video_height": int(video_height),
        "video_width": int(video_width),
        "device": device,
        "storage_device": torch.device("cpu") if offload_state_to_cpu else device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }
    with torch.inference_mode():
        # As init_state: warm up the backbone and cache frame 0's features.
        predictor._get_image_feature(state, frame_idx=0, batch_size=1)
    return state


def _object_score(state: dict, obj_idx: int, frame_idx: int) -> float:
    """SAM2's presence logit of one object on one frame of the current window."""
    outputs = state["output_dict_per_obj"][obj_idx]
    out = outputs["cond_frame_outputs"].get(frame_idx)
    if out is None:
        out = outputs["non_cond_frame_outputs"][frame_idx]
    return float(out["object_score_logits"].float().reshape(-1)[0])


@dataclass
class Tracks:
    """What :func:`track_objects` found for each object (in prompt order)."""

    rles: list[list[Rle]]  # per object: one RLE per sampled frame, source resolution
    areas: list[list[int]]  # per object: mask pixels per sampled frame
    track_confidence: list[float]  # per object: mean sigmoid(object_score_logits) over frames
    height: int
    width: int


def track_objects(predictor: Any, read_window: Callable[[int, int], np.ndarray],
                  num_frames: int, boxes: Sequence[Sequence[float]], *, window: int = 64,
                  mask_threshold: float = 0.0, offload_video_to_cpu: bool = False,
                  autocast_dtype: Any = None) -> Tracks:
    """Track ``boxes`` (prompts on frame 0, source pixels x0,y0,x1,y1) through ``num_frames``.

    ``read_window(start, end)`` returns sampled frames ``start..end-1`` as ``[n, H, W, 3]``
    uint8. Windows of ``window`` frames share their boundary frame (see the module doc).
    The inference state is released after every window, also on errors.
    """
    import torch

    if window < 2:
        raise ValueError(f"window must be >= 2 (windows share a frame), got {window}")
    n_obj = len(boxes)
    rles: list[list[Rle]] = [[] for _ in range(n_obj)]
    areas: list[list[int]] = [[] for _ in range(n_obj)]
    presence: list[list[float]] = [[] for _ in range(n_obj)]
    device = predictor.device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    carry: np.ndarray | None = None  # [n_obj, H, W] masks on the first frame of this window
    height = width = 0
    start = 0
    with torch.inference_mode(), autocast:
        while True:
            end = min(start + window, num_frames)
            frames = read_window(start, end)
            height, width = int(frames.shape[1]), int(frames.shape[2])
            images = preprocess_frames(frames, predictor.image_size, device)
            del frames
            state = init_state_from_frames(predictor, images, height, width,
                                           offload_video_to_cpu=offload_video_to_cpu)
            del images
            try:
                for k in range(n_obj):
                    if carry is None:
                        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=k,
                                                        box=list(map(float, boxes[k])))
                    else:
                        predictor.add_new_mask(state, frame_idx=0, obj_id=k, mask=carry[k])
                last = None
                for frame_idx, _, logits in predictor.propagate_in_video(state):
                    masks = (logits[:, 0] > mask_threshold).cpu().numpy()
                    last = masks
                    if carry is not None and frame_idx == 0:
                        continue  # the previous window's last frame: already written
                    for k, rle in enumerate(encode_masks(masks)):
                        rles[k].append(rle)
                        areas[k].append(int(masks[k].sum()))
                        presence[k].append(_object_score(state, k, frame_idx))
                carry = last
            finally:
                predictor.reset_state(state)
                state.clear()  # drop the image tensor and cached features now
            if end >= num_frames:
                break
            start = end - 1
    # sigmoid as 0.5 * (1 + tanh(x / 2)): no overflow for SAM2's -1024 "no object" logits.
    confidence = [float(np.mean(0.5 * (1.0 + np.tanh(np.asarray(p) / 2.0)))) if p else 0.0
                  for p in presence]
    return Tracks(rles, areas, confidence, height, width)


# ----------------------------------------------------------------------------- the stage
class SegmentStage:
    """Rows with ``boxes`` -> rows with ``masks`` (+ ``mask_source``, ``mask_model``,
    ``object_scores`` holding ``track_confidence``), or a reject."""

    def __init__(self, cfg: SegmentConfig, read_frames_fn: ReadFrames | None = None,
                 predictor: Any = None) -> None:
        """``read_frames_fn(uri, indices)``: how frames are decoded (tests inject failures);
        by default :func:`~ttm_ray.dataset.video.read_frames`. ``predictor``: an already
        built SAM2 video predictor to reuse (built from ``cfg`` by default)."""
        import torch

        self.cfg = cfg
        self.read_frames = read_frames_fn or read_frames
        self.predictor = predictor if predictor is not None else build_predictor(cfg)
        self.mask_model = cfg.mask_model()
        on_cuda = self.predictor.device.type == "cuda"
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_cuda else "float32")
        self.autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None

    def __call__(self, rows: list[dict]) -> list[dict]:
        return map_rows(rows, STAGE, self._segment)

    def _segment(self, row: dict) -> dict:
        boxes = row.get("boxes")
        indices = list(row.get("frame_indices") or [])
        if boxes is None or not indices or not row.get("source_uri"):
            return reject(row, STAGE, "stage_error",
                          "row has no boxes/frame_indices/source_uri: the clip and ground "
                          "(or gt_masks) stages must run first")
        if not boxes:
            return reject(row, STAGE, "segmentation_failed", "no boxes to track")
        uri = row["source_uri"]
        t0 = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                tracks = track_objects(
                    self.predictor, self._window_reader(stack, uri, indices), len(indices),
                    [b["box"] for b in boxes],
                    window=self.cfg.window, mask_threshold=self.cfg.mask_threshold,
                    offload_video_to_cpu=self.cfg.offload_video_to_cpu,
                    autocast_dtype=self.autocast_dtype)
        except Exception as exc:  # this row only: map_rows gives the shared reason
            free_cuda_memory(exc)
            raise
        log.debug("segment %s: %d objects x %d frames in %.2fs", row.get("clip_id"),
                  len(boxes), len(indices), time.perf_counter() - t0)
        return self._finish(row, boxes, tracks)

    def _window_reader(self, stack: contextlib.ExitStack, uri: str,
                       indices: list[int]) -> Callable[[int, int], np.ndarray]:
        """``read(start, end)``: the clip's sampled frames ``start..end-1``."""
        if self.read_frames is read_frames:
            # One open video for all windows: decord indexes the whole file on every open.
            video = stack.enter_context(Video(uri))
            return lambda s, e: video.read(indices[s:e])
        return lambda s, e: self.read_frames(uri, indices[s:e])

    def _finish(self, row: dict, boxes: list[dict], tracks: Tracks) -> dict:
        masks, scores = [], []
        dropped = list(row.get("dropped_objects") or [])
        for k, box in enumerate(boxes):
            if not any(tracks.areas[k]):
                dropped.append({"name": box["name"], "reason": "empty_mask"})
                continue
            masks.append({"name": box["name"], "color_index": len(masks), "rle": tracks.rles[k]})
            scores.append({"name": box["name"], "persistence": None, "centroid_motion": None,
                           "motion_iou_gap": None,
                           "track_confidence": tracks.track_confidence[k]})
        row = dict(row, masks=masks, mask_source="sam2", mask_model=self.mask_model,
                   object_scores=scores, dropped_objects=dropped)
        if not masks:
            return reject(row, STAGE, "segmentation_failed",
                          f"every mask is empty: {len(boxes)} objects x "
                          f"{len(tracks.areas[0]) if tracks.areas else 0} frames "
                          f"(mask_threshold {self.cfg.mask_threshold})")
        return row


__all__ = ["IMG_MEAN", "IMG_STD", "SegmentConfig", "SegmentStage", "Tracks", "build_predictor",
           "init_state_from_frames", "preprocess_frames", "track_objects"]
