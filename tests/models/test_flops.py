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
    masked_layer_flops,
    masked_layers_overhead,
    measured_forward_flops,
    random_example_inputs,
    representative_local_ids,
    representative_object_ids,
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


def test_masked_layer_flops_count_block_sparse_pairs() -> None:
    """Block-sparse masked self-attention counts sum_l n_l^2 pairs (block-granular; exact for
    the block-aligned representative layout), cross only the object tokens' rows; one object
    everywhere is the dense count; projections are the same either way."""
    d, grid = 64, (16, 16, 16)
    ids = representative_object_ids(grid).flatten(1)
    local = representative_local_ids(64)
    dense = masked_layer_flops(ids, local, d, 32, sparse=False)
    sparse = masked_layer_flops(ids, local, d, 32)
    n = ids.shape[1]
    counts = torch.unique(ids, return_counts=True)[1]
    assert dense["self_attention"] == 4 * n * n * d
    assert sparse["self_attention"] == 4 * int(counts.square().sum()) * d
    assert sparse["cross_attention"] == 4 * int((ids >= 0).sum()) * 64 * d
    assert sparse["projections"] == dense["projections"]
    one = torch.zeros_like(ids)
    assert masked_layer_flops(one, local, d, 32) == masked_layer_flops(one, local, d, 32,
                                                                       sparse=False)
    # A ragged layout: block-granular, between the exact pairs and dense.
    ragged = torch.randint(-1, 3, (1, 1000), generator=torch.Generator().manual_seed(0))
    ragged_counts = torch.unique(ragged, return_counts=True)[1]
    pairs = masked_layer_flops(ragged, local, d, 32)["self_attention"] // (4 * d)
    assert int(ragged_counts.square().sum()) <= pairs <= 1000 * 1000


def test_masked_overhead_dit_4b_dense_matches_report_and_sparse_is_lower() -> None:
    cfg = from_dict(ModelConfig, {"family": "dit", "size": "dit-4b", "stage": 2,
                                  "latent_channels": 16, "num_frames": 16, "height": 32,
                                  "width": 32})
    overhead = masked_layers_overhead(cfg)
    report = forward_flop_report(cfg)
    assert overhead.dense == report.by_component["masked_layers"]
    assert overhead.base == forward_flop_report(cfg, local_tokens=0).total
    assert len(overhead.layers) == 10
    assert 0.13 < overhead.dense_ratio < 0.15  # recorded: 13.9 %
    assert 0.10 < overhead.sparse_ratio < overhead.dense_ratio  # recorded: 11.3 %


def test_masked_overhead_unet_dense_matches_the_flop_counter() -> None:
    """unet-tiny: the closed form of the masked layers (dense) equals what the flop counter
    sees them add to a forward on the meta device; block-sparse is lower."""
    cfg = from_dict(ModelConfig, {"family": "unet", "size": "unet-tiny", "stage": 2,
                                  "latent_channels": 4, "num_frames": 4, "height": 16,
                                  "width": 16})
    overhead = masked_layers_overhead(cfg)
    with_masked = measured_forward_flops(cfg, local_tokens=64).total
    assert overhead.base == measured_forward_flops(cfg, local_tokens=0).total
    assert overhead.dense == with_masked - overhead.base
    assert [layer["level"] for layer in overhead.layers] == [0, 1]
    assert overhead.sparse < overhead.dense


def test_random_example_inputs_keep_shapes_and_ids_and_follow_the_seed() -> None:
    """The benchmarks' timing inputs: example_inputs' shapes, normal floats, ids untouched."""
    cfg = from_dict(ModelConfig, {"family": "dit", "size": "dit-tiny", "stage": 2,
                                  "latent_channels": 4, "num_frames": 4, "height": 8,
                                  "width": 8})
    model = build_model(cfg)
    x_t, _, zeros = example_inputs(cfg, model)
    x, cond = random_example_inputs(cfg, model, torch.Generator().manual_seed(3))
    x2, cond2 = random_example_inputs(cfg, model, torch.Generator().manual_seed(3))
    assert x.shape == x_t.shape and x.std() > 0.5 and torch.equal(x, x2)
    assert cond.visual.shape == zeros.visual.shape and torch.equal(cond.text, cond2.text)
    assert cond.text.std() > 0.5
    assert torch.equal(cond.token_ids, zeros.token_ids)
    assert torch.equal(cond.text_mask, zeros.text_mask)
