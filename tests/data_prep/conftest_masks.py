"""Fixtures for the mask stages: a tiny random Grounding DINO, a random SAM2, a small corpus.

A pytest plugin module (``pytest_plugins = ["conftest_masks"]``). Like the tiny LLMs of
``conftest.py`` the models answer garbage on purpose: the tests drive the real loading,
batching and post-processing code, not model quality. The builders are plain functions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Every word the generated corpus uses in object names (colours, shapes), plus a few more.
_WORDS = ["red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta", "white",
          "pink", "circle", "ellipse", "square", "rectangle", "triangle", "diamond", "hexagon",
          "star", "ball", "dog", "the", "a"]
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

SAM2_TEST_SIZE = 256  # SAM2 input size in tests: ~0.25 s per frame on 2 CPU cores


def build_tiny_grounding_dino(path: Path) -> Path:
    """A ~160k-parameter GroundingDinoForObjectDetection + processor saved in ``path``.

    Tiny Swin backbone (4 stages of depth 1), 1-layer BERT text encoder with a WordPiece
    vocabulary written here, 8 queries, 64-96 px input images.
    """
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab_source.txt"
    vocab.write_text("\n".join([*_SPECIAL, ".", ",", *_WORDS]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    # d_model 32: the input projections use GroupNorm(32, d_model). Two decoder layers: the
    # tied bbox heads need at least two.
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, num_queries=8, d_model=32,
        encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=4,
        encoder_n_points=1, decoder_n_points=1, max_text_len=32,
    )
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    vocab.unlink()
    return path


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
