"""Frozen text encoders for the global prompt and the per-object local prompts.

Two kinds, loaded from local folders through transformers (:class:`TextEncoderConfig`):

* ``t5``: a T5-family encoder (``T5EncoderModel``; UMT5/MT5 checkpoints load their own
  class) and its tokenizer. Padded positions of the output are zeroed, so a consumer that
  ignores the mask still sees nothing there.
* ``clip``: ``CLIPTextModel`` + ``CLIPTokenizer`` (SD1.5's text encoder for the U-Net). The
  last hidden state is returned as is, padding included, because SD-family U-Nets were
  trained attending to all 77 positions (and CLIP runs without a padding mask, as there).

Every global prompt is padded to ``max_length`` so conditioned, unconditioned (:meth:`null`)
and dropped rows of one batch stack without reshaping. Local prompts
(:meth:`TextEncoder.encode_local`) are encoded one object at a time and their real tokens
concatenated with the object's id beside each token, which is what masked cross-attention
needs to bind an object's pixels to its own words.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ttm_ray.config import constrained
from ttm_ray.model_folders import model_folder

log = logging.getLogger(__name__)

#: config.json ``model_type`` -> transformers encoder class, per kind.
_MODEL_CLASSES: dict[str, dict[str, str]] = {
    "t5": {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel"},
    "clip": {"clip_text_model": "CLIPTextModel", "clip": "CLIPTextModel"},
}
_TINY = {"t5": "build_tiny_t5", "clip": "build_tiny_clip_text"}


@dataclass
class TextEncoderConfig:
    """Which text encoder a model family conditions on."""

    kind: Literal["t5", "clip"] = constrained(
        "t5", help="t5 (T5EncoderModel, the DiT) | clip (CLIPTextModel, SD1.5's U-Net)",
    )
    path: str | None = constrained(
        None, help="local folder with the encoder saved by save_pretrained (config.json + "
                   "weights + tokenizer), or a pipeline folder with text_encoder/ and tokenizer/",
    )
    tokenizer_path: str | None = constrained(
        None, help="tokenizer folder when it is not beside the weights (default: path, or "
                   "path/tokenizer in a pipeline folder)",
    )
    max_length: int = constrained(
        128, gt=0, help="tokens per global prompt L (padded to it; longer prompts are "
                        "truncated with a warning); CLIP allows at most 77",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = constrained(
        "float32", help="dtype of the encoder weights and of the embeddings",
    )
    empty_prompt: Literal["error", "null"] = constrained(
        "error", help="an empty caption: error (naming the item) or encode it as the null "
                      "(empty) prompt",
    )

    def build(self, device: torch.device | str | None = None) -> TextEncoder:
        """The frozen encoder + tokenizer, loaded from ``path`` (errors name the path and the
        fix)."""
        model, tokenizer = load_text_encoder(self.kind, self.path, self.tokenizer_path,
                                             getattr(torch, self.dtype))
        enc = TextEncoder(model, tokenizer, kind=self.kind, max_length=self.max_length,
                          empty_prompt=self.empty_prompt)
        return enc.to(device) if device is not None else enc


class TextEncoder(nn.Module):
    """Frozen prompt encoder: ``encode``, ``null`` (guidance) and ``encode_local``.

    All outputs live on the encoder's device in its dtype (masks bool, ids long).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, kind: str, max_length: int,
                 empty_prompt: str = "error") -> None:
        super().__init__()
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds the {positions} positions of "
                             f"this {kind} text encoder: set text_encoder.max_length <= "
                             f"{positions}")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"the {kind} tokenizer has no pad token; set pad_token in its "
                             "tokenizer_config.json")
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self.empty_prompt = empty_prompt
        self._warned_truncation = False
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Always eval: the weights are frozen and dropout must stay off."""
        return super().train(False)

    @property
    def dim(self) -> int:
        """D, the embedding width (what the denoiser's cross-attention takes as context)."""
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TextEncoder:
        self._null = None  # cached on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def _check(self, prompts: Sequence[str], names: Sequence[str]) -> list[str]:
        """Empty captions -> error naming the item (or the null prompt, if so configured)."""
        out = []
        for prompt, name in zip(prompts, names, strict=True):
            if not isinstance(prompt, str):
                raise TypeError(f"{name}: expected a string prompt, got {type(prompt).__name__}")
            if not prompt.strip():
                if self.empty_prompt == "error":
                    raise ValueError(f"{name}: empty caption; fix the data or set "
                                     "text_encoder.empty_prompt: null to encode it as the null "
                                     "prompt")
                prompt = ""
            out.append(prompt)
        return out

    @torch.no_grad()
    def _embed(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, max_length, D]`` embeddings and ``[N, max_length]`` bool masks."""
        if not prompts:
            return (torch.zeros(0, max_length, self.dim, device=self.device, dtype=self.dtype),
                    torch.zeros(0, max_length, device=self.device, dtype=torch.bool))
        lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        if max(lengths, default=0) > max_length and not self._warned_truncation:
            self._warned_truncation = True
            longest = max(range(len(prompts)), key=lengths.__getitem__)
            log.warning("a prompt of %d tokens was truncated to %d (%r...); further "
                        "truncations are not reported", lengths[longest], max_length,
                        prompts[longest][:60])
        tokens = self.tokenizer(prompts, padding="max_length", max_length=max_length,
                                truncation=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device).bool()
        if self.kind == "t5":
            emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            emb = emb * mask[..., None]
        else:  # as SD1.5 was trained: CLIP's causal mask only, padding positions kept
            emb = self.model(input_ids=ids).last_hidden_state
        return emb, mask

    def encode(self, prompts: Sequence[str], names: Sequence[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global prompts -> ``(emb [B, L, D], mask [B, L] bool)``, L = ``max_length``.

        ``names`` (e.g. clip ids) name the items in the error for an empty caption.
        """
        names = names or [f"prompt[{i}]" for i in range(len(prompts))]
        return self._embed(self._check(prompts, names), self.max_length)

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's ``(emb [batch, L, D], mask [batch, L])``: dropped text in
        training and the unconditional branch of guidance. Computed once per device/dtype."""
        if self._null is None:
            self._null = self._embed([""], self.max_length)
        emb, mask = self._null  # copies: a caller writing into them must not touch the cache
        return emb.expand(batch, -1, -1).clone(), mask.expand(batch, -1).clone()

    def encode_local(
        self,
        per_sample_prompts: Sequence[Sequence[str]],
        object_ids: Sequence[Sequence[int]] | None = None,
        max_tokens_per_object: int | None = None,
        num_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-object prompts -> ``(local_text [B, M, D], local_text_ids [B, M] long)``.

        Each object's prompt is encoded on its own (at most ``max_tokens_per_object``
        tokens, default ``max_length``); its real tokens are concatenated per sample and
        tagged with the object's id (``object_ids``, default 0..K-1: the trajectory colour
        index, which is how ``token_ids`` name objects). Padding has id -1 and zero
        embeddings. M is the longest sample's token count (at least 1), or ``num_tokens``
        for a fixed shape. A sample with no prompts is all -1.
        """
        if object_ids is None:
            object_ids = [list(range(len(p))) for p in per_sample_prompts]
        if len(object_ids) != len(per_sample_prompts):
            raise ValueError(f"object_ids has {len(object_ids)} samples, prompts "
                             f"{len(per_sample_prompts)}")
        flat, names, owners = [], [], []
        for b, (prompts, ids) in enumerate(zip(per_sample_prompts, object_ids, strict=True)):
            if len(prompts) != len(ids):
                raise ValueError(f"sample {b}: {len(prompts)} local prompts but "
                                 f"{len(ids)} object ids")
            flat += list(prompts)
            names += [f"sample {b} object {i}" for i in ids]
            owners.append(len(prompts))
        tokens = self.encode_objects(flat, names, max_tokens_per_object)
        pieces, start = [], 0
        for ids, n in zip(object_ids, owners, strict=True):
            pieces.append(list(zip(tokens[start:start + n], ids, strict=True)))
            start += n
        return pack_local(pieces, self.dim, num_tokens, self.device, self.dtype)

    def encode_objects(self, prompts: Sequence[str], names: Sequence[str] | None = None,
                       max_tokens_per_object: int | None = None) -> list[torch.Tensor]:
        """Each object prompt's real-token embeddings ``[n_i, D]`` (at most
        ``max_tokens_per_object`` tokens, default ``max_length``), encoded on its own.

        The per-object half of :meth:`encode_local`; the encoded-latent cache stores exactly
        these and packs them at train time with :func:`pack_local`, so both paths agree.
        """
        limit = min(max_tokens_per_object or self.max_length, self.max_length)
        names = names or [f"object[{i}]" for i in range(len(prompts))]
        if not prompts:
            return []
        emb, mask = self._embed(self._check(list(prompts), list(names)), limit)
        return [e[m] for e, m in zip(emb, mask, strict=True)]


def pack_local(pieces: Sequence[Sequence[tuple[torch.Tensor, int]]], dim: int,
               num_tokens: int | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, ``(tokens [n, D], object id)`` pieces -> ``(local_text [B, M, D],
    local_text_ids [B, M] long)``: real tokens concatenated in order, tagged with their
    object's id, padded with zeros / -1 to M (the longest sample, at least 1, or
    ``num_tokens``). Shared by on-the-fly encoding and the encoded-latent cache."""
    for b, sample in enumerate(pieces):
        ids = [int(i) for _, i in sample]
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"sample {b}: object ids must be distinct and >= 0, got {ids}")
    counts = [sum(len(e) for e, _ in p) for p in pieces]
    width = max([*counts, 1]) if num_tokens is None else num_tokens
    if max(counts, default=0) > width:
        raise ValueError(f"local prompts need {max(counts)} tokens, num_tokens is {width}")
    batch = len(pieces)
    local = torch.zeros(batch, width, dim, device=device, dtype=dtype)
    local_ids = torch.full((batch, width), -1, device=device, dtype=torch.long)
    for b, sample in enumerate(pieces):
        start = 0
        for e, oid in sample:
            local[b, start:start + len(e)] = e.to(device=device, dtype=dtype)
            local_ids[b, start:start + len(e)] = int(oid)
            start += len(e)
    return local, local_ids


def _is_tokenizer_dir(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                            "vocab.json", "spiece.model"))


def load_text_encoder(kind: str, path: str | Path | None, tokenizer_path: str | Path | None,
                      dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """The encoder model and tokenizer of ``kind`` from local folders, with errors that name
    the path and the fix. ``path`` may be a pipeline folder (``text_encoder/``,
    ``tokenizer/``)."""
    import transformers

    hint = f"for tests and the quickstart: ttm_ray.conditioning.tiny.{_TINY[kind]}(dir)"
    classes = _MODEL_CLASSES[kind]
    wanted = " / ".join(sorted(set(classes.values())))
    if not path:
        raise ValueError(f"text encoder kind {kind!r} needs text_encoder.path ({hint})")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"text encoder path {root} does not exist: put a {wanted} saved "
                                f"with save_pretrained (and its tokenizer) there and set "
                                f"text_encoder.path ({hint})")
    model_dir = model_folder(root, ("text_encoder",))
    if model_dir is None:
        raise FileNotFoundError(f"text encoder path {root} has no config.json (nor "
                                f"text_encoder/config.json): it must hold a {wanted} saved with "
                                f"save_pretrained ({hint})")
    if tokenizer_path:
        tok_dir = Path(tokenizer_path).expanduser()
    else:
        tok_dir = next((d for d in (model_dir, root, root / "tokenizer")
                        if _is_tokenizer_dir(d)), model_dir)
    if not _is_tokenizer_dir(tok_dir):
        raise FileNotFoundError(f"no tokenizer in {tok_dir}: save the tokenizer beside the "
                                f"model (tokenizer.save_pretrained) or set "
                                f"text_encoder.tokenizer_path")
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if model_type not in classes:
        other = next((k for k, c in _MODEL_CLASSES.items() if model_type in c), None)
        fix = f"set text_encoder.kind: {other}" if other else f"point path at a {wanted}"
        raise ValueError(f"text encoder path {model_dir} holds a {model_type!r} model, not the "
                         f"{wanted} that kind {kind!r} loads: {fix}")
    cls = getattr(transformers, classes[model_type])
    model = cls.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return model, tokenizer


__all__ = ["TextEncoder", "TextEncoderConfig", "load_text_encoder", "pack_local"]
