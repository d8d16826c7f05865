"""Tiny random LLMs saved like real checkpoints (a 2-layer Llama, a tiny LLaVA).

They answer garbage, which is the point: the tests exercise the real loading, chat template,
batching and decoding code of the engines, not model quality. Plain builders, shared by the
data-prep fixtures (``conftest.py``) and the inference tests.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"]

# Roles as special tokens, images as <image>, string or list-of-parts content (text and VLM).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "A dog chases a ball while a robot runs after it.",
    "The cat jumps onto the table and knocks over the glass.",
    "Motion-specific prompt: the ball rolls to the right, and the kite flies upward.",
    "Answer: [[dog: A dog chases a ball.] [ball: A ball is being chased by a dog.]]",
    "Caption: an eagle flies above the mountains. Task: describe the overall motion.",
    "Three cats sit in a row on a sunny windowsill; the frames of a video clip.",
]


def build_tiny_tokenizer():
    """A byte-level BPE (any text encodes) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    # One head of 32: vLLM's attention kernels take head size 32 (the GPU test loads this).
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )


def _never_special(model, tokenizer) -> None:
    """Random weights often pick eos/pad at once (an empty answer): make them answer text."""
    model.generation_config.suppress_tokens = list(tokenizer.all_special_ids)


def build_tiny_llama(path: Path) -> Path:
    """A 2-layer, hidden-32 LlamaForCausalLM + tokenizer with a chat template, in ``path``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = LlamaForCausalLM(_llama_config(tokenizer))
    _never_special(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_vlm(path: Path) -> Path:
    """A tiny LLaVA (CLIP vision tower 32px/patch 8 + the tiny Llama) and its processor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=_llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    _never_special(model, tokenizer)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
