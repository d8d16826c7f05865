"""Train configs: the paper runs and their tiny variants, the DeepSpeed dict, and bad configs
failing on the driver before any Ray worker starts (fast: no Ray, no DeepSpeed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ttm_ray.config import ConfigError, load_config
from ttm_ray.training.config import TrainConfig
from ttm_ray.training.deepspeed_config import deepspeed_config, warmup_factor

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "jobs" / "configs" / "train"
PAPER = ("dit_stage1", "dit_stage2", "unet_stage1", "unet_stage2")


def load(name: str, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("name", PAPER)
def test_paper_runs_have_the_paper_recipe_on_32_a100(name: str) -> None:
    cfg = load(name)
    family, stage = name.split("_stage")
    assert (cfg.model.family, cfg.model.stage) == (family, int(stage))
    assert cfg.model.size == ("dit-4b" if family == "dit" else "unet-1.4b")
    assert cfg.diffusion.objective == ("flow_matching" if family == "dit" else "ddim")
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps) == (2e-5, 2000, 50_000)
    assert cfg.batch.global_batch == 32
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu) == (32, True)
    assert cfg.scaling.accelerator_type == "A100-80G"
    assert cfg.deepspeed.bf16 and cfg.deepspeed.zero_stage == 2
    # Paper resolutions, as latent grids: DiT 128x256x256 / 8; U-Net 16x512x512 / (1, 8, 8).
    grid = (cfg.model.num_frames, cfg.model.height, cfg.model.width)
    assert grid == ((16, 32, 32) if family == "dit" else (16, 64, 64))
    if stage == "2":
        assert cfg.model.masked_attention_blocks == (10 if family == "dit" else 6)
    # The condition layout each family learned with on the motion task (issue 15).
    assert cfg.model.condition_frames == ("repeat" if family == "dit" else "first")


@pytest.mark.parametrize("name", PAPER)
def test_tiny_variants_inherit_their_run_and_fit_two_cpu_workers(name: str) -> None:
    big, tiny = load(name), load(f"{name}_tiny")
    for section in ("family", "stage", "condition_frames"):
        assert getattr(tiny.model, section) == getattr(big.model, section)
    assert tiny.diffusion.objective == big.diffusion.objective
    assert tiny.model.size.endswith("-tiny") and tiny.model.overrides == {}
    assert (tiny.scaling.num_workers, tiny.scaling.use_gpu) == (2, False)
    assert tiny.encoders.autoencoder.kind == "pixel"
    assert tiny.encoders.text_encoder.kind == big.encoders.text_encoder.kind


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_dict_from_the_typed_config(stage: int) -> None:
    cfg = load("dit_stage1", f"deepspeed.zero_stage={stage}", "batch.micro_batch=2",
               "batch.grad_accum=2", "scaling.num_workers=8", "optim.grad_clip=0.5")
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == cfg.deepspeed.reduce_bucket_size
    assert ("allgather_bucket_size" in zero) == (stage == 2)
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["lr"] == 2e-5
    assert params["torch_adam"] is True and params["betas"] == [0.9, 0.999]
    json.dumps(ds)  # DeepSpeed gets plain data


def test_warmup_is_linear_then_constant() -> None:
    f = warmup_factor(4)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0)(0) == 1.0


def test_global_batch_not_divisible_fails_at_load_with_a_hint() -> None:
    with pytest.raises(ConfigError) as err:
        load("dit_stage1", "scaling.num_workers=24")
    msg = str(err.value)
    assert "batch.global_batch 32 != batch.micro_batch 1 x batch.grad_accum 1 x " \
           "scaling.num_workers 24" in msg
    with pytest.raises(ConfigError, match="grad_accum 2 would fit"):
        load("dit_stage1", "scaling.num_workers=16")


def test_zero_stage_4_fails_at_load() -> None:
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: expected one of 2, 3, got 4"):
        load("dit_stage1_tiny", "deepspeed.zero_stage=4")


def test_unresolvable_model_fails_at_load() -> None:
    with pytest.raises(ConfigError, match="dit-huge"):
        load("dit_stage1_tiny", "model.size=dit-huge")


def test_missing_dataset_version_fails_before_ray(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ttm_ray.runtime
    from ttm_ray.training.trainer import train

    def no_ray(*_: object, **__: object) -> None:
        raise AssertionError("Ray was started for a config that preflight must reject")

    monkeypatch.setattr(ttm_ray.runtime, "init_ray", no_ray)
    cfg = load("dit_stage1_tiny", f"run.root={tmp_path / 'runs'}",
               f"data.dataset_root={tmp_path / 'no-dataset'}", "data.version=v0001-nope")
    # From an empty working dir the tiny encoders' relative paths are missing too: one
    # attempt reports every problem, not only the first.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert re.search(r"data\.version: .*v0001-nope.*not a published", str(err.value))
    assert "encoders.text_encoder.path: runs/quickstart/models/tiny-t5 does not exist" \
        in str(err.value)
    assert not (tmp_path / "runs").exists()  # nothing written either


def test_train_job_exit_contract_on_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.train import main

    code = main(["--config", str(CONFIGS / "dit_stage1_tiny.yaml"),
                 "--set", "deepspeed.zero_stage=4"])
    assert code == 2
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "config_error" and "zero_stage" in summary["error"]


def test_every_train_config_validates_through_the_cli() -> None:
    from jobs.config import main

    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) == 9  # 4 paper runs, 4 tiny variants, the shared tiny fragment
    for path in files:
        assert main(["validate", str(path)]) == 0, path
