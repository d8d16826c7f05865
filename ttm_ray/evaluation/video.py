"""The one input convention every metric takes, and the conversions to what each model eats.

A *video* given to :mod:`ttm_ray.evaluation` is one of

* an array ``[T, H, W, 3]``, channel-last RGB, numpy or torch (any device):
  ``uint8`` in 0..255, or floating point in [0, 1];
* a path / URI string of a video file (decoded whole with :mod:`ttm_ray.dataset.video`).

Channel-first tensors and [-1, 1] floats are rejected rather than guessed at: a wrong guess
would silently produce plausible-looking but wrong metrics. Internally a metric asks for
either :func:`to_uint8` (what HF image processors take) or :func:`to_float` (``float32
[T, 3, H, W]`` in [0, 1], what torch models take).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: Anything :func:`to_uint8` / :func:`to_float` accept.
VideoLike = Any

# Float videos may carry rounding noise just outside [0, 1] (e.g. a VAE decode + clamp in
# another dtype); anything further out is a different convention, not noise.
_FLOAT_SLACK = 1e-3


def load_video(uri: str) -> np.ndarray:
    """All frames of a video file as ``uint8 [T, H, W, 3]``."""
    from ttm_ray.dataset.video import Video

    with Video(uri) as video:
        return video.read(list(range(video.info.num_frames)))


def _check(x: np.ndarray | torch.Tensor, name: str) -> None:
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[-1] != 3:
        hint = (" (channel-first? permute to [T, H, W, 3])"
                if len(shape) == 4 and shape[1] == 3 else "")
        raise ValueError(f"{name}: expected a [T, H, W, 3] RGB video, got shape {shape}{hint}")
    if shape[0] < 1:
        raise ValueError(f"{name}: the video has no frames")


def _float_range_check(lo: float, hi: float, name: str) -> None:
    if lo < -_FLOAT_SLACK or hi > 1 + _FLOAT_SLACK:
        raise ValueError(f"{name}: float videos must be in [0, 1], got values in "
                         f"[{lo:.3g}, {hi:.3g}] (for [-1, 1] use (x + 1) / 2; for 0..255 "
                         "pass uint8)")


def to_uint8(video: VideoLike, name: str = "video") -> np.ndarray:
    """``uint8 [T, H, W, 3]`` numpy (floats in [0, 1] are scaled and rounded)."""
    if isinstance(video, str):
        return load_video(video)
    if isinstance(video, torch.Tensor):
        _check(video, name)
        if video.dtype == torch.uint8:
            return video.cpu().numpy()
        x = video.detach().float()
        _float_range_check(float(x.min()), float(x.max()), name)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    arr = np.asarray(video)
    _check(arr, name)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float frames, got dtype {arr.dtype}")
    _float_range_check(float(arr.min()), float(arr.max()), name)
    return np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)


def to_float(video: VideoLike, device: torch.device | str = "cpu",
             name: str = "video") -> torch.Tensor:
    """``float32 [T, 3, H, W]`` in [0, 1] on ``device``."""
    if isinstance(video, str):
        video = load_video(video)
    x = video if isinstance(video, torch.Tensor) else torch.from_numpy(np.asarray(video))
    _check(x, name)
    x = x.to(device)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    elif x.is_floating_point():
        x = x.float()
        _float_range_check(float(x.min()), float(x.max()), name)
        x = x.clamp(0, 1)
    else:
        raise ValueError(f"{name}: expected uint8 or float frames, got dtype {x.dtype}")
    return x.permute(0, 3, 1, 2).contiguous()


def shrink_to_short_side(frames: np.ndarray, short: int) -> np.ndarray:
    """``frames`` (``[T, H, W, 3]``) downscaled, aspect kept, so the shorter side is ``short``
    (smaller frames are returned as they are).

    HF processors would resize too, one PIL image at a time; an antialiased batched torch
    resize first leaves them only the crop and normalisation, with the same geometry.
    """
    from ttm_ray.dataset.video import resize_center_crop

    h, w = frames.shape[1:3]
    if min(h, w) <= short:
        return frames
    scale = short / min(h, w)
    return resize_center_crop(frames, max(short, round(h * scale)), max(short, round(w * scale)))


def uniform_indices(num_frames: int, wanted: int) -> list[int]:
    """``wanted`` frame indices spread evenly over ``num_frames`` (first and last included);
    a shorter video repeats frames, so every model still gets the frame count it was built
    for."""
    if num_frames < 1 or wanted < 1:
        raise ValueError(f"need at least one frame, got {num_frames} of {wanted}")
    if wanted == 1:
        return [0]
    return [round(i * (num_frames - 1) / (wanted - 1)) for i in range(wanted)]


__all__ = ["VideoLike", "load_video", "shrink_to_short_side", "to_float", "to_uint8",
           "uniform_indices"]
