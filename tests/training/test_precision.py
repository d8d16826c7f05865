"""The paper configs' precision combination, bf16 + activation checkpointing + ZeRO-2, runs
end to end on Ray Train CPU workers (gloo, DeepSpeed's CPU accelerator).

The tiny configs turn bf16 and checkpointing off for speed (``_tiny_cpu.yaml``); this run puts
back what ``dit_stage1.yaml`` trains with, so the combination has run at least on CPU: the
loss is finite, the engine held bf16 weights (the checkpoint's module state), and the model
the config builds recomputes its blocks in backward.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from train_runs import metric_history, train_tiny

from ttm_ray.training.checkpoint import TAG
from ttm_ray.training.config import TrainConfig

PAPER_PRECISION = ("deepspeed.zero_stage=2", "deepspeed.bf16=true",
                   "model.activation_checkpointing=true")


@pytest.mark.slow
def test_bf16_checkpointing_zero2_trains(ray_local, tmp_path_factory: pytest.TempPathFactory,
                                         tiny_dataset: Path,
                                         tiny_encoders: dict[str, Path]) -> None:
    cfg, summary = train_tiny("dit_stage1_tiny", tmp_path_factory, tiny_dataset, tiny_encoders,
                              *PAPER_PRECISION)
    assert cfg.deepspeed.bf16 and cfg.model.activation_checkpointing
    losses = metric_history(cfg, summary["mlflow_run_id"])
    assert sorted(losses) == list(range(1, cfg.optim.max_steps + 1))
    assert all(math.isfinite(v) for values in losses.values() for v in values), losses

    # bf16 was used: DeepSpeed's module state (the weights the engine ran) is bf16, while
    # the export consolidates the fp32 master weights.
    states = torch.load(Path(summary["checkpoint"]) / TAG / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    dtypes = {t.dtype for t in states["module"].values() if t.is_floating_point()}
    assert dtypes == {torch.bfloat16}, dtypes
    assert summary["export_max_abs_diff"] <= 5e-2  # the fp32 export approximates the engine

    # Checkpointing was active: the model this config builds (what the workers built, through
    # the same function) recomputes every block in backward.
    assert_blocks_recompute(cfg)


def assert_blocks_recompute(cfg: TrainConfig) -> None:
    """Every DiT block carries the checkpointing flag, and a training step runs each block's
    forward twice (once more in backward), i.e. torch.utils.checkpoint is really used."""
    from ttm_ray.models import build_model
    from ttm_ray.models.flops import example_inputs

    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    assert all(block.checkpointing for block in model.blocks)
    calls = [0]
    block, forward = model.blocks[0], model.blocks[0].forward

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        # Counted in forward itself: module hooks do not fire again on recomputation.
        calls[0] += 1
        return forward(*args, **kwargs)

    block.forward = counted
    x_t, t, cond = example_inputs(cfg.model, model, 1, device="cpu")
    model(torch.randn_like(x_t), t, cond).square().mean().backward()
    assert calls[0] == 2, f"block 0 ran {calls[0]} times (2 expected with recomputation)"
