"""DiffusionConfig picks the objective; both objectives are seeded-deterministic end to end."""

from __future__ import annotations

import pytest
import torch

from ttm_ray.config import ConfigError, from_dict, to_dict
from ttm_ray.diffusion import DDIM, DiffusionConfig, FlowMatching

SHAPE = (2, 2, 3, 4, 4)


def test_build_picks_the_objective():
    assert isinstance(DiffusionConfig().build(), FlowMatching)
    ddim = from_dict(DiffusionConfig, {"objective": "ddim", "ddim": {"num_inference_steps": 7}})
    built = ddim.build()
    assert isinstance(built, DDIM) and built.cfg.num_inference_steps == 7
    fm = from_dict(DiffusionConfig, {"flow_matching": {"num_steps": 10}})
    assert isinstance(fm.build(), FlowMatching) and fm.build().cfg.num_steps == 10
    assert from_dict(DiffusionConfig, to_dict(ddim)) == ddim
    with pytest.raises(ConfigError, match="objective"):
        from_dict(DiffusionConfig, {"objective": "ddpm"})
    with pytest.raises(ConfigError, match="disjoint"):
        from_dict(DiffusionConfig, {"guidance": {"p_drop_both": 0.95}})


def small(objective: str, **guidance) -> DiffusionConfig:
    cfg = DiffusionConfig(objective=objective)
    cfg.flow_matching.num_steps = 6
    cfg.ddim.num_inference_steps = 6
    cfg.ddim.eta = 0.5  # stochastic DDIM: its per-step noise must be seeded too
    for key, value in guidance.items():
        setattr(cfg.guidance, key, value)
    return cfg


@pytest.mark.parametrize("objective", ["flow_matching", "ddim"])
def test_same_seed_same_sample_other_seed_other_sample(objective, cond_factory, null_text,
                                                       toy_denoiser):
    cfg = small(objective)
    obj = cfg.build()
    guidance = cfg.guidance.build(*null_text)
    cond = cond_factory(2)

    def draw(seed: int, guided: bool = True) -> torch.Tensor:
        return obj.sample(toy_denoiser, SHAPE, cond, torch.Generator().manual_seed(seed),
                          guidance if guided else None)

    with torch.no_grad():
        a, b, c = draw(0), draw(0), draw(1)
        unguided = draw(0, guided=False)
    assert a.shape == SHAPE and a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, unguided)  # guidance changes the toy's sample


@pytest.mark.parametrize("objective", ["flow_matching", "ddim"])
def test_training_step_is_seeded(objective, cond_factory, null_text, toy_denoiser):
    """Dropout then loss, as training calls them: same seed -> same loss, gradients flow."""
    cfg = small(objective, p_drop_text=0.3, p_drop_visual=0.3, p_drop_both=0.3)
    obj = cfg.build()
    guidance = cfg.guidance.build(*null_text)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    cond = cond_factory(2)

    def step(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return obj.loss(toy_denoiser, x, guidance.drop(cond, g), g)

    first = step(0)
    first.backward()
    assert toy_denoiser.conv.weight.grad is not None
    assert step(0).item() == first.item()
    assert step(1).item() != first.item()
