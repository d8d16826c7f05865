"""The encoded-latent cache: ``ttm-ray encode``'s job on the session's tiny dataset, training
batches read from it against on-the-fly encoding (same tensors, same loss for a fixed batch
and seed), incremental reruns, and the training preflight's refusal of other encoders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ttm_ray.conditioning.autoencoders import AutoencoderConfig
from ttm_ray.conditioning.encoders import EncodersConfig
from ttm_ray.conditioning.text_encoders import TextEncoderConfig
from ttm_ray.config import ConfigError, RunConfig
from ttm_ray.dataset.versions import open_version
from ttm_ray.encoding.config import EncodeConfig, EncodeOutputConfig
from ttm_ray.encoding.job import run_encode
from ttm_ray.models import ModelConfig, build_model
from ttm_ray.training.data import TrainDataConfig, TrainingData
from ttm_ray.training.encoded_data import EncodedTrainingData

pytestmark = pytest.mark.slow

PIXEL = AutoencoderConfig(kind="pixel", spatial_factor=4, temporal_factor=1)


def model_config(family: str, stage: int) -> ModelConfig:
    # Each family's condition layout as its paper configs set it (the DiT repeats E(x0), E(s0)).
    return ModelConfig(family=family, size=f"{family}-tiny", stage=stage, latent_channels=48,
                       num_frames=4, height=8, width=8,
                       condition_frames="repeat" if family == "dit" else "first")


def encoders_config(family: str, tiny_encoders: dict[str, Path]) -> EncodersConfig:
    kind = "t5" if family == "dit" else "clip"
    return EncodersConfig(PIXEL, TextEncoderConfig(
        kind=kind, path=str(tiny_encoders["t5" if family == "dit" else "clip_text"]),
        max_length=16))


@pytest.fixture(scope="module")
def encoded(tiny_dataset: Path, tiny_encoders: dict[str, Path], ray_local,
            tmp_path_factory: pytest.TempPathFactory):
    """``family -> (EncodeConfig, first summary)``: each family encoded once per module."""
    out = {}
    for family in ("unet", "dit"):
        cfg = EncodeConfig(
            run=RunConfig(root=str(tmp_path_factory.mktemp("encode")), name=f"enc-{family}"),
            model=model_config(family, 2), data=TrainDataConfig(dataset_root=str(tiny_dataset)),
            encoders=encoders_config(family, tiny_encoders),
            output=EncodeOutputConfig(
                dataset_root=str(tmp_path_factory.mktemp(f"encoded-{family}")), rows_per_file=4))
        out[family] = (cfg, run_encode(cfg, progress=False))
    return out


def test_encode_publishes_a_version_with_lineage_and_reruns_are_incremental(
        encoded, tiny_dataset: Path) -> None:
    cfg, summary = encoded["unet"]
    source = open_version(tiny_dataset)
    version = open_version(summary["dataset_root"])
    version.verify()
    assert summary["encoded"] + summary["rejected"] == source.manifest["rows"]["data"]
    assert summary["encoded"] >= 8 and summary["reused"] == 0
    lineage = version.manifest["lineage"]
    assert lineage["kind"] == "encoded"
    assert lineage["source"] == {"dataset_root": str(source.root), "version": source.name}
    assert lineage["encoders"]["text_encoder"]["kind"] == "clip"
    assert lineage["geometry"]["pixel_shape"] == [4, 32, 32]
    assert (version.read_bytes("card/README.md").decode()).startswith("# Encoded version")
    # Same source, same encoders: nothing to do, no new version.
    again = run_encode(cfg, progress=False)
    assert again["up_to_date"] and again["encoded_version"] == summary["encoded_version"]


def test_a_new_encoded_version_reuses_rows_by_encoding_hash(encoded, tmp_path: Path) -> None:
    """A new encoded version of the same hash (here: a copy of the source under a new root
    with the previous encoded root) encodes nothing and shares the previous files."""
    import shutil

    cfg, summary = encoded["unet"]
    src = Path(cfg.data.dataset_root)
    copy = tmp_path / "dataset"
    shutil.copytree(src, copy)
    out = tmp_path / "encoded"
    shutil.copytree(summary["dataset_root"], out)
    # Pretend the encoded version came from the copied root: the version name is the same,
    # so only the root differs and the rerun must re-check every clip by id.
    second = run_encode(replace(cfg, data=replace(cfg.data, dataset_root=str(copy)),
                                output=replace(cfg.output, dataset_root=str(out))),
                        progress=False)
    assert not second["up_to_date"]
    assert second["encoded"] == 0 and second["reused"] == summary["encoded"]
    version = open_version(out)
    assert all(f.get("version") for f in version.manifest["files"]
               if f["table"] == "data" and f["rows"])
    assert version.manifest["rows"]["data"] == summary["encoded"]


def _loss(data, model, indices, family: str, stage: int) -> torch.Tensor:
    """The training step's loss (condition dropout included) for a fixed batch and seed."""
    from ttm_ray.diffusion import DiffusionConfig

    diffusion = DiffusionConfig(objective="flow_matching" if family == "dit" else "ddim")
    x, cond = data.batch(indices)
    null = data.null_text(1) if isinstance(data, EncodedTrainingData) \
        else data.encoders.null_text(1)
    guidance = replace(diffusion.guidance, p_drop_text=0.3, p_drop_visual=0.3,
                       p_drop_both=0.3).build(*null)
    generator = torch.Generator().manual_seed(5)
    cond = guidance.drop(cond, generator)
    return diffusion.build().loss(lambda xt, t, c: model(xt, t, c), x, cond, generator)


@pytest.mark.parametrize("family, stage", [("unet", 2), ("dit", 1)])
def test_cached_batches_and_loss_match_on_the_fly(encoded, tiny_dataset: Path,
                                                  family: str, stage: int) -> None:
    cfg, summary = encoded[family]
    model_cfg = model_config(family, stage)
    fly = TrainingData(TrainDataConfig(dataset_root=str(tiny_dataset)), stage, model_cfg,
                       cfg.encoders.build("cpu"), "cpu")
    cached = EncodedTrainingData(TrainDataConfig(encoded=summary["dataset_root"]), stage,
                                 model_cfg, "cpu")
    assert cached.pixel_shape == fly.pixel_shape
    # The same clips by id (the encoded version keeps its own row order).
    ids = cached._rows.clip_ids
    fly_index = {c: i for i, c in enumerate(fly._rows.clip_ids)}
    picks = [0, 1, 2]
    x_c, cond_c = cached.batch(picks)
    x_f, cond_f = fly.batch([fly_index[ids[i]] for i in picks])
    torch.testing.assert_close(x_c, x_f, atol=1e-5, rtol=1e-5)
    for name in ("visual", "text", "text_mask", "local_text", "local_text_ids", "token_ids"):
        a, b = getattr(cond_c, name), getattr(cond_f, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    if model_cfg.condition_frames == "repeat":  # the cached first frames fill every frame
        assert torch.equal(cond_c.visual[:, :96, 1:],
                           cond_c.visual[:, :96, :1].expand(-1, -1, 3, -1, -1))
    torch.testing.assert_close(cached.null_text(2)[0], fly.encoders.null_text(2)[0])
    torch.manual_seed(0)
    model = build_model(model_cfg)
    loss_c = _loss(cached, model, picks, family, stage)
    loss_f = _loss(fly, model, [fly_index[ids[i]] for i in picks], family, stage)
    assert torch.isfinite(loss_c)
    torch.testing.assert_close(loss_c, loss_f, atol=1e-5, rtol=1e-5)


def test_training_preflight_refuses_other_encoders(encoded, tiny_dataset: Path) -> None:
    from ttm_ray.training.config import TrainConfig
    from ttm_ray.training.preflight import preflight
    from ttm_ray.training.trainer import resolve_paths

    cfg, summary = encoded["unet"]
    train = TrainConfig(model=model_config("unet", 2), encoders=cfg.encoders,
                        data=TrainDataConfig(dataset_root=str(tiny_dataset),
                                             encoded=summary["dataset_root"]))
    train = resolve_paths(replace(train, run=replace(train.run, root=cfg.run.root, name="pre")))
    pre = preflight(train)
    assert pre.dataset_version == summary["encoded_version"]
    other = replace(train, encoders=replace(train.encoders, text_encoder=replace(
        train.encoders.text_encoder, max_length=12)))
    with pytest.raises(ConfigError, match=r"encoders\.text_encoder\.max_length: 12"):
        preflight(other)
    dit = replace(train, model=model_config("dit", 2))
    with pytest.raises(ConfigError, match=r"geometry\.token_grid"):
        preflight(dit)
    # relabelled colours are in the stored trajectory latents: a run asking for them refuses
    # a version encoded without
    slots = replace(train, data=replace(train.data, colour_slots=3))
    with pytest.raises(ConfigError, match=r"geometry\.colour_slots"):
        preflight(slots)
    # ... and the other way: a version encoded with relabelled colours is refused by a run
    # with prep's. A version made before the option records no colour keys (as one encoded
    # with prep's colours does now): it matches a run with prep's colours.
    from ttm_ray.conditioning.autoencoders import geometry
    from ttm_ray.dataset.versions import DatasetVersion
    from ttm_ray.training.preflight import encoded_problems

    version = open_version(summary["dataset_root"], summary["encoded_version"])
    recorded = version.manifest["lineage"]["geometry"]
    assert "colour_slots" not in recorded and "colour_seed" not in recorded
    ae = geometry(train.encoders.autoencoder)
    assert encoded_problems(train, version, ae) == []
    lineage = {**version.manifest["lineage"],
               "geometry": {**recorded, "colour_slots": 3, "colour_seed": 0}}
    relabelled = DatasetVersion(version.root, version.name,
                                {**version.manifest, "lineage": lineage})
    problems = encoded_problems(train, relabelled, ae)
    assert len(problems) == 1, problems
    assert "geometry.colour_slots: 0 (train config) != 3 (encoded)" in problems[0]
    assert encoded_problems(slots, relabelled, ae) == []


def test_a_tiny_run_trains_from_the_encoded_version(ray_local, tiny_dataset: Path,
                                                    tiny_encoders: dict[str, Path],
                                                    tmp_path_factory: pytest.TempPathFactory
                                                    ) -> None:
    """unet_stage2_tiny on Ray Train from its encoded version: trains, exports, and its MLflow
    run names the encoded version it read."""
    from mlflow.tracking import MlflowClient
    from train_runs import tiny_config

    from ttm_ray.training.trainer import train

    root = tmp_path_factory.mktemp("encoded_run")
    base = tiny_config("unet_stage2_tiny", root, tiny_dataset, tiny_encoders,
                       "optim.max_steps=4", "checkpoint.every_steps=2", "logging.sample_every=4")
    enc = run_encode(EncodeConfig.from_train(base, output=EncodeOutputConfig(
        dataset_root=str(root / "encoded"))), progress=False)
    cfg = tiny_config("unet_stage2_tiny", root, tiny_dataset, tiny_encoders,
                      "optim.max_steps=4", "checkpoint.every_steps=2", "logging.sample_every=4",
                      f"data.encoded={enc['dataset_root']}")
    summary = train(cfg)
    assert summary["dataset_version"] == enc["encoded_version"]
    assert (Path(summary["export"]) / "model.safetensors").is_file()
    run = MlflowClient(tracking_uri=cfg.run.resolved_mlflow_uri()).get_run(
        summary["mlflow_run_id"])
    assert run.data.tags["ttm.encoded_version"] == \
        f"{enc['dataset_root']}@{enc['encoded_version']}"
    assert run.data.params["data.encoded"] == enc["dataset_root"]
    loss = run.data.metrics["loss"]
    assert loss == loss and abs(loss) < 1e6  # finite
