"""Two-condition CFG: the guidance formula, the 3B batch, and training-time condition dropout."""

from __future__ import annotations

import math

import pytest
import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.config import ConfigError, from_dict
from ttm_ray.diffusion import (
    GuidanceConfig,
    apply_condition_dropout,
    drop_conditions,
    guidance_conditions,
    guided_prediction,
    sample_dropout,
)


def test_guidance_formula_on_a_toy_model(cond_factory, null_text):
    """e = e00 + S_I (eI0 - e00) + S_T (eIT - eI0) against its closed form for a linear model.

    The toy output is ``x + a * mean(visual) + b * mean(text)``: the visual branch adds
    ``a * V`` (0 when dropped), the text branch ``b * T`` (``b * N`` for the null prompt), so
    the guided value is ``x + b N + S_I a V + S_T b (T - N)``.
    """
    a_coef, b_coef = 0.7, -1.3
    calls: list[int] = []

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, cond: ModelConditioning) -> torch.Tensor:
        calls.append(x_t.shape[0])
        v = cond.visual.mean(dim=(1, 2, 3, 4)).reshape(-1, 1, 1, 1, 1)
        s = cond.text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        return x_t + a_coef * v + b_coef * s

    cond = cond_factory(2)
    x = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cfg = GuidanceConfig()
    assert (cfg.scale_visual, cfg.scale_text) == (1.5, 8.5)
    out = guided_prediction(model_fn, x, torch.tensor([0.3, 0.6]), cond, null_text[0], cfg,
                            null_text[1])
    assert calls == [6]  # one forward pass over 3B samples

    big_v = cond.visual.double().mean(dim=(1, 2, 3, 4)).reshape(-1, 1, 1, 1, 1)
    big_t = cond.text.double().mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
    big_n = null_text[0].double().mean()
    expected = (x.double() + b_coef * big_n + 1.5 * a_coef * big_v
                + 8.5 * b_coef * (big_t - big_n))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert out.dtype == torch.float32


def test_batched_guidance_equals_three_separate_passes(cond_factory, null_text, toy_denoiser):
    # A nonlinear model that reads every condition: the 3B batch must not mix samples.
    model = toy_denoiser
    cond = cond_factory(2)
    null, null_mask = null_text
    x = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.9])
    keep, drop = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        e_it = model(x, t, cond)
        e_i0 = model(x, t, drop_conditions(cond, drop, keep, null, null_mask))
        e_00 = model(x, t, drop_conditions(cond, drop, drop, null, null_mask))
        cfg = GuidanceConfig(scale_visual=1.5, scale_text=8.5)
        out = guided_prediction(model, x, t, cond, null, cfg, null_mask)
    expected = e_00 + 1.5 * (e_i0 - e_00) + 8.5 * (e_it - e_i0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the visual and the text condition both change the toy's output (the test has teeth)
    assert (e_it - e_i0).abs().max() > 1e-3 and (e_i0 - e_00).abs().max() > 1e-3


def test_guidance_conditions_layout(cond_factory, null_text):
    cond = cond_factory(2)
    null, null_mask = null_text
    c3 = guidance_conditions(cond, null, null_mask)
    assert c3.visual.shape[0] == 6
    full, text_dropped, both_dropped = (
        ModelConditioning(*(getattr(c3, f)[i:i + 2] if getattr(c3, f) is not None else None
                            for f in ("visual", "text", "text_mask", "local_text",
                                      "local_text_ids", "token_ids")))
        for i in (0, 2, 4))
    for name in ("visual", "text", "text_mask", "local_text", "local_text_ids", "token_ids"):
        assert torch.equal(getattr(full, name), getattr(cond, name)), name
    for branch in (text_dropped, both_dropped):
        assert torch.equal(branch.text, null.expand(2, -1, -1))
        assert torch.equal(branch.text_mask, null_mask.expand(2, -1))
        assert not branch.local_text.any()
        assert bool((branch.local_text_ids == -1).all())
        assert torch.equal(branch.token_ids, cond.token_ids)  # the layout is never dropped
    assert torch.equal(text_dropped.visual, cond.visual)
    assert not both_dropped.visual.any()


def classify(dropped: ModelConditioning, cond: ModelConditioning, null: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: was the text dropped, was the visual dropped (checked exhaustively)."""
    text_dropped = (dropped.text == null).flatten(1).all(1)
    text_kept = (dropped.text == cond.text).flatten(1).all(1)
    visual_dropped = (dropped.visual == 0).flatten(1).all(1)
    visual_kept = (dropped.visual == cond.visual).flatten(1).all(1)
    assert bool((text_dropped ^ text_kept).all()) and bool((visual_dropped ^ visual_kept).all())
    return text_dropped, visual_dropped


@pytest.mark.parametrize("probs", [(0.05, 0.05, 0.05), (0.1, 0.2, 0.3)])
def test_dropout_rates_and_what_dropped_means(cond_factory, null_text, probs):
    n = 20_000
    cond = cond_factory(n, seed=1, spatial=(1, 1, 2))
    null, null_mask = null_text
    cfg = GuidanceConfig(p_drop_text=probs[0], p_drop_visual=probs[1], p_drop_both=probs[2])
    out = apply_condition_dropout(cond, null, null_mask, cfg, torch.Generator().manual_seed(0))
    text, visual = classify(out, cond, null)
    observed = {
        "text only": (text & ~visual).double().mean().item(),
        "visual only": (visual & ~text).double().mean().item(),
        "both": (text & visual).double().mean().item(),
    }
    for (name, rate), p in zip(observed.items(), probs, strict=True):
        tol = 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
        assert abs(rate - p) < tol, (name, rate, p)
    # dropped text: null prompt and mask, no local prompts; token_ids always kept
    assert bool((out.text_mask[text] == null_mask).all())
    assert not out.local_text[text].any() and bool((out.local_text_ids[text] == -1).all())
    assert torch.equal(out.local_text[~text], cond.local_text[~text])
    assert torch.equal(out.local_text_ids[~text], cond.local_text_ids[~text])
    assert torch.equal(out.text_mask[~text], cond.text_mask[~text])
    assert torch.equal(out.token_ids, cond.token_ids)


def test_dropout_is_seeded_and_extremes(cond_factory, null_text):
    cfg = GuidanceConfig()
    a = sample_dropout(1000, cfg, torch.Generator().manual_seed(7))
    b = sample_dropout(1000, cfg, torch.Generator().manual_seed(7))
    c = sample_dropout(1000, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))

    cond = cond_factory(4)
    never = GuidanceConfig(p_drop_text=0, p_drop_visual=0, p_drop_both=0)
    out = apply_condition_dropout(cond, *null_text, never)
    assert torch.equal(out.text, cond.text) and torch.equal(out.visual, cond.visual)
    always = GuidanceConfig(p_drop_text=0, p_drop_visual=0, p_drop_both=1)
    text, visual = classify(apply_condition_dropout(cond, *null_text, always), cond,
                            null_text[0])
    assert bool(text.all()) and bool(visual.all())


def test_validation_and_null_text_shape(cond_factory, null_text):
    with pytest.raises(ConfigError, match="disjoint"):
        from_dict(GuidanceConfig, {"p_drop_text": 0.5, "p_drop_visual": 0.4,
                                   "p_drop_both": 0.2})
    with pytest.raises(ConfigError, match="p_drop_text"):
        from_dict(GuidanceConfig, {"p_drop_text": 1.5})
    cond = cond_factory(2)
    keep = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="padding length"):
        drop_conditions(cond, ~keep, keep, torch.zeros(3, 6), None)
    # a batch without a text mask accepts a null prompt only if it has no padding
    no_mask = cond.replace(text_mask=None)
    out = drop_conditions(no_mask, ~keep, keep, null_text[0], None)
    assert out.text_mask is None and torch.equal(out.text, null_text[0].expand(2, -1, -1))
    with pytest.raises(ValueError, match="text_mask"):
        drop_conditions(no_mask, ~keep, keep, *null_text)
