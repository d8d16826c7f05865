"""build_model: the registry, validation through ModelConfig, weights round trip, reports."""

from __future__ import annotations

import pytest
import torch

from ttm_ray.config import ConfigError, from_dict
from ttm_ray.models import ModelConfig, build_model, count_parameters, resolve_family_config
from ttm_ray.models.flops import example_inputs


def tiny(stage: int = 1, **kw) -> ModelConfig:
    fields = {"family": "dit", "size": "dit-tiny", "stage": stage, "latent_channels": 4,
              "num_frames": 4, "height": 8, "width": 8, **kw}
    return from_dict(ModelConfig, fields)


def test_unknown_size_and_override_fail_in_config_validation() -> None:
    with pytest.raises(ConfigError, match="dit-huge"):
        from_dict(ModelConfig, {"family": "dit", "size": "dit-huge"})
    with pytest.raises(ConfigError, match="deepth"):
        from_dict(ModelConfig, {"family": "dit", "size": "dit-tiny",
                                "overrides": {"deepth": 2}})
    with pytest.raises(ConfigError, match="family"):
        from_dict(ModelConfig, {"family": "gan"})


def test_stage_decides_masked_layers() -> None:
    assert resolve_family_config(tiny(1)).masked_blocks == 0
    assert resolve_family_config(tiny(2)).masked_blocks > 0
    assert resolve_family_config(tiny(2, masked_attention_blocks=1)).masked_blocks == 1


def test_meta_build_allocates_nothing_and_counts() -> None:
    model = build_model(tiny(2), device="meta")
    assert all(p.is_meta for p in model.parameters())
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["masked_layers"] > 0


def test_stage1_weights_initialise_stage2(tmp_path) -> None:
    """A stage-2 model starts from exported stage-1 weights (missing keys: the masked layers
    only) and, with its zero-initialised additions, predicts exactly what stage 1 does."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    stage1 = build_model(tiny(1)).eval()
    save_file(stage1.state_dict(), tmp_path / "model.safetensors")
    stage2 = build_model(tiny(2, init_from=str(tmp_path))).eval()
    x_t, t, cond = example_inputs(tiny(2), stage2, batch=2, text_tokens=5, local_tokens=6)
    x_t = torch.randn_like(x_t)
    cond = cond.replace(text=torch.randn_like(cond.text), visual=torch.randn_like(cond.visual))
    with torch.no_grad():
        assert torch.allclose(stage2(x_t, t, cond), stage1(x_t, t, cond), atol=1e-6)


def test_init_from_mismatch_is_a_clear_error(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"nonsense": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="do not match the model"):
        build_model(tiny(1, init_from=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="init_from"):
        build_model(tiny(1, init_from=str(tmp_path / "missing")))
