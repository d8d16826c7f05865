"""Fixtures for the mask stages: a tiny random Grounding DINO, a random SAM2, a small corpus.

A pytest plugin module (``pytest_plugins = ["conftest_masks"]``). Like the tiny LLMs of
``conftest.py`` the models answer garbage on purpose: the tests drive the real loading,
batching and post-processing code, not model quality. The builders are plain functions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.tiny_models import build_tiny_grounding_dino

SAM2_TEST_SIZE = 256  # SAM2 input size in tests: ~0.25 s per frame on 2 CPU cores


def build_random_sam2(image_size: int = SAM2_TEST_SIZE, objects_present: bool = True):
    """``(SegmentConfig, predictor)``: SAM2.1 hiera-tiny with random weights on the CPU.

    Random weights score every object as absent, which empties every mask; with
    ``objects_present`` the presence head's last bias is set high, so the (arbitrary) masks
    of the random mask decoder come through and the memory path sees real masks.
    """
    import torch

    from data_prep.stages.segment import SegmentConfig, build_predictor

    cfg = SegmentConfig(allow_random_weights=True, image_size=image_size, device="cpu")
    torch.manual_seed(0)
    predictor = build_predictor(cfg)
    if objects_present:
        with torch.no_grad():
            predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return cfg, predictor


@pytest.fixture(scope="session")
def tiny_grounding_dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("tiny_grounding_dino"))


@pytest.fixture(scope="session")
def random_sam2():
    """``(SegmentConfig, predictor)`` shared by the tests (building costs about a second)."""
    return build_random_sam2()


@pytest.fixture(scope="session")
def mask_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated videos with two objects each (seed 0), every frame annotated."""
    from data_prep.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("mask_corpus")
    generate_corpus(out, num_videos=2, seed=0)
    return out


@pytest.fixture(scope="session")
def mask_corpus_stride4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated video annotated every 4th frame, like SA-V."""
    from data_prep.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("mask_corpus_stride4")
    generate_corpus(out, num_videos=1, seed=0, annotation_stride=4)
    return out
