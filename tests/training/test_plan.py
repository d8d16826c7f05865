"""Capacity plan: the formulas on hand-computed numbers (and against DeepSpeed's estimators),
the meta-device activation measurement, and whole plans of tiny and paper configs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ttm_ray.config import load_config
from ttm_ray.models.flops import forward_flops
from ttm_ray.training.config import DeepSpeedConfig, TrainConfig
from ttm_ray.training.plan import (
    GIB,
    Hardware,
    LiveBytes,
    ModelStates,
    comm_buffer_bytes,
    deepspeed_estimate,
    gradient_comm_bytes,
    measure_activation_bytes,
    model_state_bytes,
    plan_training,
)

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "train"


def test_model_states_on_hand_computed_numbers() -> None:
    # 1e9 parameters, largest layer 1e7, 32 GPUs, bf16 mixed precision.
    z2 = model_state_bytes(10**9, 10**7, 32, 2)
    assert z2 == ModelStates(params=2_000_000_000, grads=187_500_000, optimizer=375_000_000)
    assert z2.total == 2_562_500_000  # 2P + 18P/N
    z3 = model_state_bytes(10**9, 10**7, 32, 3)
    assert z3 == ModelStates(params=62_500_000, grads=125_000_000, optimizer=375_000_000,
                             gathered=40_000_000)
    assert z3.total == 602_500_000  # 18P/N + 4L
    # DeepSpeed's own estimators agree exactly.
    assert deepspeed_estimate(10**9, 10**7, 32, 2) == z2.total
    assert deepspeed_estimate(10**9, 10**7, 32, 3) == z3.total
    fp32 = model_state_bytes(10**9, 10**7, 32, 2, bf16=False)
    assert fp32 == ModelStates(4_000_000_000, 125_000_000, 250_000_000)
    with pytest.raises(ValueError, match="zero_stage must be one of"):
        model_state_bytes(10**9, 10**7, 32, 4)


def test_communication_on_hand_computed_numbers() -> None:
    # DeepSpeed's docs: buckets of 5e8 with overlap_comm need 5e8 x 2 B x 2 x 4.5 = 9 GB.
    ds = DeepSpeedConfig(reduce_bucket_size=500_000_000, allgather_bucket_size=500_000_000)
    assert comm_buffer_bytes(ds, 2) == 9_000_000_000
    assert comm_buffer_bytes(replace(ds, overlap_comm=False), 2) == 2_000_000_000
    assert comm_buffer_bytes(ds, 3) == int(2 * (500_000_000 + 50_000_000) * 4.5)
    # ZeRO-2: reduce-scatter + all-gather of bf16, ring factor 31/32.
    assert gradient_comm_bytes(10**9, 32, 2) == 3_875_000_000
    assert gradient_comm_bytes(10**9, 32, 2, grad_accum=2) == 5_812_500_000
    assert gradient_comm_bytes(10**9, 32, 3, grad_accum=2) == 11_625_000_000
    assert gradient_comm_bytes(10**9, 1, 2) == 0


def test_live_bytes_counts_storages_once_and_frees_them() -> None:
    with LiveBytes() as t:
        a = torch.empty(1024, 1024, device="meta")  # 4 MiB
        view = a.view(-1)  # same storage: not counted again
        b = a * 2  # a new 4 MiB
        assert t.live == 8 << 20
        del a, view, b
        assert t.live == 0
    assert t.peak == 8 << 20


def test_activations_scale_with_batch_and_shrink_with_checkpointing() -> None:
    from ttm_ray.models import ModelConfig

    cfg = ModelConfig(family="dit", size="dit-tiny", stage=2, num_frames=8, height=16,
                      width=16)
    one = measure_activation_bytes(cfg, 1, text_tokens=16, local_tokens=32)
    two = measure_activation_bytes(cfg, 2, text_tokens=16, local_tokens=32)
    ckpt = measure_activation_bytes(replace(cfg, activation_checkpointing=True), 1,
                                    text_tokens=16, local_tokens=32)
    # At least the bf16 input of every block (tokens x dim x 2 B x depth) is kept.
    tokens = 8 * 8 * 8
    assert one > tokens * 128 * 2 * 4
    assert 1.8 < two / one < 2.1
    assert ckpt < one / 2


def tiny_cfg(name: str, encoders: dict[str, Path], *overrides: str) -> TrainConfig:
    text = encoders["t5" if name.startswith("dit") else "clip_text"]
    return load_config(TrainConfig, CONFIGS / f"{name}.yaml",
                       [f"encoders.text_encoder.path={text}", *overrides])


@pytest.mark.slow  # builds the tiny encoders and measures activations
def test_tiny_plan_numbers(tiny_encoders: dict[str, Path]) -> None:
    cfg = tiny_cfg("dit_stage1_tiny", tiny_encoders)
    hw = Hardware(peak_tflops=100.0, mfu=0.5)
    plan = plan_training(cfg, hw)
    flops = 3 * forward_flops(replace(cfg.model, init_from=None),
                              text_tokens=cfg.encoders.text_encoder.max_length)
    assert plan.flops_per_sample == flops
    per_gpu = cfg.batch.micro_batch * cfg.batch.grad_accum
    # The frozen encoders run on the training workers: their forward FLOPs (the tiny T5,
    # counted from its folder; the pixel autoencoder has none) are in the step.
    assert plan.encoder_flops_per_sample and plan.encoder_flops_per_sample > 0
    assert plan.compute_seconds == pytest.approx(
        (flops + plan.encoder_flops_per_sample) * per_gpu / (100e12 * 0.5))
    assert (plan.world, plan.nodes, plan.comm[2].scope) == (2, 1, "intra-node")
    assert plan.comm[2].seconds == pytest.approx(
        gradient_comm_bytes(plan.params, 2, 2, cfg.batch.grad_accum, bf16=False) / 300e9)
    assert plan.memory[2].states == model_state_bytes(plan.params, plan.largest_layer, 2, 2,
                                                      bf16=False)
    t5 = sum(p.numel() for p in __import__("transformers").T5EncoderModel.from_pretrained(
        tiny_encoders["t5"]).parameters())
    assert plan.memory[2].encoders == 4 * t5  # pixel autoencoder: no weights
    assert plan.memory[2].activations and plan.memory[2].fits
    assert plan.memory[2].deepspeed_states is None  # fp32 run: the estimators do not apply
    text = plan.format()
    assert "ZeRO-2: fits" in text and "activations (ckpt off)" in text
    json.dumps(plan.summary())


def test_dit_4b_zero2_does_not_fit_a_small_gpu() -> None:
    # On an encoded version (data.encoded) no encoder weights are resident; without it the
    # paper's T5-XXL encoder and Cosmos VAE (reference architectures: no folders here) are.
    cfg = load_config(TrainConfig, CONFIGS / "dit_stage2.yaml", ["data.encoded=/enc"])
    on_the_fly = plan_training(load_config(TrainConfig, CONFIGS / "dit_stage2.yaml"),
                               Hardware(name="16 GiB GPU", gpu_memory_gib=16),
                               measure_activations=False)
    assert 8.5 < on_the_fly.memory[2].encoders / 2**30 < 9.5
    assert on_the_fly.encoder_flops_per_sample > 1e12
    plan = plan_training(cfg, Hardware(name="16 GiB GPU", gpu_memory_gib=16),
                         measure_activations=False)
    assert plan.memory[2].encoders == 0 and plan.encoder_flops_per_sample == 0
    assert plan.compute_seconds < on_the_fly.compute_seconds
    assert 4.0e9 < plan.params < 5.0e9
    assert not plan.memory[2].fits and plan.memory[3].fits
    verdict = plan.verdict()
    assert verdict.startswith("ZeRO-2: DOES NOT FIT: needs 22.3 GiB per GPU, the 16 GiB GPU "
                              "has 16 GiB"), verdict
    assert "ZeRO-3 fits" in verdict
    assert plan.memory[2].deepspeed_states == plan.memory[2].states.total
    assert plan.summary()["fits"] is False and "lower bound" in plan.format()
    assert plan.memory[2].states.total / GIB == pytest.approx(
        (2 * plan.params + 18 * plan.params / 32) / GIB)


@pytest.mark.slow
def test_cli_prints_the_plan_and_can_require_a_fit(tiny_encoders: dict[str, Path],
                                                   capsys: pytest.CaptureFixture) -> None:
    from jobs.plan import main

    args = ["train", "--config", str(CONFIGS / "unet_stage2_tiny.yaml"), "--set",
            f"encoders.text_encoder.path={tiny_encoders['clip_text']}", "--skip-activations"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["status"] == "succeeded" and summary["fits"] is True
    assert any("per-GPU memory" in line for line in out)
    assert main([*args, "--gpu-memory-gib", "0.5", "--require-fit"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["train", "--config", str(CONFIGS / "unet_stage2_tiny.yaml"),
                 "--set", "deepspeed.zero_stage=4"]) == 2  # config errors before any work
