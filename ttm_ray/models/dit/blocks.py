"""Building blocks of the TTM DiT: Llama-3-style transformer blocks with adaLN and text
cross-attention, plus the stage-2 masked layers in the first K blocks.

One block, in order (``x`` is the token stream ``[B, N, D]``)::

    x = x + pos                                        # factorized t/h/w, added at EVERY block
    x = x + g1 * SelfAttn(modulate(norm(x), b1, s1))   # full bidirectional, SDPA
    x = x + MaskedSelfAttn(norm(x), token_ids)         # first K blocks, stage 2 only
    x = x + CrossAttn(norm(x), text)                   # global prompt
    x = x + MaskedCrossAttn(norm(x), local_text)       # first K blocks, stage 2 only
    x = x + g2 * SwiGLU(modulate(norm(x), b2, s2))

(``b`` shift, ``s`` scale, ``g`` gate: adaLN from the timestep.) The masked self-attention
needs only ``token_ids`` (which object each token shows); the masked cross-attention also
needs the local prompts. Either is skipped when its inputs are absent, which equals its
zero-initialised start.

The added layers sit *beside* the normal ones (each with its own residual), matching the
paper's list "full self-attn, masked self-attn, global cross-attn, masked cross-attn"; their
output projections start at zero (inside ``MaskedAttention``), so a stage-2 model initialised
from a stage-1 / text-to-video checkpoint starts with exactly that checkpoint's behaviour.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ttm_ray.conditioning.masked_attention import MaskedAttention, ObjectLayout
from ttm_ray.models.dit.config import DiTConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``[B, D]`` shift/scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SwiGLU(nn.Module):
    """Llama FFN: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Multi-head attention on SDPA: self-attention (``context=None``, full bidirectional) or
    cross-attention to a context of the same width (the text after the model's projection).

    ``context_mask`` ``[B, M]`` bool marks real context tokens. A sample with no real token
    gets a zero output instead of the NaN a fully masked softmax would give.
    """

    def __init__(self, dim: int, heads: int, *, cross: bool, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(dim, 2 * dim, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # Per-head RMSNorm on q and k keeps attention logits bounded in long bf16 runs.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.out = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q = self._heads(self.q(x))
            k, v = (self._heads(t) for t in self.kv(context).chunk(2, dim=-1))
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = self.q_norm(q), self.k_norm(k)
        mask = keep = None
        if context_mask is not None:
            keep = context_mask.any(dim=-1)  # [B]
            # Let empty samples attend everywhere (finite), then zero their output below.
            mask = (context_mask | ~keep[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out(out.transpose(1, 2).reshape(b, n, d))
        if keep is not None:
            out = out * keep[:, None, None].to(out.dtype)
        return out


class DiTBlock(nn.Module):
    """One transformer block; ``masked=True`` adds the stage-2 masked self/cross layers."""

    def __init__(self, cfg: DiTConfig, masked: bool) -> None:
        super().__init__()
        d, eps = cfg.dim, cfg.norm_eps
        # Norms feeding an adaLN modulation carry no affine weight: the modulation is it.
        self.norm_attn = nn.RMSNorm(d, eps=eps, elementwise_affine=False)
        self.attn = Attention(d, cfg.heads, cross=False, qk_norm=cfg.qk_norm, eps=eps)
        self.norm_cross = nn.RMSNorm(d, eps=eps)
        self.cross_attn = Attention(d, cfg.heads, cross=True, qk_norm=cfg.qk_norm, eps=eps)
        self.norm_ffn = nn.RMSNorm(d, eps=eps, elementwise_affine=False)
        self.ffn = SwiGLU(d, cfg.hidden)
        if cfg.adaln == "single":
            # adaLN-single: this block's learnable offset to the model's shared modulation.
            self.modulation_table = nn.Parameter(torch.randn(6, d) / math.sqrt(d))
            self.modulation = None
        else:
            self.modulation_table = None
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.masked = masked
        if masked:
            kw = {"qk_norm": cfg.qk_norm, "eps": eps, "backend": cfg.masked_attention_backend}
            self.masked_self_norm = nn.RMSNorm(d, eps=eps)
            self.masked_self_attn = MaskedAttention(d, cfg.heads, mode="self", **kw)
            self.masked_cross_norm = nn.RMSNorm(d, eps=eps)
            # Context = local prompts after the model's shared text projection (width D).
            self.masked_cross_attn = MaskedAttention(d, cfg.heads, mode="cross", context_dim=d,
                                                     **kw)
        self.checkpointing = cfg.activation_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        temb: torch.Tensor,
        shared_mod: torch.Tensor | None,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        token_ids: torch.Tensor | None = None,
        local_text: torch.Tensor | None = None,
        local_ids: torch.Tensor | None = None,
        layout: ObjectLayout | None = None,
    ) -> torch.Tensor:
        """``x [B, N, D]``, ``pos [N, D]``, ``temb [B, D]``, ``shared_mod [B, 6D]`` (adaLN-single),
        ``text [B, L, D]`` (projected); ``token_ids [B, N]``, ``local_text [B, M, D]``,
        ``local_ids [B, M]`` drive the masked layers: masked self-attention runs when
        ``token_ids`` is given, masked cross-attention when ``local_text`` is given too.
        ``layout``: the model forward's ``ObjectLayout(token_ids, local_ids)``, shared by the
        masked layers of every block (and by recomputation); without one the block builds
        its own."""
        if self.modulation_table is not None:
            assert shared_mod is not None
            mod = shared_mod.unflatten(-1, (6, -1)) + self.modulation_table
        else:
            assert self.modulation is not None
            mod = self.modulation(temb).unflatten(-1, (6, -1))
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(dim=1)

        x = x + pos
        x = x + gate_a[:, None] * self.attn(modulate(self.norm_attn(x), shift_a, scale_a))
        use_masked = self.masked and token_ids is not None
        if use_masked and layout is None:
            assert token_ids is not None
            with_text = local_text is not None and local_ids is not None
            layout = ObjectLayout(token_ids.reshape(x.shape[0], -1).to(x.device, torch.long),
                                  local_ids.to(x.device, torch.long) if with_text else None)
        if use_masked:
            assert layout is not None
            x = x + self.masked_self_attn(self.masked_self_norm(x), layout.token_ids,
                                          layout=layout)
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        if use_masked and local_text is not None:
            assert layout is not None and layout.context_ids is not None, \
                "local_text without local_text_ids"
            x = x + self.masked_cross_attn(self.masked_cross_norm(x), layout.token_ids,
                                           local_text, layout.context_ids, layout=layout)
        return x + gate_f[:, None] * self.ffn(modulate(self.norm_ffn(x), shift_f, scale_f))


class TimestepEmbedding(nn.Module):
    """``t [B]`` (flow-matching time in [0, 1]) -> ``[B, D]``: sinusoids of ``t * scale`` then an
    MLP (DiT). Scaling to ~1000 puts the sinusoid frequencies where DDPM-era models had them,
    so fine timestep differences stay distinguishable."""

    def __init__(self, dim: int, freq_dim: int, scale: float) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoids(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device,
                                                            dtype=torch.float32) / half)
        args = (t.float() * self.scale)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoids(t).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class FinalLayer(nn.Module):
    """norm -> adaLN (shift, scale) -> linear to ``patch_volume * out_channels`` per token."""

    def __init__(self, dim: int, out_features: int, eps: float, single: bool) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
        if single:
            self.modulation_table = nn.Parameter(torch.randn(2, dim) / math.sqrt(dim))
            self.modulation = None
        else:
            self.modulation_table = None
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.modulation_table is not None:
            # PixArt: the final layer's shift/scale are the timestep embedding plus a table.
            mod = temb[:, None] + self.modulation_table
        else:
            assert self.modulation is not None
            mod = self.modulation(temb).unflatten(-1, (2, -1))
        shift, scale = mod.unbind(dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))
