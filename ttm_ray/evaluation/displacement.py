"""AD, average displacement: mean optical-flow magnitude between consecutive frames.

``AD = mean over pairs (t, t+1) and pixels of |flow_t|``, in pixels of the video as given
(the paper: 4.70 U-Net / 7.22 DiT on SA-V-128 single-object, at its generation resolution; AD
scales with resolution, so compare runs at the same one). Flow backends
(:class:`FlowEstimator`: two frame batches ``[B, 3, H, W]`` in [0, 1] -> ``[B, 2, H, W]``
flow ``(dx, dy)`` in input pixels, frame t's pixel moving to ``(x + dx, y + dy)`` in t+1):

* ``raft_large`` (default) / ``raft_small``: torchvision RAFT, weights from a local state
  dict. RAFT needs H and W divisible by 8 and at least 128 (its correlation pyramid): frames
  are **resized** (bilinear) to the nearest multiples of 8 no smaller than 128 (or first to
  ``size`` on the short side, for speed) and the flow is rescaled per axis (``dx * W / W'``,
  ``dy * H / H'``), so magnitudes stay in the input's pixels. Resizing rather than padding:
  one rule for every size, including videos below 128 px that padding could not serve.
* ``lucas_kanade``: dense pyramidal Lucas-Kanade in torch (Gaussian-windowed, iterative
  warping, out-of-frame samples masked) - the classical CPU fallback that needs no weights
  and is accurate to a few percent on textured motion; also what tests check against known
  translations (random RAFT weights give no meaningful flow).
* ``farneback``: OpenCV's Farneback, only if ``cv2`` is already installed (it is not a
  dependency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ttm_ray.config import constrained
from ttm_ray.evaluation.metric import Metric, PerItemScorer
from ttm_ray.evaluation.video import VideoLike, to_float
from ttm_ray.evaluation.weights import (
    CONFIG_KEY,
    load_state_dict,
    require_weights_file,
    resolve_device,
    strip_prefix,
)

_RAFT_MIN_SIDE = 128  # 8x feature stride x 16: the smallest input its 4-level pyramid takes


@runtime_checkable
class FlowEstimator(Protocol):
    name: str

    def __call__(self, frames1: torch.Tensor, frames2: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` x2 in [0, 1] -> flow ``[B, 2, H, W]`` in input pixels."""
        ...


# ----------------------------------------------------------------------------- RAFT
def raft_size(height: int, width: int, short_side: int | None = None) -> tuple[int, int]:
    """The ``(H', W')`` RAFT runs at: multiples of 8, both >= 128, aspect kept as well as
    rounding allows; ``short_side`` first rescales so the shorter side is about that."""
    scale = 1.0 if short_side is None else short_side / min(height, width)
    scale = max(scale, _RAFT_MIN_SIDE / min(height, width))
    return (max(_RAFT_MIN_SIDE, round(height * scale / 8) * 8),
            max(_RAFT_MIN_SIDE, round(width * scale / 8) * 8))


class RaftFlow:
    """torchvision RAFT with the resize-and-rescale rule of the module doc."""

    def __init__(self, model: torch.nn.Module, name: str, iterations: int = 12,
                 short_side: int | None = None) -> None:
        self.model, self.name = model.eval().requires_grad_(False), name
        self.iterations, self.short_side = iterations, short_side

    @torch.inference_mode()
    def __call__(self, frames1: torch.Tensor, frames2: torch.Tensor) -> torch.Tensor:
        h, w = frames1.shape[-2:]
        size = raft_size(h, w, self.short_side)
        device = next(self.model.parameters()).device
        x = torch.cat([frames1, frames2]).to(device)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                              antialias=size[0] < h)
        x = x * 2 - 1  # RAFT's training normalisation: [-1, 1]
        a, b = x.chunk(2)
        flow = self.model(a.contiguous(), b.contiguous(),
                          num_flow_updates=self.iterations)[-1]
        if size != (h, w):
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([w / size[1], h / size[0]], device=flow.device
                                       ).view(1, 2, 1, 1)
        return flow.float()


# ----------------------------------------------------------------------------- Lucas-Kanade
def _gaussian(sigma: float, device: torch.device) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of ``[B, C, H, W]`` per channel, edges replicated."""
    r, c = kernel.numel() // 2, x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


class LucasKanadeFlow:
    """Dense coarse-to-fine Lucas-Kanade (the CPU fallback; see the module doc).

    Per pyramid level (coarse first; the flow is upsampled and doubled between levels), each
    iteration warps frame 2 by the current flow, and solves the Gaussian-windowed 2x2 normal
    equations ``(A^T A + reg I) d = -A^T I_t`` per pixel. Samples that the flow carries out of
    the frame are masked out of the sums: content entering or leaving at the border would
    otherwise pull the estimate without bound; such pixels take their neighbours' flow.
    """

    name = "Lucas-Kanade (pyramidal, torch; CPU fallback)"

    def __init__(self, levels: int = 4, iterations: int = 8, window_sigma: float = 2.0,
                 reg: float = 1e-4, min_side: int = 16) -> None:
        self.levels, self.iterations = levels, iterations
        self.window_sigma, self.reg, self.min_side = window_sigma, reg, min_side

    @torch.inference_mode()
    def __call__(self, frames1: torch.Tensor, frames2: torch.Tensor) -> torch.Tensor:
        device = frames1.device
        window = _gaussian(self.window_sigma, device)
        smooth = _gaussian(1.0, device)  # anti-aliasing before each 2x downsampling
        pyr1, pyr2 = [_gray(frames1.float())], [_gray(frames2.float())]
        while (len(pyr1) < self.levels
               and min(pyr1[-1].shape[-2:]) // 2 >= self.min_side):
            pyr1.append(F.avg_pool2d(_blur(pyr1[-1], smooth), 2))
            pyr2.append(F.avg_pool2d(_blur(pyr2[-1], smooth), 2))
        flow: torch.Tensor | None = None
        for a, b in zip(reversed(pyr1), reversed(pyr2), strict=True):
            flow = self._level(a, b, flow, window)
        assert flow is not None
        return flow

    def _level(self, a: torch.Tensor, b: torch.Tensor, flow: torch.Tensor | None,
               window: torch.Tensor) -> torch.Tensor:
        n, _, h, w = a.shape
        if flow is None:
            flow = a.new_zeros(n, 2, h, w)
        else:
            fh, fw = flow.shape[-2:]
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([w / fw, h / fh], device=a.device).view(1, 2, 1, 1)
        gx, gy = _gradients(a)
        ys, xs = torch.meshgrid(torch.arange(h, device=a.device, dtype=a.dtype),
                                torch.arange(w, device=a.device, dtype=a.dtype), indexing="ij")
        for _ in range(self.iterations):
            tx, ty = xs + flow[:, 0:1], ys + flow[:, 1:2]
            valid = ((tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)).to(a.dtype)
            grid = torch.cat([tx * 2 / max(w - 1, 1) - 1, ty * 2 / max(h - 1, 1) - 1], dim=1)
            warped = F.grid_sample(b, grid.permute(0, 2, 3, 1), mode="bilinear",
                                   padding_mode="border", align_corners=True)
            it = (warped - a) * valid
            sums = _blur(torch.cat([valid * gx * gx, valid * gx * gy, valid * gy * gy,
                                    gx * it, gy * it], dim=1), window)
            sxx, sxy, syy, bx, by = (sums[:, i:i + 1] for i in range(5))
            sxx, syy = sxx + self.reg, syy + self.reg
            det = sxx * syy - sxy * sxy
            du = -(syy * bx - sxy * by) / det
            dv = -(sxx * by - sxy * bx) / det
            flow = flow + torch.cat([du, dv], dim=1)
        return flow


# ----------------------------------------------------------------------------- Farneback
class FarnebackFlow:
    """OpenCV Farneback (``cv2.calcOpticalFlowFarneback``), pair by pair on the CPU."""

    name = "Farneback (OpenCV)"

    def __init__(self) -> None:
        import cv2  # only when configured; not a dependency

        self.cv2 = cv2

    def __call__(self, frames1: torch.Tensor, frames2: torch.Tensor) -> torch.Tensor:
        def gray(x: torch.Tensor) -> np.ndarray:
            return (_gray(x[None]).squeeze().clamp(0, 1) * 255).round().byte().cpu().numpy()

        flows = [self.cv2.calcOpticalFlowFarneback(gray(a), gray(b), None, 0.5, 4, 15, 3, 5,
                                                   1.2, 0)
                 for a, b in zip(frames1, frames2, strict=True)]
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------- the metric
class Displacement:
    """``ad(video) -> float``: mean flow magnitude over consecutive frame pairs."""

    def __init__(self, estimator: FlowEstimator, batch_size: int = 8,
                 device: torch.device | str = "cpu") -> None:
        self.estimator, self.batch_size = estimator, batch_size
        self.device = resolve_device(str(device))

    @property
    def name(self) -> str:
        return self.estimator.name

    def flows(self, video: VideoLike) -> torch.Tensor:
        """``[T-1, 2, H, W]`` flow of every consecutive pair."""
        x = to_float(video, self.device)
        pairs = x.shape[0] - 1
        parts = [self.estimator(x[i:min(i + self.batch_size, pairs)],
                                x[i + 1:min(i + self.batch_size, pairs) + 1])
                 for i in range(0, pairs, self.batch_size)]
        return torch.cat(parts) if parts else x.new_zeros(0, 2, *x.shape[-2:])

    def __call__(self, video: VideoLike) -> float | None:
        """AD of one video; None for a one-frame video."""
        flow = self.flows(video)
        if flow.shape[0] == 0:
            return None
        return float(flow.double().norm(dim=1).mean())


@dataclass
class FlowConfig:
    backend: Literal["raft_large", "raft_small", "lucas_kanade", "farneback"] = constrained(
        "raft_large", help="raft_large | raft_small (torchvision RAFT, needs weights) | "
                           "lucas_kanade (torch, no weights: the CPU fallback) | farneback "
                           "(OpenCV, only if cv2 is installed)",
    )
    weights: str | None = constrained(
        None, help="RAFT state-dict file (.safetensors, or .pth read with "
                   "torch.load(weights_only=True)), e.g. torchvision's Raft_Large_Weights "
                   "checkpoint saved locally",
    )
    iterations: int = constrained(12, gt=0, help="RAFT recurrent flow updates per pair")
    size: int | None = constrained(
        None, gt=0, help="RAFT: resize so the shorter side is about this before estimating "
                         "(flow rescaled back to input pixels); null: input size (rounded "
                         "to multiples of 8, at least 128). Set it for large videos: RAFT's "
                         "correlation volume grows as (H*W/64)^2 (~4 GB per 1080p pair)",
    )
    batch_size: int = constrained(8, gt=0, help="frame pairs per forward pass")
    seed: int = constrained(0, help="RAFT initialisation seed when weights are random "
                                    "(allow_random_init)")

    def build(self, device: torch.device | str = "cpu", allow_random_init: bool = False,
              key: str = f"{CONFIG_KEY}.flow") -> Displacement:
        dev = resolve_device(str(device))
        if self.backend == "lucas_kanade":
            return Displacement(LucasKanadeFlow(), self.batch_size, dev)
        if self.backend == "farneback":
            import importlib.util

            if importlib.util.find_spec("cv2") is None:
                raise ValueError(f"{key}.backend: farneback needs OpenCV (cv2), which is not "
                                 f"installed: set {key}.backend: lucas_kanade (the torch "
                                 "fallback) or install opencv-python-headless")
            return Displacement(FarnebackFlow(), self.batch_size, "cpu")
        from torchvision.models import optical_flow

        label = "RAFT-large" if self.backend == "raft_large" else "RAFT-small"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = getattr(optical_flow, self.backend)()
        if not self.weights and allow_random_init:
            label += " (random init)"
        else:
            file = require_weights_file(f"{key}.weights", self.weights,
                                        f"a torchvision {self.backend} state dict (or set "
                                        f"{key}.backend: lucas_kanade, which needs none)",
                                        "build_tiny_raft_weights")
            try:
                model.load_state_dict(strip_prefix(load_state_dict(file)))
            except RuntimeError as exc:
                raise ValueError(f"{key}.weights: {file} does not fit torchvision "
                                 f"{self.backend} (is it the other RAFT size?): "
                                 f"{str(exc)[:300]}") from exc
        return Displacement(RaftFlow(model.to(dev), label, self.iterations, self.size),
                            self.batch_size, dev)


def _scorer(displacement: Displacement) -> PerItemScorer:
    return PerItemScorer(displacement.name,
                         lambda batch: [displacement(v) for v in batch.videos])


# AD measures the amount of motion: neither more nor less is better (no arrow in the tables).
AD = Metric(name="ad", label="AD", decimals=2, higher_is_better=None, section="flow",
            build=_scorer)

__all__ = [
    "AD",
    "Displacement",
    "FarnebackFlow",
    "FlowConfig",
    "FlowEstimator",
    "LucasKanadeFlow",
    "RaftFlow",
    "raft_size",
]
