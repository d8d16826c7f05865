"""Random evaluation backbones saved in their libraries' formats, for tests and the quickstart.

No model hub is reachable from CI, so these are written locally and then loaded through the
same code path as real weights (``save_pretrained`` folders for transformers models,
``.safetensors`` state dicts for torchvision ones). Each builder is deterministic for a
``seed`` (without touching the global RNG) and returns what the config points at: the folder
(transformers) or the file (state dicts); existing outputs are returned as they are.

The torchvision builders keep the real architectures (only the weights are random), so
``build_tiny_fvd_weights`` writes ~130 MB for ``r3d_18``: there is no smaller R3D-18.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ttm_ray.conditioning.tiny import write_clip_vocab


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 ``CLIPModel`` (32 px images, 8 px patches, 16-d projection) + its
    ``CLIPImageProcessor`` in ``path`` (the image side is all CLIPFrame and data prep's omega
    score need; ``data_prep.tiny_models`` re-exports this builder)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "vocab_size": 100, "max_position_embeddings": 16,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    _seeded(seed, lambda: CLIPModel(config)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def build_tiny_xclip(path: str | Path, seed: int = 0, num_frames: int = 4) -> Path:
    """A 2-layer, hidden-32 ``XCLIPModel`` (``num_frames`` frames of 32 px, 8 px patches,
    16-d projection) + ``XCLIPProcessor`` (VideoMAE image processor, the byte-pair CLIP
    tokenizer of :func:`ttm_ray.conditioning.tiny.write_clip_vocab`) in ``path``."""
    import tempfile

    from transformers import (
        CLIPTokenizer,
        VideoMAEImageProcessor,
        XCLIPConfig,
        XCLIPModel,
        XCLIPProcessor,
    )

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_clip_vocab(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file),
                                  pad_token="<|endoftext|>", model_max_length=77)
    config = XCLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "mit_hidden_size": 16,
                       "mit_intermediate_size": 32, "mit_num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "num_frames": num_frames},
        projection_dim=16, prompt_layers=1, prompt_num_attention_heads=2,
    )
    _seeded(seed, lambda: XCLIPModel(config)).save_pretrained(path)
    image_processor = VideoMAEImageProcessor(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32})
    XCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _save_state(path: str | Path, name: str, make: Callable[[], torch.nn.Module],
                seed: int) -> Path:
    from safetensors.torch import save_file

    folder = Path(path)
    file = folder / f"{name}.safetensors"
    if file.is_file():
        return file
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in _seeded(seed, make).state_dict().items()}
    tmp = file.with_suffix(".tmp")  # a half-written file must never look finished
    save_file(state, str(tmp))
    tmp.replace(file)
    return file


def build_tiny_fvd_weights(path: str | Path, seed: int = 0, arch: str = "r3d_18") -> Path:
    """A random torchvision ``arch`` state dict as ``path/<arch>.safetensors`` (FVD)."""
    from torchvision.models import video

    return _save_state(path, arch, getattr(video, arch), seed)


def build_tiny_raft_weights(path: str | Path, seed: int = 0, arch: str = "raft_small") -> Path:
    """A random torchvision RAFT state dict as ``path/<arch>.safetensors`` (AD)."""
    from torchvision.models import optical_flow

    return _save_state(path, arch, getattr(optical_flow, arch), seed)


__all__ = ["build_tiny_clip", "build_tiny_fvd_weights", "build_tiny_raft_weights",
           "build_tiny_xclip"]
