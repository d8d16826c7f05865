"""Tiny randomly initialised models for the embedded default and the tests.

No model hub is reachable from CI or a laptop without weights, so the quickstart and the tests
build these locally and save them with the library's own ``save_pretrained``; the pipeline
then loads them through exactly the code path production weights take.
"""

from __future__ import annotations

from pathlib import Path

# One tiny CLIP for both sides: data prep's omega score and the CLIPFrame metric load it through
# the same code (ttm_ray.evaluation.clip_embed), so they share its builder too (same weights
# for a seed as the copy that lived here; its text config also has in-vocabulary bos/eos ids).
from ttm_ray.evaluation.tiny import build_tiny_clip

# Every word the generated corpus uses in object names (colours, shapes), plus a few more.
_WORDS = ["red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta", "white",
          "pink", "circle", "ellipse", "square", "rectangle", "triangle", "diamond", "hexagon",
          "star", "ball", "dog", "the", "a"]
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


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


__all__ = ["build_tiny_clip", "build_tiny_grounding_dino"]
