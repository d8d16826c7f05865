"""Tiny, randomly initialised models saved like real checkpoints, built once per session.

They answer garbage, which is the point: the tests exercise the real loading, chat template,
batching and decoding code of the engines, not model quality. The builders are plain
functions so the fixtures can move to ``tests/conftest.py`` unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_llm import build_tiny_llama, build_tiny_vlm


def build_tiny_video(path: Path, frames: int = 12, height: int = 48, width: int = 64) -> Path:
    """A short mp4 of a moving square (real H.264, decodable with decord)."""
    from ttm_ray.dataset.video import write_video

    video = np.zeros((frames, height, width, 3), np.uint8)
    for t in range(frames):
        video[t, 10:26, 2 + 3 * t:18 + 3 * t] = (200, 60, 30)
    write_video(path, video, fps=12.0)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_video(tmp_path_factory.mktemp("tiny_video") / "clip.mp4")


# The mask stages' fixtures (tiny Grounding DINO, random SAM2, small corpora) live in their own
# module; importing them here makes them visible to every test under tests/data_prep.
from conftest_masks import (  # noqa: E402, F401
    mask_corpus,
    mask_corpus_stride4,
    random_sam2,
    tiny_grounding_dino_dir,
)
