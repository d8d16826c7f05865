"""FVD: Frechet distance between video features of generated and reference sets.

``FVD = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2))`` over per-video features of a
3D CNN, computed in float64 (:func:`frechet_distance`). It is a *set* metric: one number per
benchmark subset, from all its generated videos against all its reference videos.

The feature extractor is pluggable (:class:`VideoFeatureExtractor`):

* ``r3d_18`` (default), ``r2plus1d_18``, ``mc3_18``, ``s3d``: torchvision video models (3D
  CNNs of the I3D class) with weights from a local state-dict file (``.safetensors`` or a
  ``torch.save`` file, e.g. torchvision's Kinetics-400 checkpoint); features = the pooled
  penultimate layer (512-d; 1024-d for S3D). Named "R3D-18 (I3D stand-in)" etc.: FVD values
  are only comparable between runs with the same extractor, never with the paper's.
* ``i3d_torchscript``: the I3D detector that StyleGAN-V / most FVD code uses
  (``i3d_torchscript.pt``, TorchScript, 400-d features before the softmax, input
  ``[B, 3, T, 224, 224]`` in [-1, 1]). The one to use for numbers beside the paper's.

Frames: ``num_frames`` (16, as I3D FVD) sampled uniformly over the video, shorter side
resized to ``size`` and centre-cropped square.

Small sets: the covariance of N videos has rank <= N - 1, so 64 videos against a 512-d
feature are far from the asymptotic value; FVD then compares runs of the same set size only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ttm_ray.config import constrained
from ttm_ray.dataset.video import resize_center_crop
from ttm_ray.evaluation.metric import Batch, Metric
from ttm_ray.evaluation.video import VideoLike, to_float, uniform_indices
from ttm_ray.evaluation.weights import (
    CONFIG_KEY,
    load_state_dict,
    require_weights_file,
    resolve_device,
    strip_prefix,
)

log = logging.getLogger(__name__)

_TORCHVISION = {"r3d_18": "R3D-18", "r2plus1d_18": "R(2+1)D-18", "mc3_18": "MC3-18",
                "s3d": "S3D"}
# torchvision's Kinetics-400 video models were trained on frames normalised with these.
_KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
_KINETICS_STD = (0.22803, 0.22145, 0.216989)


# ----------------------------------------------------------------------------- statistics
def _f64(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x),
                           dtype=torch.float64)


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [D], covariance [D, D])`` of ``[N, D]`` features in float64 (unbiased, N-1)."""
    f = _f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need [N, D] features with N >= 2 for a covariance, got "
                         f"{tuple(f.shape)}")
    return f.mean(dim=0).numpy(), torch.cov(f.T).numpy()


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor) -> float:
    """Frechet distance of two Gaussians, in float64.

    ``tr((S1 S2)^(1/2))`` is computed as ``tr((R S2 R)^(1/2))`` with ``R = S1^(1/2)``: the two
    matrices are similar, and ``R S2 R`` is symmetric PSD, so a symmetric eigen-decomposition
    gives real eigenvalues (rounding negatives clipped to 0). That avoids ``sqrtm`` of the
    non-symmetric ``S1 S2``, whose result carries spurious imaginary parts and blows up for
    the singular covariances of small sets (N < D); no epsilon offset is needed.

    torch rather than numpy linear algebra: it follows ``torch.set_num_threads``, where
    OpenBLAS threads were measured 30x slower on a busy 2-core machine.
    """
    m1, m2 = _f64(mu1).reshape(-1), _f64(mu2).reshape(-1)
    s1, s2 = _f64(sigma1), _f64(sigma2)
    s1, s2 = s1.reshape(1, 1) if s1.ndim == 0 else s1, s2.reshape(1, 1) if s2.ndim == 0 else s2
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.numel(), m1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(m1.shape)} / {tuple(m2.shape)}, sigma "
                         f"{tuple(s1.shape)} / {tuple(s2.shape)}")
    root = _sqrt_psd(s1)
    inner = root @ s2 @ root
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = m1 - m2
    dist = float(diff @ diff + s1.trace() + s2.trace() - 2.0 * tr_covmean)
    # Mathematically >= 0; identical sets land at +-1e-12 relative rounding.
    return max(dist, 0.0)


def fvd_from_features(generated: np.ndarray | torch.Tensor,
                      reference: np.ndarray | torch.Tensor) -> float:
    """FVD of two ``[N, D]`` feature sets."""
    return frechet_distance(*feature_stats(generated), *feature_stats(reference))


# ----------------------------------------------------------------------------- extractors
@runtime_checkable
class VideoFeatureExtractor(Protocol):
    """Videos -> ``[N, D]`` features for FVD."""

    name: str

    def __call__(self, videos: Sequence[VideoLike]) -> torch.Tensor: ...


class _ClipSampler:
    """``num_frames`` uniform frames, shorter side -> ``size``, centre crop: ``[3, T, S, S]``
    float in [0, 1]."""

    def __init__(self, num_frames: int, size: int, device: torch.device) -> None:
        self.num_frames, self.size, self.device = num_frames, size, device

    def __call__(self, video: VideoLike, name: str) -> torch.Tensor:
        x = to_float(video, self.device, name=name)  # [T, 3, H, W]
        x = x[uniform_indices(x.shape[0], self.num_frames)]
        x = resize_center_crop(x.permute(0, 2, 3, 1), self.size, self.size)
        return x.permute(3, 0, 1, 2).clamp(0, 1)


def _batched(videos: Sequence[VideoLike], batch_size: int, sampler: _ClipSampler,
             run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    feats = []
    with torch.inference_mode():
        for i in range(0, len(videos), batch_size):
            clips = torch.stack([sampler(v, f"video[{i + j}]")
                                 for j, v in enumerate(videos[i:i + batch_size])])
            feats.append(run(clips).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 0)


class _Penultimate(nn.Module):
    """``[B, 3, T, S, S]`` in [0, 1] -> the pooled input of the classifier, ``[B, D]``."""

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        self.model, self.arch = model, arch
        self.register_buffer("mean", torch.tensor(_KINETICS_MEAN).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(_KINETICS_STD).view(1, 3, 1, 1, 1))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = (clips - self.mean) / self.std
        if self.arch == "s3d":
            return self.model.features(x).mean(dim=(2, 3, 4))
        m = self.model
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.stem(x)))))
        return m.avgpool(x).flatten(1)


class TorchvisionVideoFeatures:
    """Pooled penultimate features of a torchvision video model (``state`` None: seeded
    random weights)."""

    def __init__(self, arch: str, state: dict[str, torch.Tensor] | None, name: str,
                 num_frames: int = 16, size: int = 112, batch_size: int = 8,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        from torchvision.models import video as tv_video

        if arch not in _TORCHVISION:
            raise ValueError(f"unknown torchvision video model {arch!r}; known: "
                             f"{sorted(_TORCHVISION)}")
        make = getattr(tv_video, arch)
        if state is None:
            with torch.random.fork_rng(devices=[]):  # seeded, without touching the global RNG
                torch.manual_seed(seed)
                model = make()
        else:
            with torch.device("meta"):  # no random init of 33M weights about to be replaced
                model = make()
            _load_backbone(model, strip_prefix(state), arch)
        dev = resolve_device(str(device))
        self.net = _Penultimate(model, arch).eval().requires_grad_(False).to(dev)
        self.name, self.batch_size = name, batch_size
        self.sampler = _ClipSampler(num_frames, size, dev)

    def __call__(self, videos: Sequence[VideoLike]) -> torch.Tensor:
        return _batched(videos, self.batch_size, self.sampler, self.net)


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Load a checkpoint into a (meta-device) ``model``; the classifier is dropped (only the
    features are used, so a head for other classes or none at all is fine), everything else
    must fit."""
    head = "classifier" if arch == "s3d" else "fc"
    setattr(model, head, nn.Identity())
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    missing = sorted(k for k in own if k not in body)
    unexpected = sorted(k for k in body if k not in own)
    wrong = sorted(k for k in body if k in own and own[k].shape != body[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"the weights do not fit torchvision {arch}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict(body, assign=True)


class I3DTorchscriptFeatures:
    """The StyleGAN-V TorchScript I3D FVD detector: 400-d features before the softmax."""

    def __init__(self, file: Path, num_frames: int = 16, size: int = 224, batch_size: int = 8,
                 device: torch.device | str = "cpu") -> None:
        dev = resolve_device(str(device))
        self.detector = torch.jit.load(str(file), map_location=dev).eval()
        self.name = f"I3D (torchscript: {file.name})"
        self.batch_size = batch_size
        self.sampler = _ClipSampler(num_frames, size, dev)

    def _run(self, clips: torch.Tensor) -> torch.Tensor:
        # The detector takes [-1, 1]; its own rescale/resize are off (done by the sampler).
        return self.detector(clips * 2 - 1, rescale=False, resize=False, return_features=True)

    def __call__(self, videos: Sequence[VideoLike]) -> torch.Tensor:
        return _batched(videos, self.batch_size, self.sampler, self._run)


class Fvd:
    """``fvd(generated, references) -> float`` with a named feature extractor."""

    def __init__(self, extractor: VideoFeatureExtractor) -> None:
        self.extractor = extractor

    @property
    def name(self) -> str:
        return self.extractor.name

    def features(self, videos: Sequence[VideoLike]) -> torch.Tensor:
        return self.extractor(videos)

    def __call__(self, generated: Sequence[VideoLike], references: Sequence[VideoLike]) -> float:
        return fvd_from_features(self.features(generated), self.features(references))


@dataclass
class FvdConfig:
    backbone: Literal["r3d_18", "r2plus1d_18", "mc3_18", "s3d", "i3d_torchscript"] = constrained(
        "r3d_18", help="feature extractor: r3d_18 | r2plus1d_18 | mc3_18 | s3d (torchvision "
                       "3D CNNs, I3D stand-ins) | i3d_torchscript (the StyleGAN-V I3D detector "
                       "file, for numbers comparable with published FVDs)",
    )
    weights: str | None = constrained(
        None, help="torchvision backbones: a state-dict file (.safetensors, or .pt/.pth read "
                   "with torch.load(weights_only=True)), e.g. the Kinetics-400 checkpoint; "
                   "i3d_torchscript: the i3d_torchscript.pt file",
    )
    num_frames: int = constrained(16, gt=0, help="frames per video, sampled uniformly")
    size: int | None = constrained(
        None, gt=0, help="square input side after short-side resize + centre crop; null: "
                         "112 for torchvision backbones (their Kinetics size), 224 for I3D")
    batch_size: int = constrained(8, gt=0, help="videos per forward pass")
    seed: int = constrained(0, help="initialisation seed when weights are random "
                                    "(allow_random_init)")

    def build(self, device: torch.device | str = "cpu", allow_random_init: bool = False,
              key: str = f"{CONFIG_KEY}.fvd") -> Fvd:
        size = self.size or (224 if self.backbone == "i3d_torchscript" else 112)
        if self.backbone == "i3d_torchscript":
            file = require_weights_file(f"{key}.weights", self.weights,
                                        "the i3d_torchscript.pt file", "build_tiny_fvd_weights")
            return Fvd(I3DTorchscriptFeatures(file, self.num_frames, size, self.batch_size,
                                              device))
        label = f"{_TORCHVISION[self.backbone]} (I3D stand-in)"
        if not self.weights and allow_random_init:
            state, label = None, f"{label} (random init)"
        else:
            file = require_weights_file(f"{key}.weights", self.weights,
                                        f"a torchvision {self.backbone} state dict",
                                        "build_tiny_fvd_weights")
            state = load_state_dict(file)
        try:
            extractor = TorchvisionVideoFeatures(self.backbone, state, label, self.num_frames,
                                                 size, self.batch_size, self.seed, device)
        except ValueError as exc:
            raise ValueError(f"{key}.weights: {self.weights}: {exc} (set {key}.backbone to "
                             "the architecture the file holds)") from exc
        return Fvd(extractor)


class FvdScorer:
    """FVD as a set-level scorer: features per chunk, the distance per subset."""

    def __init__(self, fvd: Fvd) -> None:
        self.fvd = fvd
        self.name = fvd.name

    def score(self, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(generated, reference)`` feature pairs, one per item."""
        gen = list(self.fvd.features(batch.videos))
        ref = list(self.fvd.features(batch.references))
        return list(zip(gen, ref, strict=True))

    def aggregate(self, values: list[tuple[torch.Tensor, torch.Tensor]], subset: str
                  ) -> float | None:
        if len(values) < 2:  # a covariance needs two samples
            log.warning("FVD of subset %r: %d video(s), at least 2 are needed", subset,
                        len(values))
            return None
        return fvd_from_features(torch.stack([g for g, _ in values]),
                                 torch.stack([r for _, r in values]))


FVD = Metric(name="fvd", label="FVD", decimals=2, higher_is_better=False, section="fvd",
             build=FvdScorer, needs_reference=True, set_level=True)

__all__ = [
    "FVD",
    "Fvd",
    "FvdConfig",
    "FvdScorer",
    "I3DTorchscriptFeatures",
    "TorchvisionVideoFeatures",
    "VideoFeatureExtractor",
    "feature_stats",
    "frechet_distance",
    "fvd_from_features",
]
