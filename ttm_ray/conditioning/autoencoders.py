"""Frozen autoencoders that map pixel videos to the latent grid both model families denoise.

One interface, three kinds, chosen by :class:`AutoencoderConfig` ``kind``:

* ``pixel``: parameter-free: pixel-unshuffle by ``f`` in H and W and fold ``ft`` frames into
  channels (3 -> 3*ft*f*f channels). Exactly invertible, no weights to download: the tiny
  configs and the "it learns" tests use it.
* ``image_vae``: a diffusers ``AutoencoderKL`` (SD1.5's VAE for the U-Net) applied frame by
  frame, latents scaled by the model's ``scaling_factor`` (and shifted by ``shift_factor``
  where the model has one).
* ``video_vae``: a diffusers temporal autoencoder (``class_name``; Cosmos by default, the
  paper's 8x8x8, 16-channel kind). These are causal: the first frame is encoded alone, so
  ``T`` pixel frames give ``1 + (T - 1) / ft`` latent frames and a single image gives the
  first latent frame of any video that starts with it (exactly for Cosmos, Wan and LTX;
  HunyuanVideo's group norms span all frames, so there it is close, not equal).

Every kind speaks ``[B, 3, T, H, W]`` in [-1, 1] <-> ``[B, C, T', H', W']`` normalised latents.
The model's token count follows from :meth:`Autoencoder.latent_shape`; the factors of the
VAEs are read from the loaded model's config, never assumed. The weights are frozen
(``requires_grad`` False, eval mode that ``.train()`` cannot undo) because neither stage
fine-tunes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ttm_ray.config import constrained
from ttm_ray.model_folders import model_folder

#: diffusers video autoencoders this module knows how to read (factors, channels, latent
#: statistics). All of them are causal in time (first frame alone: ``1 + (T-1)/ft``).
VIDEO_VAE_CLASSES = (
    "AutoencoderKLCosmos",
    "AutoencoderKLWan",
    "AutoencoderKLHunyuanVideo",
    "AutoencoderKLLTXVideo",
)
_PIXEL_DEFAULTS = {"spatial_factor": 4, "temporal_factor": 1}
_TINY_HINT = ("for tests and the quickstart, ttm_ray.conditioning.tiny.{builder}(dir) writes a "
              "tiny random one")


@dataclass
class AutoencoderConfig:
    """Which autoencoder turns videos into the latents both stages denoise."""

    kind: Literal["pixel", "image_vae", "video_vae"] = constrained(
        "pixel", help="pixel (parameter-free unshuffle) | image_vae (AutoencoderKL per frame) | "
                      "video_vae (a diffusers temporal autoencoder, see class_name)",
    )
    path: str | None = constrained(
        None, help="image_vae/video_vae: local folder with config.json + weights saved by "
                   "save_pretrained (a pipeline folder with a vae/ subfolder also works)",
    )
    class_name: str = constrained(
        "AutoencoderKLCosmos", nonempty=True,
        help="video_vae: the diffusers class: " + ", ".join(VIDEO_VAE_CLASSES),
    )
    spatial_factor: int | None = constrained(
        None, gt=0, help="pixel only: H and W compression f (default 4; 3 -> 3*f*f channels)",
    )
    temporal_factor: int | None = constrained(
        None, gt=0, help="pixel only: frames folded into channels ft (default 1)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = constrained(
        "float32", help="dtype of the VAE weights and compute (latents come back in the "
                        "input's dtype)",
    )
    chunk_frames: int = constrained(
        16, gt=0, help="image_vae: frames per VAE call (bounds activation memory)",
    )
    chunk_videos: int = constrained(
        1, gt=0, help="video_vae: videos per VAE call (bounds activation memory)",
    )
    posterior: Literal["mode", "sample"] = constrained(
        "mode", help="VAE posterior: its mean (deterministic) or a sample",
    )

    def validate(self) -> None:
        """Field consistency only; the path is checked by :meth:`build`, so a config can be
        loaded (and shown) on a machine without the weights."""
        if self.kind == "pixel":
            return
        for name in _PIXEL_DEFAULTS:
            if getattr(self, name) is not None:
                raise ValueError(f"{name} applies to kind 'pixel' only; a VAE's factors come "
                                 f"from its config.json (remove {name} or set kind: pixel)")
        if self.kind == "video_vae" and self.class_name not in VIDEO_VAE_CLASSES:
            raise ValueError(f"class_name {self.class_name!r} is not a supported video "
                             f"autoencoder; use one of {', '.join(VIDEO_VAE_CLASSES)}")

    def build(self, device: torch.device | str | None = None) -> Autoencoder:
        """The frozen autoencoder, loaded from ``path`` for the VAE kinds."""
        self.validate()
        ae: Autoencoder
        if self.kind == "pixel":
            ae = PixelAutoencoder(
                spatial_factor=self.spatial_factor or _PIXEL_DEFAULTS["spatial_factor"],
                temporal_factor=self.temporal_factor or _PIXEL_DEFAULTS["temporal_factor"],
            )
        else:
            dtype = getattr(torch, self.dtype)
            if self.kind == "image_vae":
                vae = load_diffusers_vae("AutoencoderKL", self.path, dtype, kind=self.kind)
                ae = ImageVAE(vae, chunk_frames=self.chunk_frames, posterior=self.posterior)
            else:
                vae = load_diffusers_vae(self.class_name, self.path, dtype, kind=self.kind)
                ae = VideoVAE(vae, chunk_videos=self.chunk_videos, posterior=self.posterior)
        return ae.to(device) if device is not None else ae


def pixel_frames(latent_frames: int, temporal_factor: int, causal: bool) -> int:
    """Pixel frames that encode to ``latent_frames``: the one rule every side uses (training
    clip length, the prep config's ``clip.num_frames``, inference output length).

    A causal tokenizer encodes the first frame alone (``1 + ft * k`` frames give ``1 + k``
    latent frames); a non-causal one folds ``ft`` frames per latent frame (``ft * k``).
    """
    if latent_frames < 1 or temporal_factor < 1:
        raise ValueError(f"latent_frames {latent_frames} and temporal_factor "
                         f"{temporal_factor} must be >= 1")
    return 1 + (latent_frames - 1) * temporal_factor if causal else \
        latent_frames * temporal_factor


@dataclass(frozen=True)
class AutoencoderGeometry:
    """An autoencoder's compression, known without loading its weights (preflight)."""

    temporal_factor: int
    spatial_factor: int
    causal: bool
    latent_channels: int | None  # None: not stated where the factors were read
    source: str  # where the factors were read: "config.json at ...", "pixel settings", ...

    def pixel_shape(self, latent_frames: int, latent_height: int, latent_width: int
                    ) -> tuple[int, int, int]:
        """``(T, H, W)`` pixels of a latent grid."""
        return (pixel_frames(latent_frames, self.temporal_factor, self.causal),
                latent_height * self.spatial_factor, latent_width * self.spatial_factor)


def vae_folder(path: str | Path) -> Path | None:
    """The folder holding the VAE's config.json: ``path`` itself or a pipeline's ``vae/``."""
    return model_folder(path, ("vae",))


def geometry(cfg: AutoencoderConfig) -> AutoencoderGeometry:
    """Compression factors of ``cfg`` from its settings or its ``config.json`` (no weights
    are loaded). When the folder is missing, the diffusers class's own defaults stand in (the
    preflight reports the missing folder separately), so a frame-count problem and a missing
    weights problem are both reported in one pass."""
    if cfg.kind == "pixel":
        ft = cfg.temporal_factor or _PIXEL_DEFAULTS["temporal_factor"]
        f = cfg.spatial_factor or _PIXEL_DEFAULTS["spatial_factor"]
        return AutoencoderGeometry(ft, f, False, 3 * ft * f * f, "pixel settings")
    class_name = "AutoencoderKL" if cfg.kind == "image_vae" else cfg.class_name
    folder = vae_folder(cfg.path) if cfg.path else None
    if folder is not None:
        values = json.loads((folder / "config.json").read_text())
        source = f"{folder / 'config.json'}"
    else:
        import inspect

        import diffusers

        signature = inspect.signature(getattr(diffusers, class_name).__init__)
        values = {k: p.default for k, p in signature.parameters.items()
                  if p.default is not inspect.Parameter.empty}
        source = f"diffusers {class_name} defaults (autoencoder.path not found)"
    def first(*names: str) -> int | None:
        return next((int(values[n]) for n in names if values.get(n) is not None), None)

    channels = first("latent_channels", "z_dim")
    if cfg.kind == "image_vae":
        f = 2 ** (len(values.get("block_out_channels") or (0,)) - 1)
        return AutoencoderGeometry(1, f, False, channels, source)

    ft = first("temporal_compression_ratio", "scale_factor_temporal")
    fs = first("spatial_compression_ratio", "scale_factor_spatial")
    if class_name == "AutoencoderKLLTXVideo" and (ft is None or fs is None):
        # LTX computes its factors in __init__ from the patch sizes and block layout.
        ft = ft or int(values.get("patch_size_t", 1)) * 2 ** sum(
            bool(x) for x in values.get("spatio_temporal_scaling") or ())
        fs = fs or int(values.get("patch_size", 1)) * 2 ** sum(
            bool(x) for x in values.get("spatio_temporal_scaling") or ())
    if ft is None or fs is None:
        raise ValueError(f"cannot read the compression factors of {class_name} from {source}")
    return AutoencoderGeometry(ft, fs, VideoVAE.causal, channels, source)


class Autoencoder(nn.Module):
    """Frozen video <-> latent map shared by the DiT and U-Net paths.

    Subclasses implement ``_encode``/``_decode`` on validated tensors; this class owns the
    shape rules (:meth:`latent_shape`, :meth:`pixel_shape`), input checks, dtype handling and
    freezing, so the kinds cannot drift apart on them.
    """

    #: True when the first frame is encoded on its own (``T' = 1 + (T-1)/ft``).
    causal: bool = False

    def __init__(self, latent_channels: int, factors: tuple[int, int, int]) -> None:
        super().__init__()
        self._latent_channels = int(latent_channels)
        self._factors = tuple(int(f) for f in factors)

    def freeze(self) -> Autoencoder:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Autoencoder:
        """Always eval: a parent's ``.train()`` must not switch the frozen weights (dropout,
        norms) into training behaviour."""
        return super().train(False)

    @property
    def latent_channels(self) -> int:
        return self._latent_channels

    @property
    def factors(self) -> tuple[int, int, int]:
        """Compression ``(ft, fh, fw)`` of time, height and width."""
        return self._factors  # type: ignore[return-value]

    @property
    def device(self) -> torch.device | None:
        """Where the weights live; None for the parameter-free kind (it follows its input)."""
        p = next(self.parameters(), None)
        return None if p is None else p.device

    @property
    def dtype(self) -> torch.dtype | None:
        p = next(self.parameters(), None)
        return None if p is None else p.dtype

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` pixel frames; ValueError naming valid counts."""
        ft = self.factors[0]
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_frames == 1:
            return 1
        if self.causal:
            if (num_frames - 1) % ft:
                k = (num_frames - 1) // ft
                raise ValueError(
                    f"num_frames {num_frames} does not fit {type(self).__name__} (causal, "
                    f"temporal factor {ft}): use 1 + {ft}k frames, e.g. {1 + ft * k} or "
                    f"{1 + ft * (k + 1)}")
            return 1 + (num_frames - 1) // ft
        if num_frames % ft:
            k = num_frames // ft
            raise ValueError(
                f"num_frames {num_frames} does not fit {type(self).__name__} (temporal factor "
                f"{ft}): use a multiple of {ft}, e.g. {max(ft * k, ft)} or {ft * (k + 1)}, "
                "or 1 frame (an image)")
        return num_frames // ft

    def latent_shape(self, num_frames: int, height: int, width: int
                     ) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of the latent of one ``[3, T, H, W]`` video (what ``encode``
        returns per sample): the model's latent grid, hence its token count."""
        _, fh, fw = self.factors
        for name, size, f in (("height", height, fh), ("width", width, fw)):
            if size % f:
                raise ValueError(f"{name} {size} is not divisible by the autoencoder's spatial "
                                 f"factor {f}: use a multiple of {f}")
        return (self.latent_channels, self.latent_frames(num_frames), height // fh,
                width // fw)

    def pixel_shape(self, latent_frames: int, latent_height: int, latent_width: int
                    ) -> tuple[int, int, int, int]:
        """``(3, T, H, W)`` that ``decode`` returns for one latent of that grid."""
        ft, fh, fw = self.factors
        return (3, pixel_frames(latent_frames, ft, self.causal), latent_height * fh,
                latent_width * fw)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``video [B, 3, T, H, W]`` in [-1, 1] -> normalised latents ``[B, C, T', H', W']``
        in the video's dtype (on the autoencoder's device; T=1 is a single image)."""
        if video.ndim != 5 or video.shape[1] != 3 or not video.is_floating_point():
            raise ValueError("encode expects a float video [B, 3, T, H, W] in [-1, 1], got "
                             f"{video.dtype} {tuple(video.shape)}")
        expected = self.latent_shape(*video.shape[2:])
        latent = self._encode(video).to(video.dtype)
        if tuple(latent.shape[1:]) != expected:  # a VAE whose config lies about its factors
            raise RuntimeError(f"{type(self).__name__} returned a latent of shape "
                               f"{tuple(latent.shape)}, its config promises {expected}")
        return latent

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, T', H', W']`` -> video ``[B, 3, T, H, W]`` in about
        [-1, 1] (not clamped), in the latent's dtype."""
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels \
                or not latent.is_floating_point():
            raise ValueError(f"decode expects a float latent [B, {self.latent_channels}, T', "
                             f"H', W'], got {latent.dtype} {tuple(latent.shape)}")
        video = self._decode(latent).to(latent.dtype)
        expected = self.pixel_shape(*latent.shape[2:])
        if tuple(video.shape[1:]) != expected:
            raise RuntimeError(f"{type(self).__name__} decoded a video of shape "
                               f"{tuple(video.shape)}, its config promises {expected}")
        return video

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """A single frame ``[B, 3, H, W]`` or ``[B, 3, 1, H, W]`` -> ``[B, C, 1, H', W']``:
        the first-frame condition latent (E(x0), E(s0))."""
        if image.ndim == 4:
            image = image.unsqueeze(2)
        if image.ndim != 5 or image.shape[2] != 1:
            raise ValueError(f"encode_image expects [B, 3, H, W] or [B, 3, 1, H, W], got "
                             f"{tuple(image.shape)}")
        return self.encode(image)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelAutoencoder(Autoencoder):
    """Parameter-free, exactly invertible: pixel-unshuffle in space, fold frames in time.

    Channels are ordered (rgb, ft, fh, fw). A single image with ``ft > 1`` is repeated to
    ``ft`` frames, so its latent is what a still clip of that frame would give.
    """

    def __init__(self, spatial_factor: int = 4, temporal_factor: int = 1) -> None:
        f, ft = int(spatial_factor), int(temporal_factor)
        if f < 1 or ft < 1:
            raise ValueError(f"pixel factors must be >= 1, got spatial {f}, temporal {ft}")
        super().__init__(3 * ft * f * f, (ft, f, f))
        self.freeze()

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        ft, f, _ = self.factors
        if video.shape[2] == 1 and ft > 1:
            video = video.expand(-1, -1, ft, -1, -1)
        b, c, t, h, w = video.shape
        x = video.reshape(b, c, t // ft, ft, h // f, f, w // f, f)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, c * ft * f * f, t // ft, h // f, w // f)

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        ft, f, _ = self.factors
        b, _, t, h, w = latent.shape
        x = latent.reshape(b, 3, ft, f, f, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, 3, t * ft, h * f, w * f)


def _latent(dist: Any, posterior: str) -> torch.Tensor:
    return dist.sample() if posterior == "sample" else dist.mode()


class ImageVAE(Autoencoder):
    """A diffusers ``AutoencoderKL`` applied to every frame, ``chunk_frames`` at a time.

    Latents are ``(z - shift_factor) * scaling_factor`` as in the diffusers pipelines, so the
    SD1.5 U-Net sees the scale it was trained on.
    """

    def __init__(self, vae: nn.Module, *, chunk_frames: int = 16, posterior: str = "mode"
                 ) -> None:
        cfg = vae.config
        f = 2 ** (len(cfg.block_out_channels) - 1)
        super().__init__(cfg.latent_channels, (1, f, f))
        self.vae = vae
        self.chunk_frames = chunk_frames
        self.posterior = posterior
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.freeze()

    def _frames(self, x: torch.Tensor, fn: Any) -> torch.Tensor:
        """Apply ``fn`` to the ``B*T`` frames of ``x [B, C, T, H, W]`` in chunks."""
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        frames = frames.to(device=self.device, dtype=self.dtype)
        out = torch.cat([fn(chunk) for chunk in frames.split(self.chunk_frames)])
        return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        def enc(frames: torch.Tensor) -> torch.Tensor:
            z = _latent(self.vae.encode(frames).latent_dist, self.posterior)
            return (z - self.shift_factor) * self.scaling_factor

        return self._frames(video, enc)

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        def dec(z: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample

        return self._frames(latent, dec)


def _config_value(vae: nn.Module, names: tuple[str, ...]) -> Any:
    """The first of ``names`` set on the model (attribute computed in its ``__init__``, as
    LTX's factors are) or in its config."""
    for name in names:
        value = vars(vae).get(name)
        if value is None:
            value = getattr(vae.config, name, None)
        if value is not None:
            return value
    return None


class VideoVAE(Autoencoder):
    """A diffusers temporal autoencoder (causal: first frame alone), ``chunk_videos`` videos
    per call.

    Factors and channels come from the model (``spatial/temporal_compression_ratio`` or Wan's
    ``scale_factor_spatial/temporal``; ``latent_channels`` or ``z_dim``). Latents are
    normalised ``(z - mean) * scaling_factor / std`` with the model's documented statistics:
    ``latents_mean/std`` from its config (Cosmos, Wan) or its buffers (LTX), per channel or,
    as Cosmos stores them, per channel and latent frame (frames past the table reuse its last
    column); ``scaling_factor`` from its config (HunyuanVideo), 1 where it has none.
    """

    causal = True

    def __init__(self, vae: nn.Module, *, chunk_videos: int = 1, posterior: str = "mode"
                 ) -> None:
        name = type(vae).__name__
        channels = _config_value(vae, ("latent_channels", "z_dim"))
        fh = _config_value(vae, ("spatial_compression_ratio", "scale_factor_spatial"))
        ft = _config_value(vae, ("temporal_compression_ratio", "scale_factor_temporal"))
        if channels is None or fh is None or ft is None:
            raise ValueError(f"cannot read latent channels / compression factors of {name} "
                             f"from its config; supported classes: {', '.join(VIDEO_VAE_CLASSES)}")
        super().__init__(channels, (ft, fh, fh))
        self.vae = vae
        self.chunk_videos = chunk_videos
        self.posterior = posterior
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 1.0)
        mean, std = self._statistics(vae, channels)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_std", std, persistent=False)
        self.freeze()

    @staticmethod
    def _statistics(vae: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[C, F]`` float32 mean and std (F = 1 for per-channel statistics)."""
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is None or std is None:
            mean, std = getattr(vae, "latents_mean", None), getattr(vae, "latents_std", None)
        if mean is None or std is None:
            return torch.zeros(channels, 1), torch.ones(channels, 1)
        mean = torch.as_tensor(mean, dtype=torch.float32).detach().flatten().cpu()
        std = torch.as_tensor(std, dtype=torch.float32).detach().flatten().cpu()
        if mean.numel() != std.numel() or mean.numel() % channels:
            raise ValueError(f"{type(vae).__name__}: latents_mean/std of length {mean.numel()}"
                             f"/{std.numel()} do not fit {channels} latent channels")
        return mean.view(channels, -1), std.view(channels, -1)

    def _stats_for(self, frames: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def fit(s: torch.Tensor) -> torch.Tensor:
            if s.shape[1] < frames:  # past the table: repeat its last latent frame's column
                s = torch.cat([s, s[:, -1:].expand(-1, frames - s.shape[1])], dim=1)
            return s[:, :frames, None, None].unsqueeze(0).to(like.device)

        return fit(self.latents_mean), fit(self.latents_std)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        parts = []
        for chunk in video.split(self.chunk_videos):
            z = self.vae.encode(chunk.to(device=self.device, dtype=self.dtype)).latent_dist
            parts.append(_latent(z, self.posterior).float())
        z = torch.cat(parts)
        mean, std = self._stats_for(z.shape[2], z)
        return (z - mean) * self.scaling_factor / std

    def _decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent.to(device=self.device, dtype=torch.float32)
        mean, std = self._stats_for(z.shape[2], z)
        z = (z * std / self.scaling_factor + mean).to(self.dtype)
        return torch.cat([self.vae.decode(chunk).sample for chunk in z.split(self.chunk_videos)])


def load_diffusers_vae(class_name: str, path: str | Path | None, dtype: torch.dtype, *,
                       kind: str) -> nn.Module:
    """``class_name.from_pretrained(path)`` with errors that name the path and the fix.

    ``path`` may be the VAE's own folder or a pipeline folder holding it under ``vae/``.
    """
    builder = "build_tiny_image_vae" if kind == "image_vae" else "build_tiny_video_vae"
    hint = _TINY_HINT.format(builder=builder)
    if not path:
        raise ValueError(f"autoencoder kind {kind!r} needs autoencoder.path ({hint})")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"autoencoder path {root} does not exist: put a {class_name} saved with "
            f"save_pretrained there (config.json + weights) and set autoencoder.path, or use "
            f"kind: pixel ({hint})")
    folder = vae_folder(root)
    if folder is None:
        raise FileNotFoundError(
            f"autoencoder path {root} has no config.json (nor vae/config.json): it must hold a "
            f"{class_name} saved with save_pretrained ({hint})")
    found = json.loads((folder / "config.json").read_text()).get("_class_name")
    if found and found != class_name:
        if kind == "image_vae":
            fix = (f"kind: video_vae, class_name: {found}" if found in VIDEO_VAE_CLASSES
                   else "a folder with an AutoencoderKL")
        else:
            fix = (f"class_name: {found}" if found in VIDEO_VAE_CLASSES else
                   "kind: image_vae" if found == "AutoencoderKL" else
                   f"a folder with one of {', '.join(VIDEO_VAE_CLASSES)}")
        raise ValueError(f"autoencoder path {folder} holds a {found}, not the {class_name} "
                         f"that kind {kind!r} loads: set {fix}")
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no class {class_name!r}; "
                         f"supported video autoencoders: {', '.join(VIDEO_VAE_CLASSES)}")
    return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)


__all__ = [
    "VIDEO_VAE_CLASSES",
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderGeometry",
    "ImageVAE",
    "PixelAutoencoder",
    "VideoVAE",
    "geometry",
    "load_diffusers_vae",
    "pixel_frames",
    "vae_folder",
]
