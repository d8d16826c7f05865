"""Tiny randomly initialised encoders, saved with ``save_pretrained``, tokenizers included.

No model hub is reachable from CI or a laptop without weights, so the tests and the quickstart
build these locally and load them through exactly the code path production weights take
(:mod:`ttm_ray.conditioning.text_encoders`, :mod:`ttm_ray.conditioning.autoencoders`).
The tokenizers are written offline from a small vocabulary: a Unigram tokenizer (T5-style,
with single letters as a fallback so any lowercase word encodes) and a byte-pair CLIP
tokenizer whose ``vocab.json``/``merges.txt`` are written here.

Every builder is deterministic for a ``seed`` (without touching the global RNG) and returns the
folder; a folder that already holds a ``config.json`` is returned as it is.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

#: Words of the generated corpus (colours, shapes, motions) plus common function words.
WORDS = (
    "red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta", "white", "black",
    "pink", "gray", "brown", "circle", "ellipse", "square", "rectangle", "triangle", "diamond",
    "hexagon", "star", "ball", "dog", "cat", "car", "person", "moves", "move", "moving", "rolls",
    "slides", "jumps", "falls", "rises", "turns", "rotates", "spins", "bounces", "flies", "walks",
    "runs", "left", "right", "up", "down", "towards", "away", "from", "to", "the", "a", "an",
    "and", "of", "on", "in", "with", "while", "camera", "slowly", "quickly", "object",
    "background", "stays", "still", "across", "top", "bottom",
    # the motion task (data_prep.synthetic_task): every word one token, so prompts fit
    "stay", "grow", "grows", "larger", "shrink", "shrinks", "one",
)
_LETTERS = string.ascii_lowercase + string.digits


def _done(path: Path) -> bool:
    return (path / "config.json").is_file()


def _seeded(seed: int, make: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def t5_tokenizer() -> Any:
    """A lowercasing Unigram tokenizer: the words above, then single letters as fallback;
    ``</s>`` appended to every sequence as T5's is; ids 0/1/2 = pad/eos/unk like T5."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in _LETTERS + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def build_tiny_t5(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, d_model-32 ``T5EncoderModel`` + its Unigram tokenizer in ``path``."""
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    if _done(path):
        return path
    tokenizer = t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    _seeded(seed, lambda: T5EncoderModel(config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """``vocab.json``/``merges.txt`` of a byte-pair CLIP tokenizer: letters (so any lowercase
    word encodes), and merge chains that make each of :data:`WORDS` one token."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _LETTERS + string.punctuation:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(f"{c}</w>", len(vocab))
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], f"{word[-1]}</w>"]
        left = parts[0]
        for right in parts[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left += right
            vocab.setdefault(left, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tiny_clip_text(path: str | Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 ``CLIPTextModel`` (77 positions) + ``CLIPTokenizer`` in ``path``."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    if _done(path):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_clip_vocab(Path(tmp))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file),
                                  pad_token="<|endoftext|>", model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=77, projection_dim=16, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    _seeded(seed, lambda: CLIPTextModel(config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_image_vae(path: str | Path, seed: int = 0) -> Path:
    """An ``AutoencoderKL`` shaped like SD1.5's (4 blocks: 8x spatial, 4 latent channels,
    scaling_factor 0.18215) with 8-16 channels per block."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if _done(path):
        return path
    vae = _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.18215,
    ))
    vae.save_pretrained(path)
    return path


def _tiny_video_vae(class_name: str, channels: int = 4) -> Any:
    """Constructor of a tiny ``class_name`` whose config states its true factors."""
    import diffusers

    stats = {"latents_mean": [0.1 * i - 0.2 for i in range(channels * 2)],
             "latents_std": [0.5 + 0.1 * i for i in range(channels * 2)]}
    kwargs: dict[str, dict[str, Any]] = {
        # The paper's kind: 8x8x8 = Haar patch 4 + one 2x stage (4 blocks like the real one:
        # the decoder needs them); statistics per channel and latent frame, as Cosmos keeps them.
        "AutoencoderKLCosmos": dict(
            latent_channels=channels, encoder_block_out_channels=(8, 8, 16, 16),
            decode_block_out_channels=(8, 8, 16, 16), attention_resolutions=(), resolution=32,
            num_layers=1, patch_size=4, spatial_compression_ratio=8,
            temporal_compression_ratio=8, **stats),
        # Wan: 4x spatial, 2x temporal (two down blocks, the second temporal).
        "AutoencoderKLWan": dict(
            base_dim=8, z_dim=channels, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True], scale_factor_spatial=4, scale_factor_temporal=2,
            latents_mean=[0.1 * i for i in range(channels)],
            latents_std=[1.0 + 0.1 * i for i in range(channels)]),
        "AutoencoderKLHunyuanVideo": dict(
            latent_channels=channels, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4),
        "AutoencoderKLLTXVideo": dict(
            latent_channels=channels, block_out_channels=(8, 8, 16, 16),
            decoder_block_out_channels=(8, 8, 16, 16), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1)),
    }
    if class_name not in kwargs:
        raise ValueError(f"no tiny config for {class_name!r}; known: {sorted(kwargs)}")
    return lambda: getattr(diffusers, class_name)(**kwargs[class_name])


def build_tiny_video_vae(path: str | Path, class_name: str = "AutoencoderKLCosmos",
                         seed: int = 0, latent_channels: int = 4) -> Path:
    """A tiny diffusers temporal autoencoder (``latent_channels``, 4 by default; Cosmos:
    8x8x8; the rehearsal builds the paper's 16) in ``path``."""
    path = Path(path)
    if _done(path):
        return path
    vae = _seeded(seed, _tiny_video_vae(class_name, latent_channels))
    buffers = dict(vae.named_buffers())
    if "latents_mean" in buffers:  # LTX keeps its statistics as buffers: make them non-trivial
        mean, std = buffers["latents_mean"], buffers["latents_std"]
        with torch.no_grad():
            mean.copy_(torch.linspace(-0.2, 0.2, mean.numel()))
            std.copy_(torch.linspace(0.5, 1.5, std.numel()))
    vae.save_pretrained(path)
    return path


__all__ = [
    "WORDS",
    "build_tiny_clip_text",
    "build_tiny_image_vae",
    "build_tiny_t5",
    "build_tiny_video_vae",
    "t5_tokenizer",
    "write_clip_vocab",
]
