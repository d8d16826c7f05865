"""The exported weights (ZeRO-2 and ZeRO-3 checkpoints consolidated to safetensors + the model
config) reload with build_model and reproduce the trained engine's output on the probe batch
recorded inside the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from train_runs import train_tiny

from ttm_ray.config import from_dict
from ttm_ray.models import ModelConfig, build_model
from ttm_ray.training.checkpoint import Probe


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("name", ["dit_stage2_tiny", "unet_stage2_tiny"])
def test_export_reloads_and_matches_the_engine(
        name: str, zero: int, ray_local, tmp_path_factory: pytest.TempPathFactory,
        tiny_dataset: Path, tiny_encoders: dict[str, Path]) -> None:
    cfg, summary = train_tiny(name, tmp_path_factory, tiny_dataset, tiny_encoders,
                              f"deepspeed.zero_stage={zero}")
    export = Path(summary["export"])
    model_cfg = from_dict(ModelConfig, {**yaml.safe_load((export / "model.yaml").read_text()),
                                        "init_from": str(export)})
    assert (model_cfg.family, model_cfg.size, model_cfg.stage) == \
        (cfg.model.family, cfg.model.size, 2)
    model = build_model(model_cfg).eval()
    probe = Probe.load(Path(summary["checkpoint"]) / "probe.safetensors")
    assert probe.cond.token_ids is not None  # stage 2: the masked layers took part
    with torch.no_grad():
        out = model(probe.x_t, probe.t, probe.cond)
    torch.testing.assert_close(out, probe.out, rtol=1e-4, atol=1e-5)
    # Trained weights, not the initial ones: a fresh model of the same config differs.
    torch.manual_seed(cfg.run.seed)
    fresh = build_model(from_dict(ModelConfig, {**yaml.safe_load(
        (export / "model.yaml").read_text())})).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(probe.x_t, probe.t, probe.cond), probe.out, atol=1e-4)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path: Path) -> None:
    """What a rank saves restores every stream it draws from (fast: no Ray, no DeepSpeed)."""
    import random

    import numpy as np

    from ttm_ray.training.checkpoint import TrainState, rng_state, set_rng_state

    state = TrainState.fresh(seed=3, rank=1)
    torch.save(rng_state(state.generator), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(2),
             torch.rand(2, generator=state.generator))
    other = torch.Generator().manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), other)
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=other))
    assert draws[:2] == again[:2]
    assert torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])
    # Ranks draw different noise from the same run seed.
    assert not torch.equal(torch.rand(4, generator=TrainState.fresh(3, 0).generator),
                           torch.rand(4, generator=TrainState.fresh(3, 1).generator))


def test_latest_meta_skips_interrupted_uploads(tmp_path: Path) -> None:
    import json

    from ttm_ray.training.checkpoint import latest_meta

    assert latest_meta(str(tmp_path / "none")) is None
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"step_{step:08d}"
        folder.mkdir()
        if complete:
            (folder / "meta.json").write_text(json.dumps({"step": step}))
    assert latest_meta(str(tmp_path)) == {"step": 8}
