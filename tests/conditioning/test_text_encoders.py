"""Text encoders: tiny T5 / CLIP with offline tokenizers, loaded through the real code."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.conditioning.text_encoders import TextEncoder, TextEncoderConfig
from ttm_ray.conditioning.tiny import build_tiny_clip_text, build_tiny_t5
from ttm_ray.config import ConfigError, from_dict

PROMPTS = ["the red ball rolls left", "a blue star moves up while the camera stays still"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip_text(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def t5(t5_dir: Path) -> TextEncoder:
    return TextEncoderConfig(kind="t5", path=str(t5_dir), max_length=16).build()


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> TextEncoder:
    return TextEncoderConfig(kind="clip", path=str(clip_dir), max_length=77).build()


@pytest.fixture(params=["t5", "clip"])
def encoder(request: pytest.FixtureRequest) -> TextEncoder:
    return request.getfixturevalue(request.param)


def test_encode_shapes_masks_and_reference(encoder: TextEncoder) -> None:
    emb, mask = encoder.encode(PROMPTS)
    L = encoder.max_length
    assert emb.shape == (2, L, 32) and encoder.dim == 32 and mask.dtype == torch.bool
    lengths = [len(encoder.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert mask.sum(1).tolist() == lengths
    assert all(mask[i, :n].all() for i, n in enumerate(lengths))  # real tokens come first
    # Reference: the transformers model on the prompt alone gives the same real tokens.
    ids = encoder.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    ref = encoder.model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(emb[0, :lengths[0]], ref, rtol=1e-4, atol=1e-5)
    if encoder.kind == "t5":  # padding zeroed for consumers that ignore the mask
        assert emb[0, lengths[0]:].abs().sum() == 0


def test_null_is_the_empty_prompt(encoder: TextEncoder) -> None:
    emb, mask = encoder.null(3)
    ref, ref_mask = encoder._embed([""], encoder.max_length)
    assert emb.shape == (3, encoder.max_length, 32) and mask.shape == (3, encoder.max_length)
    assert torch.equal(emb[2], ref[0]) and torch.equal(mask[1], ref_mask[0])
    assert 1 <= int(mask[0].sum()) <= 2  # </s> for T5; BOS+EOS for CLIP
    empty, empty_mask = encoder.encode([])
    assert empty.shape == (0, encoder.max_length, 32) and empty_mask.shape[0] == 0
    # Stacks with conditioned rows: guidance runs both in one batch.
    text, text_mask = encoder.encode(PROMPTS[:1])
    both = ModelConditioning.cat([
        ModelConditioning(visual=torch.zeros(1, 1, 1, 1, 1), text=text, text_mask=text_mask),
        ModelConditioning(visual=torch.zeros(1, 1, 1, 1, 1), text=emb[:1], text_mask=mask[:1]),
    ])
    assert both.text.shape == (2, encoder.max_length, 32)


def test_empty_caption_errors_naming_the_item_or_encodes_null(t5_dir: Path,
                                                              t5: TextEncoder) -> None:
    with pytest.raises(ValueError, match=r"clip_0008: empty caption.*empty_prompt: null"):
        t5.encode(["a dog", "  "], names=["clip_0007", "clip_0008"])
    with pytest.raises(ValueError, match=r"prompt\[1\]: empty caption"):
        t5.encode(["a dog", ""])
    lenient = TextEncoderConfig(kind="t5", path=str(t5_dir), max_length=16,
                                empty_prompt="null").build()
    emb, mask = lenient.encode(["", "a dog"])
    null, null_mask = lenient.null(1)
    assert torch.equal(emb[0], null[0]) and torch.equal(mask[0], null_mask[0])


def test_long_prompt_truncated_with_one_warning(encoder: TextEncoder,
                                                caplog: pytest.LogCaptureFixture) -> None:
    encoder._warned_truncation = False
    long = " ".join(["red ball"] * 60)
    with caplog.at_level(logging.WARNING, logger="ttm_ray.conditioning.text_encoders"):
        emb, mask = encoder.encode([long, "a dog"])
        encoder.encode([long + " again"])
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and f"truncated to {encoder.max_length}" in warnings[0].getMessage()
    assert mask[0].all() and emb.shape[1] == encoder.max_length
    eos = encoder.tokenizer.eos_token_id
    ids = encoder.tokenizer([long], padding="max_length", max_length=encoder.max_length,
                            truncation=True)["input_ids"][0]
    assert ids[-1] == eos  # truncation keeps the closing token


def test_encode_local_binds_tokens_to_objects(encoder: TextEncoder) -> None:
    prompts = [["red ball", "blue star rolls left"], [], ["dog"]]
    local, ids = encoder.encode_local(prompts, max_tokens_per_object=8)
    counts = [[len(encoder.tokenizer(p)["input_ids"]) for p in s] for s in prompts]
    assert local.shape == (3, sum(counts[0]), 32) and ids.dtype == torch.long
    assert ids[0].tolist() == [0] * counts[0][0] + [1] * counts[0][1]
    assert (ids[1] == -1).all() and (local[1] == 0).all()
    assert ids[2].tolist() == [0] * counts[2][0] + [-1] * (local.shape[1] - counts[2][0])
    # Each object is encoded on its own: its tokens equal the prompt encoded alone.
    alone, alone_mask = encoder.encode(["blue star rolls left"])
    torch.testing.assert_close(local[0, counts[0][0]:], alone[0][alone_mask[0]],
                               rtol=1e-4, atol=1e-5)


def test_encode_local_ids_limits_and_errors(t5: TextEncoder) -> None:
    local, ids = t5.encode_local([["red ball moves left quickly"], ["dog", "cat"]],
                                 object_ids=[[3], [5, 1]], max_tokens_per_object=3,
                                 num_tokens=10)
    assert local.shape == (2, 10, 32)
    assert ids[0].tolist() == [3, 3, 3] + [-1] * 7
    assert ids[1].tolist() == [5, 5, 1, 1] + [-1] * 6
    empty, empty_ids = t5.encode_local([[], []])
    assert empty.shape == (2, 1, 32) and (empty_ids == -1).all()
    with pytest.raises(ValueError, match=r"sample 1 object 2: empty caption"):
        t5.encode_local([["dog"], ["cat", "ball", ""]])
    with pytest.raises(ValueError, match=r"2 local prompts but 1 object ids"):
        t5.encode_local([["dog", "cat"]], object_ids=[[0]])
    with pytest.raises(ValueError, match=r"num_tokens is 2"):
        t5.encode_local([["red ball moves"]], num_tokens=2)


def test_frozen_and_dtype(t5_dir: Path, t5: TextEncoder) -> None:
    t5.train()
    assert not t5.training and not t5.model.training
    assert all(not p.requires_grad for p in t5.parameters())
    half = TextEncoderConfig(kind="t5", path=str(t5_dir), max_length=8,
                             dtype="bfloat16").build("cpu")
    emb, _ = half.encode(["a dog"])
    assert emb.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    assert half.null(2)[0].dtype == torch.bfloat16
    local, _ = half.encode_local([["dog"]])
    assert local.dtype == torch.bfloat16


def test_loading_errors_name_the_path_and_fix(tmp_path: Path, clip_dir: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist.*build_tiny_t5"):
        TextEncoderConfig(kind="t5", path=str(missing)).build()
    with pytest.raises(ValueError, match=r"needs text_encoder.path"):
        TextEncoderConfig(kind="clip").build()
    with pytest.raises(ValueError, match=r"holds a 'clip_text_model'.*kind: clip"):
        TextEncoderConfig(kind="t5", path=str(clip_dir)).build()
    with pytest.raises(ValueError, match=r"max_length 100 exceeds the 77 positions"):
        TextEncoderConfig(kind="clip", path=str(clip_dir), max_length=100).build()
    with pytest.raises(ConfigError, match=r"max_length"):
        from_dict(TextEncoderConfig, {"kind": "clip", "max_length": 0})


def test_pipeline_folder_layout(tmp_path: Path, clip_dir: Path) -> None:
    """SD1.5's layout: text_encoder/ (weights) and tokenizer/ side by side."""
    root = tmp_path / "sd15"
    shutil.copytree(clip_dir, root / "text_encoder")
    (root / "tokenizer").mkdir()
    for f in (root / "text_encoder").iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special")):
            f.rename(root / "tokenizer" / f.name)
    enc = TextEncoderConfig(kind="clip", path=str(root), max_length=77).build()
    emb, mask = enc.encode(["a dog"])
    assert emb.shape == (1, 77, 32) and int(mask.sum()) == 4
