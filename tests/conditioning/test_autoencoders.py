"""Autoencoders: tiny random VAEs saved with save_pretrained and loaded through the real code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ttm_ray.conditioning.autoencoders import (
    AutoencoderConfig,
    PixelAutoencoder,
    VideoVAE,
)
from ttm_ray.conditioning.tiny import build_tiny_image_vae, build_tiny_video_vae
from ttm_ray.config import ConfigError, from_dict


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_image_vae(tmp_path_factory.mktemp("image_vae"))


@pytest.fixture(scope="module")
def cosmos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_video_vae(tmp_path_factory.mktemp("cosmos"), "AutoencoderKLCosmos")


def _video(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def _assert_frozen(ae: torch.nn.Module) -> None:
    ae.train()  # a parent switching to training must not unfreeze it
    assert not ae.training and not any(m.training for m in ae.modules())
    assert all(not p.requires_grad for p in ae.parameters())


# --- pixel ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("f", "ft"), [(1, 1), (4, 1), (2, 2), (4, 4)])
def test_pixel_is_an_exact_inverse(f: int, ft: int) -> None:
    ae = AutoencoderConfig(kind="pixel", spatial_factor=f, temporal_factor=ft).build()
    x = _video(2, 8, 16, 24)
    z = ae.encode(x)
    assert ae.latent_channels == 3 * ft * f * f and ae.factors == (ft, f, f)
    assert tuple(z.shape) == (2, *ae.latent_shape(8, 16, 24))
    assert tuple(z.shape[1:]) == (3 * ft * f * f, 8 // ft, 16 // f, 24 // f)
    assert torch.equal(ae.decode(z), x)
    assert ae.pixel_shape(*z.shape[2:]) == (3, 8, 16, 24)
    _assert_frozen(ae)


def test_pixel_matches_pixel_unshuffle_per_frame() -> None:
    ae = PixelAutoencoder(spatial_factor=4, temporal_factor=1)
    x = _video(1, 3, 8, 8)
    z = ae.encode(x)
    for t in range(3):
        assert torch.equal(z[:, :, t], F.pixel_unshuffle(x[:, :, t], 4))


def test_pixel_single_image_is_a_still_clip() -> None:
    ae = PixelAutoencoder(spatial_factor=2, temporal_factor=2)
    image = _video(2, 1, 8, 8)[:, :, 0]
    z = ae.encode_image(image)
    assert z.shape == (2, 3 * 2 * 2 * 2, 1, 4, 4)
    still = image[:, :, None].expand(-1, -1, 2, -1, -1)
    assert torch.equal(z, ae.encode(still))
    assert torch.equal(ae.decode(z), still)


def test_pixel_rejects_grids_it_cannot_fold() -> None:
    ae = PixelAutoencoder(spatial_factor=4, temporal_factor=2)
    with pytest.raises(ValueError, match=r"multiple of 2"):
        ae.latent_shape(3, 16, 16)
    with pytest.raises(ValueError, match=r"height 10 is not divisible"):
        ae.encode(_video(1, 2, 10, 16))
    with pytest.raises(ValueError, match=r"float video"):
        ae.encode(torch.zeros(1, 3, 2, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"float latent \[B, 96"):
        ae.decode(torch.zeros(1, 4, 1, 4, 4))


def test_pixel_keeps_dtype_and_device() -> None:
    ae = PixelAutoencoder(spatial_factor=2)
    x = _video(1, 2, 4, 4).to(torch.bfloat16)
    z = ae.encode(x)
    assert z.dtype == torch.bfloat16 and z.device == x.device and ae.device is None


# --- image VAE (AutoencoderKL per frame) -------------------------------------------------------

def test_image_vae_round_trip_and_scaling(image_vae_dir: Path) -> None:
    ae = AutoencoderConfig(kind="image_vae", path=str(image_vae_dir), chunk_frames=2).build()
    assert ae.factors == (1, 8, 8) and ae.latent_channels == 4 and not ae.causal
    x = _video(2, 3, 32, 16)
    z = ae.encode(x)
    assert tuple(z.shape[1:]) == ae.latent_shape(3, 32, 16) == (4, 3, 4, 2)
    # Reference: the diffusers VAE on one frame, scaled by its config's scaling_factor.
    raw = ae.vae.encode(x[:, :, 1]).latent_dist.mode() * ae.vae.config.scaling_factor
    torch.testing.assert_close(z[:, :, 1], raw, rtol=1e-4, atol=1e-5)
    assert ae.scaling_factor == pytest.approx(0.18215)
    # Chunking bounds memory without changing the result.
    whole = AutoencoderConfig(kind="image_vae", path=str(image_vae_dir), chunk_frames=64).build()
    torch.testing.assert_close(whole.encode(x), z, rtol=1e-4, atol=1e-5)
    y = ae.decode(z)
    assert y.shape == x.shape and ae.pixel_shape(3, 4, 2) == (3, 3, 32, 16)
    ref = ae.vae.decode(z[:, :, 0] / ae.vae.config.scaling_factor).sample
    torch.testing.assert_close(y[:, :, 0], ref, rtol=1e-4, atol=1e-5)
    assert ae.encode_image(x[:, :, 0]).shape == (2, 4, 1, 4, 2)
    _assert_frozen(ae)


def test_image_vae_dtype_and_pipeline_layout(image_vae_dir: Path, tmp_path: Path) -> None:
    pipeline = tmp_path / "sd15"
    shutil.copytree(image_vae_dir, pipeline / "vae")  # a diffusers pipeline folder
    ae = AutoencoderConfig(kind="image_vae", path=str(pipeline), dtype="bfloat16").build("cpu")
    assert ae.dtype == torch.bfloat16 and ae.device == torch.device("cpu")
    z = ae.encode(_video(1, 1, 16, 16))
    assert z.dtype == torch.float32 and z.shape == (1, 4, 1, 2, 2)
    assert ae.decode(z).dtype == torch.float32


# --- video VAE (diffusers temporal autoencoders) -----------------------------------------------

def test_cosmos_factors_shapes_and_normalisation(cosmos_dir: Path) -> None:
    ae = AutoencoderConfig(kind="video_vae", path=str(cosmos_dir),
                           class_name="AutoencoderKLCosmos").build()
    assert isinstance(ae, VideoVAE) and ae.causal
    assert ae.factors == (8, 8, 8) and ae.latent_channels == 4  # read from the config
    x = _video(1, 9, 8, 16)
    z = ae.encode(x)
    assert tuple(z.shape[1:]) == ae.latent_shape(9, 8, 16) == (4, 2, 1, 2)
    # Normalised with the config's per-channel, per-latent-frame statistics.
    cfg = ae.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, 4, -1, 1, 1)[:, :, :2]
    std = torch.tensor(cfg.latents_std).view(1, 4, -1, 1, 1)[:, :, :2]
    raw = ae.vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-4, atol=1e-5)
    y = ae.decode(z)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ae.vae.decode(raw).sample, rtol=1e-4, atol=1e-4)
    # Causal: the image's latent is the first latent frame of any clip starting with it.
    torch.testing.assert_close(ae.encode_image(x[:, :, 0]), z[:, :, :1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"1 \+ 8k frames, e.g. 1 or 9"):
        ae.latent_shape(8, 16, 16)
    # Latent frames past the statistics table reuse its last column.
    assert ae.latent_shape(17, 16, 16) == (4, 3, 2, 2)
    assert ae._stats_for(3, z)[0].shape == (1, 4, 3, 1, 1)
    _assert_frozen(ae)


@pytest.mark.parametrize(("class_name", "factors", "t", "hw"), [
    ("AutoencoderKLWan", (2, 4, 4), 5, 16),  # scale_factor_spatial/temporal, z_dim
    ("AutoencoderKLHunyuanVideo", (4, 8, 8), 5, 16),  # scaling_factor, no statistics
    ("AutoencoderKLLTXVideo", (8, 32, 32), 9, 32),  # factors computed in __init__, buffers
])
def test_other_video_vaes_read_their_own_config(tmp_path: Path, class_name: str,
                                                factors: tuple[int, int, int], t: int,
                                                hw: int) -> None:
    path = build_tiny_video_vae(tmp_path / class_name, class_name)
    ae = AutoencoderConfig(kind="video_vae", path=str(path), class_name=class_name).build()
    assert ae.factors == factors and ae.latent_channels == 4
    x = _video(1, t, hw, hw)
    z = ae.encode(x)
    assert tuple(z.shape[1:]) == ae.latent_shape(t, hw, hw)
    assert z.shape[2] == 1 + (t - 1) // factors[0]
    assert ae.decode(z).shape == x.shape


# --- config and errors -------------------------------------------------------------------------

def test_missing_path_names_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*save_pretrained"):
        AutoencoderConfig(kind="image_vae", path=str(missing)).build()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        AutoencoderConfig(kind="video_vae", path=str(tmp_path / "empty")).build()
    with pytest.raises(ValueError, match=r"needs autoencoder.path"):
        AutoencoderConfig(kind="video_vae").build()


def test_wrong_class_names_the_fix(cosmos_dir: Path, image_vae_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"kind: video_vae, class_name: AutoencoderKLCosmos"):
        AutoencoderConfig(kind="image_vae", path=str(cosmos_dir)).build()
    with pytest.raises(ValueError, match=r"holds a AutoencoderKLCosmos.*class_name: "
                                         r"AutoencoderKLCosmos"):
        AutoencoderConfig(kind="video_vae", path=str(cosmos_dir),
                          class_name="AutoencoderKLWan").build()
    with pytest.raises(ValueError, match=r"kind: image_vae"):
        AutoencoderConfig(kind="video_vae", path=str(image_vae_dir)).build()
    with pytest.raises(ValueError, match=r"not a supported video autoencoder"):
        AutoencoderConfig(kind="video_vae", path=str(cosmos_dir), class_name="Nope").build()
    with pytest.raises(ValueError, match=r"spatial_factor applies to kind 'pixel' only"):
        AutoencoderConfig(kind="image_vae", path=str(image_vae_dir), spatial_factor=4).build()


def test_config_loads_from_yaml_shaped_dicts() -> None:
    cfg = from_dict(AutoencoderConfig, {"kind": "pixel", "spatial_factor": 2})
    assert cfg.build().factors == (1, 2, 2)
    with pytest.raises(ConfigError, match=r"spatial_factor"):
        from_dict(AutoencoderConfig, {"kind": "pixel", "spatial_factor": 0})
    with pytest.raises(ConfigError, match=r"kind"):
        from_dict(AutoencoderConfig, {"kind": "vqvae"})
