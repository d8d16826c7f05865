"""Training preflight on the shipped paper configs: every problem at once, before any worker.

The datasets here are real published versions (``VersionWriter``) whose lineage records the
clip settings data prep used, as ``ttm-ray prep`` writes them; no Ray is started.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ttm_ray.config import ConfigError, load_config
from ttm_ray.dataset.schema import SHARD_SCHEMA
from ttm_ray.dataset.versions import VersionWriter
from ttm_ray.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "jobs" / "configs" / "train"


def publish_dataset(root: Path | str, frames: int, height: int, width: int) -> Path | str:
    """An (empty) published version whose clips are ``frames`` x ``height`` x ``width``."""
    writer = VersionWriter(root)
    writer.write_table("data", SHARD_SCHEMA.empty_table())
    writer.publish({"clip": {"mode": "fixed", "num_frames": frames, "fps": 8.0,
                             "resolutions": [{"name": "x", "height": height, "width": width}]}})
    return root


def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ttm_ray.runtime

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("Ray was started by a preflight")

    monkeypatch.setattr(ttm_ray.runtime, "init_ray", refuse)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_dit_preflight_names_frames_resolution_and_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest,
        store: str) -> None:
    """The issue's check: the shipped DiT stage-1 config on a dataset of 8-frame 64x64 clips
    exits non-zero before any worker, naming the frame and resolution mismatch (through the
    Cosmos CV8x8x8 tokenizer: 121 frames at 256x256) together with the missing weights.
    The same with ``data.dataset_root: s3://...`` (the S3 test server)."""
    from jobs.train import main

    no_ray(monkeypatch)
    base = tmp_path if store == "local" else request.getfixturevalue("s3_bucket")
    dataset = publish_dataset(f"{base}/small", 8, 64, 64)
    code = main(["--config", str(TRAIN / "dit_stage1.yaml"), "--preflight",
                 "--set", f"data.dataset_root={dataset}",
                 "--set", f"run.root={tmp_path / 'runs'}"])
    err = capsys.readouterr()
    assert code == 2
    summary = json.loads(err.out.strip().splitlines()[-1])
    assert summary["status"] == "config_error"
    text = err.err
    assert re.search(r"data\.dataset_root: .* has 8-frame clips; .* need 121 frames", text)
    assert re.search(r"has clips cut for 64x64 .* need 256x256", text)
    assert "jobs/configs/prep/dit.yaml" in text  # the fix names the prep config
    assert "encoders.autoencoder.path: /mnt/models/cosmos-tokenizer-cv8x8x8 does not exist" \
        in text
    assert "encoders.text_encoder.path: /mnt/models/t5-v1_1-xxl does not exist" in text
    assert re.search(r"model\.init_from: .*/mnt/models/ttm/dit-4b-t2v", text)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_preflight_passes_on_the_matching_dataset(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset jobs/configs/prep/dit.yaml describes is what dit_stage1.yaml needs: with
    the weights present (a tiny Cosmos tokenizer with the real 8x8x8 factors), preflight
    passes and reports a 121x256x256 clip."""
    from ttm_ray.conditioning.tiny import build_tiny_t5, build_tiny_video_vae
    from ttm_ray.training.trainer import train

    no_ray(monkeypatch)
    prep = load_config_dict(REPO / "jobs" / "configs" / "prep" / "dit.yaml")
    res = prep["clip"]["resolutions"][0]
    dataset = publish_dataset(tmp_path / "dit", prep["clip"]["num_frames"], res["height"],
                              res["width"])
    vae = build_tiny_video_vae(tmp_path / "cosmos")
    t5 = build_tiny_t5(tmp_path / "t5")
    cfg = load_config(TrainConfig, TRAIN / "dit_stage1.yaml", [
        f"data.dataset_root={dataset}", f"run.root={tmp_path / 'runs'}",
        f"encoders.autoencoder.path={vae}", f"encoders.text_encoder.path={t5}",
        "model.init_from=null", "model.latent_channels=4"])
    summary = train(cfg, preflight_only=True)
    assert summary["clip"] == "121x256x256" and summary["preflight"] == "passed"


def load_config_dict(path: Path) -> dict:
    from ttm_ray.config.loader import load_merged

    return load_merged(path)


def test_prep_frame_count_follows_the_autoencoder() -> None:
    """jobs/configs/prep/dit.yaml's frame count is derived, not restated: the pixel frames of
    dit_stage1.yaml's latent grid through a causal 8x tokenizer (1 + 8k)."""
    from ttm_ray.conditioning.autoencoders import pixel_frames

    prep = load_config_dict(REPO / "jobs" / "configs" / "prep" / "dit.yaml")
    model = load_config(TrainConfig, TRAIN / "dit_stage1.yaml").model
    assert prep["clip"]["num_frames"] == pixel_frames(model.num_frames, 8, causal=True) == 121
    assert pixel_frames(16, 8, causal=False) == 128  # the paper's MovieGen TAE count
    unet = load_config(TrainConfig, TRAIN / "unet_stage1.yaml").model
    shipped = load_config_dict(REPO / "jobs" / "configs" / "prep" / "production.yaml")
    assert shipped["clip"]["num_frames"] == pixel_frames(unet.num_frames, 1, causal=False)


def test_geometry_without_weights_matches_the_loaded_vae(tmp_path: Path) -> None:
    """The preflight reads factors from config.json; they equal what the loaded VAE uses."""
    from ttm_ray.conditioning.autoencoders import AutoencoderConfig, geometry
    from ttm_ray.conditioning.tiny import build_tiny_image_vae, build_tiny_video_vae

    for kind, path in (("video_vae", build_tiny_video_vae(tmp_path / "v")),
                       ("image_vae", build_tiny_image_vae(tmp_path / "i"))):
        cfg = AutoencoderConfig(kind=kind, path=str(path))
        geo, ae = geometry(cfg), cfg.build()
        assert (geo.temporal_factor, geo.spatial_factor, geo.spatial_factor) == ae.factors
        assert geo.causal == ae.causal
        assert geo.pixel_shape(3, 4, 4) == ae.pixel_shape(3, 4, 4)[1:]
    missing = geometry(AutoencoderConfig(kind="video_vae", path=str(tmp_path / "none")))
    assert (missing.temporal_factor, missing.spatial_factor) == (8, 8)  # Cosmos defaults
    assert "defaults" in missing.source


def test_missing_weights_are_reported_by_key(tmp_path: Path) -> None:
    from ttm_ray.training.preflight import missing_paths

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    cfg = load_config(TrainConfig, TRAIN / "unet_stage1.yaml", [
        f"encoders.autoencoder.path={empty}",
        f"encoders.text_encoder.path={tmp_path / 'noweights'}"])
    problems = "\n".join(missing_paths(cfg))
    assert f"encoders.autoencoder.path: no {empty / 'config.json'}" in problems
    assert "encoders.text_encoder.path:" in problems and "no weights file" in problems
    assert "model.overrides.pretrained_unet: /mnt/models/stable-diffusion-v1-5/unet" in problems
    assert "model.overrides.motion_adapter:" in problems


def test_unset_environment_reference_is_a_config_error(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    overlay = tmp_path / "x.yaml"
    overlay.write_text(f"base: {TRAIN / 'dit_stage1.yaml'}\nrun: {{root: '${{NO_SUCH_ROOT}}/r'}}\n")
    monkeypatch.delenv("NO_SUCH_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"run\.root: environment variable NO_SUCH_ROOT"):
        load_config(TrainConfig, overlay)
    monkeypatch.setenv("NO_SUCH_ROOT", str(tmp_path))
    assert load_config(TrainConfig, overlay).run.root == f"{tmp_path}/r"
