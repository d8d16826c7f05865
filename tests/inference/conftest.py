"""Fixtures of the inference tests: exports of the four tiny runs, a small benchmark.

The exports are written with :func:`ttm_ray.models.export.write_export` (what training's
export writes) from the tiny training configs themselves, with randomly initialised models:
generation then loads them through the real path (``model.yaml`` -> ``build_model`` ->
safetensors, ``encoders.yaml``, ``diffusion.yaml``) without a Ray Train run per test session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = REPO / "jobs" / "configs" / "train"
STEPS = 3  # sampler steps in tests: the path, not the quality, is under test

# The data-prep fixtures (scripted LLM engine, tiny Grounding DINO, random SAM2) are shared.
sys.path.insert(0, str(REPO / "tests" / "data_prep"))
from conftest_masks import build_random_sam2, tiny_grounding_dino_dir  # noqa: E402, F401


def build_export(out: Path, family: str, stage: int, text_encoder: Path, seed: int = 0,
                 perturb: float = 0.0) -> Path:
    """An export of ``jobs/configs/train/<family>_stage<stage>_tiny.yaml`` with random weights.

    A freshly initialised model predicts 0 (zero-initialised output, gates and condition
    weights), so its clip depends on the seed only; ``perturb`` adds noise of that std to
    every weight, so the clip also depends on the image and the prompts.
    """
    import torch

    from ttm_ray.config import load_config
    from ttm_ray.models import build_model
    from ttm_ray.models.export import write_export
    from ttm_ray.training.config import TrainConfig

    cfg = load_config(TrainConfig, TRAIN_CONFIGS / f"{family}_stage{stage}_tiny.yaml",
                      [f"encoders.text_encoder.path={text_encoder}"])
    torch.manual_seed(seed + stage)
    model = build_model(cfg.model)
    if perturb:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * perturb)
    ae = cfg.encoders.autoencoder.build()
    _, frames, h, w = ae.pixel_shape(cfg.model.num_frames, cfg.model.height, cfg.model.width)
    return write_export(out, model.state_dict(), cfg.model, encoders=cfg.encoders,
                        diffusion=cfg.diffusion.with_sampling(STEPS),
                        info={"run_name": f"{family}-stage{stage}-random",
                              "pixel_shape": [frames, h, w]})


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, Path]]:
    """``{family: {stage: export folder}}`` for dit and unet."""
    from ttm_ray.conditioning.tiny import build_tiny_clip_text, build_tiny_t5

    root = tmp_path_factory.mktemp("tiny_exports")
    text = {"dit": build_tiny_t5(root / "t5"), "unet": build_tiny_clip_text(root / "clip_text")}
    return {family: {stage: build_export(root / f"{family}{stage}", family, stage, text[family])
                     for stage in (1, 2)} for family in ("dit", "unet")}


@pytest.fixture(scope="session")
def sensitive_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """``{stage: export folder}`` of dit models whose clip depends on their inputs (for tests
    that tell outputs of different inputs apart; see :func:`build_export`)."""
    from ttm_ray.conditioning.tiny import build_tiny_t5

    root = tmp_path_factory.mktemp("sensitive_exports")
    text = build_tiny_t5(root / "t5")
    return {stage: build_export(root / f"dit{stage}", "dit", stage, text, perturb=0.05)
            for stage in (1, 2)}


@pytest.fixture(scope="session")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-video generated corpus and its benchmark manifest (reference videos, manual
    prompts, GT masks)."""
    from data_prep.synthetic import generate_corpus, write_benchmark_manifest

    root = tmp_path_factory.mktemp("bench")
    manifest = generate_corpus(root / "corpus", 3, seed=5)
    return write_benchmark_manifest(manifest, root / "manifest.jsonl")
