"""DDIM (U-Net path): zero terminal SNR, trailing spacing, the v target, an oracle round trip."""

from __future__ import annotations

import itertools

import pytest
import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.config import ConfigError, from_dict
from ttm_ray.diffusion import (
    DDIMConfig,
    GuidanceConfig,
    build_scheduler,
    ddim_loss,
    ddim_sample,
    ddim_training_target,
    sample_timesteps,
)

SHAPE = (2, 2, 3, 4, 4)


def test_zero_terminal_snr_and_trailing_spacing():
    scheduler = build_scheduler()
    a = scheduler.alphas_cumprod.double()
    assert len(a) == 1000
    assert abs(a[-1].item()) <= 1e-12  # t = 999 is pure noise: no signal left at all
    assert bool((a[1:] < a[:-1]).all()) and a[0].item() > 0.99
    # without the rescale the default schedule keeps signal at t = 999 (what the rescale fixes)
    plain = build_scheduler(DDIMConfig(rescale_betas_zero_snr=False))
    assert plain.alphas_cumprod[-1].item() > 1e-3

    scheduler.set_timesteps(50)
    ts = scheduler.timesteps.tolist()
    assert ts[0] == 999 and ts[-1] == 19 and len(ts) == 50
    assert {a - b for a, b in itertools.pairwise(ts)} == {20}
    assert scheduler.final_alpha_cumprod.item() == 1.0  # the last step lands on clean data
    leading = build_scheduler(DDIMConfig(timestep_spacing="leading"))
    leading.set_timesteps(50)
    assert leading.timesteps[0].item() < 999  # why trailing: leading never sees pure noise


def test_v_target_matches_formula_and_get_velocity():
    scheduler = build_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in (torch.tensor([999, 0]), torch.tensor([500, 19])):
        x_t, v = ddim_training_target(scheduler, x0, noise, t)
        a = scheduler.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1, 1)
        v_formula = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
        x_formula = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
        torch.testing.assert_close(v.double(), v_formula, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x_t.double(), x_formula, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, scheduler.get_velocity(x0, noise, t))
    # at the terminal timestep the input is the noise itself and v = -x0
    x_t, v = ddim_training_target(scheduler, x0, noise, torch.tensor([999, 999]))
    torch.testing.assert_close(x_t, noise, atol=1e-7, rtol=0)
    torch.testing.assert_close(v, -x0, atol=1e-7, rtol=0)


def v_oracle(x0: torch.Tensor, calls: list | None = None):
    """The exact v for a known x0: eps from (x_t, t), then v = sqrt(a) eps - sqrt(1-a) x0."""
    alphas = build_scheduler().alphas_cumprod

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: ModelConditioning) -> torch.Tensor:
        if calls is not None:
            calls.append((x_t.shape[0], t.dtype, t[0].item()))
        target = torch.cat([x0] * (x_t.shape[0] // x0.shape[0]))  # guidance runs 3B samples
        a = alphas[t].reshape(-1, 1, 1, 1, 1)
        eps = (x_t - a.sqrt() * target) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * target
    return model_fn


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_with_true_v_reproduces_data(cond_factory, eta):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    calls: list = []
    out = ddim_sample(v_oracle(x0, calls), SHAPE, cond_factory(2), DDIMConfig(eta=eta),
                      generator=torch.Generator().manual_seed(2))
    assert len(calls) == 50 and calls[0] == (2, torch.int64, 999) and calls[-1][2] == 19
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddim_with_guidance_one_3b_call_per_step(cond_factory, null_text):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    calls: list = []
    out = ddim_sample(v_oracle(x0, calls), SHAPE, cond_factory(2), num_inference_steps=10,
                      generator=torch.Generator().manual_seed(2),
                      guidance=GuidanceConfig().build(*null_text))
    assert len(calls) == 10 and {c[0] for c in calls} == {6}
    # the oracle ignores the conditions and the guidance weights sum to one: still exact
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_ddim_given_noise_is_the_start(cond_factory):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    seen: list[torch.Tensor] = []

    def model_fn(x_t, t, c):
        seen.append(x_t.clone())
        return v_oracle(x0)(x_t, t, c)

    ddim_sample(model_fn, SHAPE, cond_factory(2), noise=noise, num_inference_steps=4)
    torch.testing.assert_close(seen[0], noise, rtol=0, atol=0)


def test_loss_is_zero_for_the_oracle_and_trains_a_model(cond_factory):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    cond = cond_factory(2)
    loss = ddim_loss(v_oracle(x0), x0, cond, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() < 1e-8

    net = torch.nn.Conv3d(2, 2, 1)
    seen: list[torch.Tensor] = []

    def model_fn(x_t, t, c):
        seen.append(t)
        return net(x_t)

    loss = ddim_loss(model_fn, x0, cond, torch.Generator().manual_seed(0))
    loss.backward()
    assert net.weight.grad is not None
    assert seen[0].dtype == torch.int64 and seen[0].shape == (2,)
    again = ddim_loss(model_fn, x0, cond, torch.Generator().manual_seed(0))
    assert again.item() == loss.item()


def test_training_timesteps_cover_the_range():
    t = sample_timesteps(20_000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 999
    assert t.double().mean().item() == pytest.approx(499.5, abs=8)


def test_config_validation():
    with pytest.raises(ConfigError, match="v_prediction"):
        from_dict(DDIMConfig, {"prediction_type": "epsilon"})
    from_dict(DDIMConfig, {"prediction_type": "epsilon", "rescale_betas_zero_snr": False})
    with pytest.raises(ConfigError, match="beta_end"):
        from_dict(DDIMConfig, {"beta_start": 0.02, "beta_end": 0.01})
    with pytest.raises(ConfigError, match="num_inference_steps"):
        from_dict(DDIMConfig, {"num_inference_steps": 2000})
