"""The FLOP report: the DiT's closed form against torch's flop counter on the tiny config."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ttm_ray.config import from_dict
from ttm_ray.models import ModelConfig, build_model, resolve_family_config
from ttm_ray.models.flops import (
    counting_attention,
    dit_forward_flops,
    example_inputs,
    forward_flop_report,
    measured_forward_flops,
)


@pytest.mark.parametrize("stage", [1, 2])
def test_dit_analytic_flops_match_flop_counter(stage: int) -> None:
    cfg = from_dict(ModelConfig, {"family": "dit", "size": "dit-tiny", "stage": stage,
                                  "latent_channels": 4, "num_frames": 4, "height": 8,
                                  "width": 12})
    model = build_model(cfg)
    x_t, t, cond = example_inputs(cfg, model, batch=1, text_tokens=7, local_tokens=9)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, counting_attention():
        model(x_t, t, cond)
    dit = resolve_family_config(cfg)
    analytic = dit_forward_flops(dit, model.token_grid(4, 8, 12), text_tokens=7,
                                 local_tokens=9 if stage == 2 else 0)
    assert analytic.tokens == 4 * 4 * 6
    assert analytic.total == pytest.approx(counter.get_total_flops(), rel=0.01)
    if stage == 2:
        assert analytic.by_component["masked_layers"] > 0


def test_paper_dit_flops_are_in_the_expected_range() -> None:
    """dit-4b at 4,096 tokens: ~2 * params * tokens for the linears plus attention."""
    cfg = from_dict(ModelConfig, {"family": "dit", "size": "dit-4b", "stage": 1,
                                  "latent_channels": 16, "num_frames": 16, "height": 32,
                                  "width": 32})
    report = forward_flop_report(cfg)
    assert report.tokens == 4096
    linear_bound = 2 * 4.0e9 * 4096
    assert linear_bound < report.total < 2.5 * linear_bound


def test_measured_flops_on_meta_count_without_memory() -> None:
    cfg = from_dict(ModelConfig, {"family": "dit", "size": "dit-tiny", "stage": 1,
                                  "latent_channels": 4, "num_frames": 2, "height": 4,
                                  "width": 4})
    meta = measured_forward_flops(cfg, text_tokens=5, local_tokens=0)
    real = measured_forward_flops(cfg, text_tokens=5, local_tokens=0, device="cpu")
    assert meta.total == real.total > 0
    assert meta.method == "flop_counter(meta)"


def test_plan_model_cli_reports_parameters_and_flops(capsys) -> None:
    import json

    from jobs.plan import main

    assert main(["model", "--config", "jobs/configs/train/dit_stage2_tiny.yaml"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["stage"] == 2
    assert summary["parameters"] > 0 and summary["forward_flops"] > 0
    assert "masked_layers" in out
