"""Flow matching: the linear-quadratic grid, the interpolation, and an oracle round trip."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.config import ConfigError, from_dict
from ttm_ray.diffusion import (
    FlowMatchingConfig,
    GuidanceConfig,
    euler_sample,
    flow_matching_loss,
    interpolate,
    linear_quadratic_schedule,
    sample_t,
    training_target,
)

SHAPE = (2, 2, 3, 4, 4)


def mochi_reference():
    """diffusers' own Mochi ``linear_quadratic_schedule``, lifted from its source file.

    Importing the pipeline module pulls in transformers (10+ s); the function is pure Python,
    so it is compiled on its own from the installed file: the check follows diffusers upgrades.
    """
    spec = importlib.util.find_spec("diffusers")
    path = Path(spec.origin).parent / "pipelines" / "mochi" / "pipeline_mochi.py"
    source = path.read_text()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "linear_quadratic_schedule")
    namespace: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["linear_quadratic_schedule"]


@pytest.mark.parametrize(("steps", "threshold", "linear"),
                         [(50, 0.025, None), (50, 0.025, 25), (10, 0.025, None), (64, 0.05, 20)])
def test_linear_quadratic_matches_diffusers_mochi(steps, threshold, linear):
    sigmas = mochi_reference()(steps, threshold, linear)  # noise levels, 1 -> (not incl.) 0
    t = linear_quadratic_schedule(steps, threshold, linear)
    assert len(sigmas) == steps
    torch.testing.assert_close(1 - t[:-1], torch.tensor(sigmas, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_linear_quadratic_endpoints_monotone_and_linear_part():
    steps, threshold = 50, 0.025
    t = linear_quadratic_schedule(steps, threshold)
    sigma = 1 - t
    assert len(t) == steps + 1
    assert t[0] == 0.0 and t[-1] == 1.0  # starts at pure noise (sigma 1), ends at data (0)
    assert sigma[0] == 1.0 and sigma[-1] == 0.0
    assert bool((t[1:] > t[:-1]).all())
    # the first half covers exactly the first `threshold` of the path, in equal steps
    linear = steps // 2
    assert t[linear].item() == pytest.approx(threshold, abs=1e-12)
    torch.testing.assert_close(t[1:linear + 1] - t[:linear],
                               torch.full((linear,), threshold / linear, dtype=torch.float64))
    # The rest is one quadratic q(i), i = linear .. steps, through (linear, threshold) and
    # (steps, 1), the appended final t = 1 included: its steps grow by a constant 2c.
    dq = t[linear + 1:] - t[linear:-1]
    growth = dq[1:] - dq[:-1]
    assert bool((growth > 0).all())
    torch.testing.assert_close(growth, growth.mean().expand_as(growth), rtol=0, atol=1e-12)
    # Its *slope* q'(linear) equals the linear part's step (C1 junction). A discrete step is
    # q(i+1) - q(i) = q'(i) + c, so the first quadratic step is threshold / linear + c, larger
    # than the linear step: q'(linear) = dq[0] - growth / 2.
    c = growth.mean().item() / 2
    assert dq[0].item() - c == pytest.approx(threshold / linear, abs=1e-12)
    assert dq[0].item() > threshold / linear


def test_euler_matches_diffusers_mochi_scheduler(cond_factory):
    """Our Euler loop == diffusers' Mochi sampling (FlowMatchEulerDiscreteScheduler) step by step.

    Conventions mapped explicitly: ``linear_quadratic_schedule`` in pipeline_mochi returns noise
    levels ``sigma = 1 - t``; Mochi's scheduler config sets ``invert_sigmas=True``, so the
    scheduler's own ``sigmas`` become ``1 - sigma = t`` (with a final 1 appended), its
    timesteps are ``1000 t`` and its Euler step is ``x + (t_next - t) * model_output``, with a
    velocity that points towards data, as ours. With sigma_min = 0 the paths coincide.
    """
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
        FlowMatchEulerDiscreteScheduler,
    )

    steps = 50
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    scheduler.set_timesteps(sigmas=mochi_reference()(steps, 0.025))
    ours = linear_quadratic_schedule(steps, 0.025)
    torch.testing.assert_close(scheduler.sigmas.double(), ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps.double() / 1000, ours[:-1], rtol=0, atol=1e-6)

    weight = torch.randn(SHAPE[1], SHAPE[1], generator=torch.Generator().manual_seed(4))

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: ModelConditioning) -> torch.Tensor:
        # an arbitrary smooth field that depends on x and t, so a grid mismatch would show
        return torch.einsum("oc,bcthw->bothw", weight, x).tanh() * (1 + t.reshape(-1, 1, 1, 1, 1))

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    cond = cond_factory(2)
    x = noise.clone()
    for ts in scheduler.timesteps:
        out = velocity(x, (ts / 1000).expand(SHAPE[0]), cond)
        x = scheduler.step(out, ts, x, return_dict=False)[0]
    mine = euler_sample(velocity, SHAPE, cond, FlowMatchingConfig(sigma_min=0.0), noise=noise)
    torch.testing.assert_close(mine, x, rtol=0, atol=1e-4)


def test_linear_quadratic_rejects_bad_arguments():
    with pytest.raises(ValueError):
        linear_quadratic_schedule(10, 0.025, 10)
    with pytest.raises(ValueError):
        linear_quadratic_schedule(10, 1.5)


def test_config_grid_and_validation():
    cfg = FlowMatchingConfig()
    assert cfg.linear_steps() == 25
    torch.testing.assert_close(cfg.timesteps(), linear_quadratic_schedule(50, 0.025, 25))
    linear = FlowMatchingConfig(schedule="linear", num_steps=4).timesteps()
    torch.testing.assert_close(linear, torch.tensor([0, 0.25, 0.5, 0.75, 1.0],
                                                    dtype=torch.float64))
    with pytest.raises(ConfigError, match="linear steps"):
        from_dict(FlowMatchingConfig, {"num_steps": 1})
    with pytest.raises(ConfigError, match="not increasing"):
        from_dict(FlowMatchingConfig, {"lq_threshold_noise": 0.5, "lq_linear_steps_fraction": 0.02})
    with pytest.raises(ConfigError, match="logit_normal_std"):
        from_dict(FlowMatchingConfig, {"logit_normal_std": 0})


def test_interpolation_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x1, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    s = 1e-5
    torch.testing.assert_close(interpolate(x1, noise, torch.zeros(2), s), noise)
    torch.testing.assert_close(interpolate(x1, noise, torch.ones(2), s), x1 + s * noise)
    # v is d x_t / d t (the path is linear in t, so a finite difference is exact)
    t = torch.tensor([0.3, 0.7])
    x_t, v = training_target(x1, noise, t, s)
    x_next = interpolate(x1, noise, t + 0.1, s)
    torch.testing.assert_close((x_next - x_t) / 0.1, v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v, x1 - (1 - s) * noise)


def test_sample_t_is_logit_normal():
    t = sample_t(20_000, torch.Generator().manual_seed(0), mean=0.0, std=1.0)
    assert t.dtype == torch.float32 and t.shape == (20_000,)
    assert bool(((t > 0) & (t < 1)).all())
    logit = torch.logit(t.double())
    assert logit.mean().item() == pytest.approx(0.0, abs=0.03)
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)
    shifted = sample_t(20_000, torch.Generator().manual_seed(0), mean=1.0, std=0.5)
    assert torch.logit(shifted.double()).mean().item() == pytest.approx(1.0, abs=0.03)


def velocity_oracle(x1: torch.Tensor, sigma_min: float = 1e-5, calls: list | None = None):
    """The true velocity for a known x1: recover x0 from (x_t, t), then v = x1 - (1-s) x0."""
    def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: ModelConditioning) -> torch.Tensor:
        if calls is not None:
            calls.append((x_t.shape[0], t.dtype))
        reps = x_t.shape[0] // x1.shape[0]  # guidance runs 3B samples
        target = torch.cat([x1] * reps)
        tt = t.reshape(-1, 1, 1, 1, 1)
        x0 = (x_t - tt * target) / (1 - (1 - sigma_min) * tt)
        return target - (1 - sigma_min) * x0
    return model_fn


@pytest.mark.parametrize("schedule", ["linear_quadratic", "linear"])
def test_euler_with_true_velocity_reproduces_data(cond_factory, schedule):
    x1 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    cfg = FlowMatchingConfig(schedule=schedule)
    calls: list = []
    out = euler_sample(velocity_oracle(x1, calls=calls), SHAPE, cond_factory(2), cfg,
                       generator=torch.Generator().manual_seed(2))
    assert len(calls) == cfg.num_steps and calls[0] == (2, torch.float32)
    torch.testing.assert_close(out, x1, atol=1e-4, rtol=0)


def test_euler_with_guidance_batches_and_keeps_an_exact_model_exact(cond_factory, null_text):
    # The oracle ignores the conditions; guidance weights sum to one, so x1 is still reached.
    x1 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    calls: list = []
    guidance = GuidanceConfig().build(*null_text)
    out = euler_sample(velocity_oracle(x1, calls=calls), SHAPE, cond_factory(2), num_steps=8,
                       generator=torch.Generator().manual_seed(2), guidance=guidance)
    assert len(calls) == 8 and {c[0] for c in calls} == {6}  # one 3B call per step
    torch.testing.assert_close(out, x1, atol=1e-4, rtol=0)


def test_euler_custom_grid_and_given_noise(cond_factory):
    x1 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    a = euler_sample(velocity_oracle(x1), SHAPE, cond_factory(2), timesteps=[0.0, 0.5, 1.0],
                     noise=noise)
    torch.testing.assert_close(a, x1, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="increasing"):
        euler_sample(velocity_oracle(x1), SHAPE, cond_factory(2), timesteps=[0.0, 1.0, 0.5])


def test_loss_is_zero_for_the_oracle_and_trains_a_model(cond_factory):
    x1 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    cond = cond_factory(2)
    loss = flow_matching_loss(velocity_oracle(x1), x1, cond, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() < 1e-8

    net = torch.nn.Conv3d(2, 2, 1)
    seen: list[torch.Tensor] = []

    def model_fn(x_t, t, c):
        seen.append(t)
        return net(x_t)

    loss = flow_matching_loss(model_fn, x1, cond, torch.Generator().manual_seed(0))
    loss.backward()
    assert net.weight.grad is not None and seen[0].shape == (2,)
    # same generator seed -> same noise and t -> same loss
    again = flow_matching_loss(model_fn, x1, cond, torch.Generator().manual_seed(0))
    assert again.item() == pytest.approx(loss.item())
