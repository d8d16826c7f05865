"""Tiny randomly initialised models for the embedded default and the tests.

No model hub is reachable from CI or a laptop without weights, so the quickstart and the tests
build these locally and save them with the library's own ``save_pretrained``; the pipeline
then loads them through exactly the code path production weights take.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 ``CLIPModel`` (32 px images, 8 px patches) + its image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
