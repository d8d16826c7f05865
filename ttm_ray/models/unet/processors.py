"""Attention processors that add TTM's masked attention and the text mask to diffusers'
spatial attention, and the per-call context that feeds them.

Why processors: diffusers' ``BasicTransformerBlock`` runs ``x += attn1(norm1(x))`` then
``x += attn2(norm2(x), text)``. A processor on ``attn1`` returns ``attn1(n) + masked_self(n)``
and one on ``attn2`` returns ``attn2(n, text) + masked_cross(n, local_text)``: the masked
layers sit beside the normal ones on the same normalised input and residual (the paper's
"full self-attn, masked self-attn, global cross-attn, masked cross-attn"), without copying
any diffusers block.

Why a context object: the token ids, local prompts and text mask change every call. They
travel as ``cross_attention_kwargs={"ttm_context": ctx}``, which diffusers hands to every
spatial ``Attention`` of that call and to nothing else. ``ctx`` is created by
``TTMUNet.forward`` and referenced only by that call's arguments, so nothing persists on the
model between calls (no global, nothing to clear), two models can run interleaved or nested,
and activation checkpointing's recomputation in backward sees the same ``ctx`` as the forward.
The masked layers themselves ride in ``ctx`` too, so the processors hold no parameters and
survive ``deepcopy``/sharding of the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ttm_ray.conditioning.masked_attention import MaskedAttention, ObjectLayout
from ttm_ray.conditioning.masks import downsample_token_ids


@dataclass
class LocalConditioning:
    """Stage-2 inputs of the masked layers for one call.

    ``token_ids`` is ``[B, T, H, W]`` on the latent grid (the U-Net's finest level); coarser
    levels derive theirs with ``conditioning.masks.downsample_token_ids`` once per call, and
    each level gets one :class:`ObjectLayout` (the id sort and block masks of the masked
    layers), built once per call and shared by that level's masked blocks and recomputation.
    """

    layers: nn.ModuleList
    token_ids: torch.Tensor
    local_text: torch.Tensor
    local_text_ids: torch.Tensor
    _ids_by_level: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _layouts: dict[int, ObjectLayout] = field(default_factory=dict, repr=False)

    def ids_at(self, level: int) -> torch.Tensor:
        """``[B, T * h * w]`` object ids at ``level`` (h, w = latent H, W / 2**level), in the
        (frame, row, column) order of the tokens the processors see."""
        ids = self._ids_by_level.get(level)
        if ids is None:
            grid = self.token_ids
            f = 2**level
            if level and grid.is_meta:
                # Meta tensors (FLOP counting) have shapes but no values to vote on.
                grid = grid[:, :, ::f, ::f]
            elif level:
                grid = downsample_token_ids(grid, factor=(1, f, f))
            ids = grid.flatten(1).long()
            self._ids_by_level[level] = ids
        return ids

    def layout_at(self, level: int) -> ObjectLayout:
        """The masked layers' :class:`ObjectLayout` at ``level`` (tokens = :meth:`ids_at`,
        context = the local-text ids); built once per call, computed lazily on first use."""
        layout = self._layouts.get(level)
        if layout is None:
            ids = self.ids_at(level)
            layout = ObjectLayout(ids, self.local_text_ids.to(ids.device, torch.long))
            self._layouts[level] = layout
        return layout


@dataclass
class AttentionContext:
    """Everything the processors of one ``TTMUNet.forward`` call need (see module docstring)."""

    num_frames: int
    text_mask: torch.Tensor | None = None
    local: LocalConditioning | None = None
    _text_bias: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def text_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[B * T, 1, L]`` additive bias hiding padded text tokens (diffusers' mask form).
        A row with no real token attends to all of them instead of producing NaN."""
        if self.text_mask is None:
            return None
        bias = self._text_bias.get(dtype)
        if bias is None:
            mask = self.text_mask.bool()
            mask = mask | ~mask.any(dim=-1, keepdim=True)
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            bias = bias.masked_fill(~mask, torch.finfo(dtype).min)
            bias = bias[:, None, :].repeat_interleave(self.num_frames, dim=0)
            self._text_bias[dtype] = bias
        return bias


class TTMAttnProcessor:
    """Wraps the processor a spatial ``Attention`` had (normally ``AttnProcessor2_0``).

    ``role`` says whether it serves ``attn1`` (self) or ``attn2`` (cross); ``masked_index`` is
    the index of its :class:`MaskedBlock` in ``ctx.local.layers`` (None: not a masked block);
    ``level`` the resolution level (for the token ids).
    """

    def __init__(self, base: Any, *, role: Literal["self", "cross"], level: int,
                 masked_index: int | None = None) -> None:
        self.base = base
        self.role = role
        self.level = level
        self.masked_index = masked_index

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None,
                 ttm_context: AttentionContext | None = None) -> torch.Tensor:
        ctx = ttm_context
        if self.role == "cross" and ctx is not None and attention_mask is None:
            attention_mask = ctx.text_bias(hidden_states.dtype)
        out = self.base(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                        attention_mask=attention_mask, temb=temb)
        if self.masked_index is None or ctx is None or ctx.local is None:
            return out
        return out + self._masked(hidden_states, ctx.num_frames, ctx.local)

    def _masked(self, x: torch.Tensor, frames: int, local: LocalConditioning) -> torch.Tensor:
        # [B*T, N, C] per frame -> [B, T*N, C]: masked attention spans all frames of a sample.
        bt, n, c = x.shape
        layout = local.layout_at(self.level)
        ids = layout.token_ids
        if bt % frames or ids.shape != (bt // frames, frames * n):
            raise ValueError(
                f"token ids at level {self.level} are {tuple(ids.shape)} but the block sees "
                f"{bt // max(frames, 1)} samples x {frames} frames x {n} tokens; "
                "cond.token_ids must be [B, T, H, W] on the latent grid")
        x = x.reshape(bt // frames, frames * n, c)
        block = local.layers[self.masked_index]
        if self.role == "self":
            y = block.masked_self(x, ids, layout=layout)
        else:
            y = block.masked_cross(x, ids, context=local.local_text.to(x.dtype),
                                   context_ids=layout.context_ids, layout=layout)
        return y.reshape(bt, n, c)


class MaskedBlock(nn.Module):
    """The two layers TTM adds to one transformer block (both zero-initialised on their
    output projection, so a new block leaves the base U-Net's output unchanged)."""

    def __init__(self, dim: int, heads: int, context_dim: int, qk_norm: bool) -> None:
        super().__init__()
        self.masked_self = MaskedAttention(dim, heads, mode="self", qk_norm=qk_norm)
        self.masked_cross = MaskedAttention(dim, heads, mode="cross", context_dim=context_dim,
                                            qk_norm=qk_norm)
