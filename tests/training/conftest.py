"""Session fixtures of the training tests: a tiny dataset built by the real data prep, and tiny
encoders saved like real checkpoints.

``tiny_dataset`` runs the whole curation pipeline (generated corpus -> ingest -> clip ->
manifest captions/prompts -> GT masks -> tiny-CLIP omega score -> publish) once per session,
like ``ttm-ray quickstart``, with clip bytes embedded so training reads both paths (embedded
mp4 and source video). Clips have 9 frames: 8 for the pixel autoencoder's 4/8-frame runs and
``1 + 8`` for a causal 8x-in-time video VAE.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: What the tiny dataset is built with (tests read these instead of restating them).
TINY_VIDEOS = 6
TINY_CLIP_FRAMES = 9
TINY_CLIP_SIZE = 64  # embedded clip_bytes are 64x64


@pytest.fixture(scope="session")
def tiny_dataset(ray_local, tmp_path_factory: pytest.TempPathFactory,
                 tiny_clip_dir: Path) -> Path:
    """The root of a published dataset version (``latest``) made by ``run_prep``."""
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep
    from data_prep.synthetic import generate_corpus
    from ttm_ray.config import from_dict

    root = tmp_path_factory.mktemp("tiny_dataset")
    manifest = generate_corpus(root / "corpus", TINY_VIDEOS, seed=11)
    cfg = from_dict(PrepConfig, {
        "run": {"root": str(root), "name": "prep", "ray_address": None},
        "source": {"kind": "manifest", "path": str(manifest)},
        "ingest": {"id_mode": "content"},
        "clip": {"num_frames": TINY_CLIP_FRAMES, "fps": 8.0,
                 "resolutions": [{"name": "tiny", "height": TINY_CLIP_SIZE,
                                  "width": TINY_CLIP_SIZE}]},
        "caption": {"engine": {"kind": "manifest"}},
        "prompts": {"engine": {"kind": "manifest"}},
        "mask_source": "gt",
        "score": {"clip_model_path": str(tiny_clip_dir), "device": "cpu"},
        "filter": {"omega": 0.0},
        "publish": {"embed_clip_bytes": True},
        "output": {"dir": str(root / "prep")},
        "resources": {"score": {"num_cpus": 0.5}},
    })
    summary = run_prep(cfg, progress=False, track=False)
    assert summary["kept"] >= 8, summary  # enough rows for a few global batches of 4
    return Path(summary["dataset_root"])


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random encoders (real save_pretrained layouts): ``t5``, ``clip_text``
    (hidden 32, the tiny models' text_dim), ``image_vae`` (SD1.5-shaped, 8x, 4 channels),
    ``video_vae`` (Cosmos-shaped, 8x8x8 causal, 4 channels)."""
    from ttm_ray.conditioning.tiny import (
        build_tiny_clip_text,
        build_tiny_image_vae,
        build_tiny_t5,
        build_tiny_video_vae,
    )

    root = tmp_path_factory.mktemp("tiny_encoders")
    return {
        "t5": build_tiny_t5(root / "t5"),
        "clip_text": build_tiny_clip_text(root / "clip_text"),
        "image_vae": build_tiny_image_vae(root / "image_vae"),
        "video_vae": build_tiny_video_vae(root / "video_vae"),
    }
