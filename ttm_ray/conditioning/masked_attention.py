"""Masked attention from token object ids: the one implementation both model families use.

The paper's stage-2 layers compute ``h = softmax(q k^T / sqrt(d) + log M) v`` with

* ``M_self[i, j] = 1`` iff tokens ``i`` and ``j`` belong to the same object (background, id -1,
  is its own group), across all frames;
* ``M_cross[i, l] = 1`` iff text token ``l`` belongs to the object at token ``i``
  (``q_ids[i] == kv_ids[l] >= 0``); a token with no object, or whose object has no text,
  attends to nothing and gets exactly zero output (never NaN, and zero gradient).

``M`` is never materialised as a dense float bias: at the dit-4b stage-2 size (4,096 tokens,
20 heads) an fp32 ``[B, heads, N, N]`` bias is 1.34 GB per sample. The backends take the ids:

* ``"sdpa"``: one boolean ``[B, 1, N, M]`` mask (1 byte per pair, shared by all heads) through
  :func:`torch.nn.functional.scaled_dot_product_attention` (which turns it into one additive
  ``[B, 1, N, M]`` bias of q's dtype, broadcast over heads). Rows with no allowed key are made
  finite (allowed everywhere) and their output is multiplied by zero afterwards.
* ``"flex"``: :func:`torch.nn.attention.flex_attention.flex_attention` (compiled) with a block
  mask built from the ids, so fully masked blocks are skipped and nothing ``N x M`` is stored.
  Used on CUDA; torch 2.14 on CPU has no FlexAttention backward, so on CPU it only serves
  inference (``auto`` never picks it there).
* ``"grouped"``: gathers each object's queries and keys and attends within the group (one
  unmasked SDPA per (sample, id)): cost ``sum_g n_g m_g`` instead of ``N M``, no mask at all,
  but id-sorted copies of q, k and v. It reads the ids on the host (a sync per sample), so it
  breaks a ``torch.compile`` graph; on a CPU it is the fastest at large token counts.

``"auto"`` (:func:`choose_backend`) picks flex on CUDA; on a CPU grouped for large
self-attention and sdpa otherwise (``benchmarks/results/masked_attention_cpu.md`` has the
measurements behind the choice).
:func:`masked_attention_reference` is the float64 naive definition the tests check all of
them against.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Mode = Literal["self", "cross"]
Backend = Literal["auto", "sdpa", "flex", "grouped"]
BACKENDS: tuple[str, ...] = ("sdpa", "flex", "grouped")
MODES: tuple[str, ...] = ("self", "cross")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
           kv_ids: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q/k/v must be [B, heads, N, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if tuple(q_ids.shape) != (b, n):
        raise ValueError(f"q_ids must be [B, N] = {[b, n]}, got {list(q_ids.shape)}")
    if tuple(kv_ids.shape) != (b, k.shape[2]):
        raise ValueError(f"kv_ids must be [B, M] = {[b, k.shape[2]]}, got {list(kv_ids.shape)}")
    if q_ids.is_floating_point() or kv_ids.is_floating_point():
        raise ValueError("ids must be integer tensors (long), not floating point")


def allowed_mask(q_ids: torch.Tensor, kv_ids: torch.Tensor, mode: Mode) -> torch.Tensor:
    """The boolean ``M``: ``[B, N, M]``, True where query ``i`` may attend key ``j``."""
    allowed = q_ids[:, :, None] == kv_ids[:, None, :]
    if mode == "cross":
        allowed = allowed & (kv_ids[:, None, :] >= 0)
    return allowed


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
    kv_ids: torch.Tensor, *, mode: Mode, backend: str = "reference",
    scale: float | None = None,
) -> torch.Tensor:
    """The definition, naively in float64: ``softmax(q k^T * scale + log M) v``.

    A row with no allowed key has output 0 (its logits are replaced by finite zeros before
    the softmax so neither the value nor its gradient is NaN). Returns q's dtype.
    ``backend`` is accepted (and ignored) so the signature matches :func:`masked_attention`.
    """
    del backend
    _check(q, k, v, q_ids, kv_ids, mode)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = allowed_mask(q_ids, kv_ids, mode)[:, None]  # [B, 1, N, M]
    log_m = torch.zeros(allowed.shape, dtype=torch.float64, device=q.device)
    log_m = log_m.masked_fill(~allowed, float("-inf"))
    scores = q.double() @ k.double().transpose(-1, -2) * scale + log_m
    empty = ~allowed.any(dim=-1, keepdim=True)  # [B, 1, N, 1]
    scores = scores.masked_fill(empty, 0.0)
    out = scores.softmax(dim=-1) @ v.double()
    return out.masked_fill(empty, 0.0).to(q.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
          kv_ids: torch.Tensor, mode: Mode, scale: float | None) -> torch.Tensor:
    allowed = allowed_mask(q_ids, kv_ids, mode)  # [B, N, M] bool
    if mode == "self" and q_ids is kv_ids:
        # Every token sees at least itself: no empty row, skip the extra N x M passes.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    nonempty = allowed.any(dim=-1)  # [B, N]
    # Fully masked rows: allow everything (finite softmax, finite gradients), zero later.
    allowed = allowed | ~nonempty[:, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    return out * nonempty[:, None, :, None].to(out.dtype)


def _groups(ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, tuple[int, int]]]:
    """A stable sort of one sample's ids, and each id's (start, length) in sorted order."""
    order = torch.argsort(ids, stable=True)
    uniq, counts = torch.unique_consecutive(ids[order], return_counts=True)
    spans, start = {}, 0
    for gid, count in zip(uniq.tolist(), counts.tolist(), strict=True):
        spans[gid] = (start, count)
        start += count
    return order, spans


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
             kv_ids: torch.Tensor, mode: Mode, scale: float | None) -> torch.Tensor:
    b, h, n, _ = q.shape
    # Rows of every sample side by side; rows without an allowed key stay 0.
    out = q.new_zeros(h, b * n, v.shape[-1])
    for i in range(b):
        q_order, q_spans = _groups(q_ids[i])
        kv_order, kv_spans = _groups(kv_ids[i])
        qs = q[i].index_select(1, q_order)  # [h, N, d], grouped by id
        ks, vs = k[i].index_select(1, kv_order), v[i].index_select(1, kv_order)
        for gid, (qa, qn) in q_spans.items():
            span = kv_spans.get(gid)
            if span is None or (mode == "cross" and gid < 0):
                continue
            ka, kn = span
            piece = F.scaled_dot_product_attention(
                qs[:, qa:qa + qn], ks[:, ka:ka + kn], vs[:, ka:ka + kn], scale=scale)
            out.index_copy_(1, q_order[qa:qa + qn] + i * n, piece)
    return out.view(h, b, n, -1).transpose(0, 1)


@functools.cache
def _flex_fns() -> tuple | None:
    """(compiled flex_attention, create_block_mask), or None where this torch lacks them."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:  # pragma: no cover - torch without FlexAttention
        return None
    # Default (automatic) dynamic shapes: the local-text length M changes between batches, and
    # a static compile per M would hit the recompile limit and fall back to the unfused path.
    return torch.compile(flex_attention), create_block_mask


def flex_available(device: torch.device | str, *, requires_grad: bool = False) -> bool:
    """Whether the ``flex`` backend runs here: CUDA (forward and backward), CPU forward only."""
    device = torch.device(device)
    if _flex_fns() is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and not requires_grad


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
          kv_ids: torch.Tensor, mode: Mode, scale: float | None) -> torch.Tensor:
    fns = _flex_fns()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if fns is None or not flex_available(q.device, requires_grad=needs_grad):
        raise RuntimeError(f"flex backend unavailable on {q.device} (requires_grad="
                           f"{needs_grad}); torch {torch.__version__} has no FlexAttention "
                           "backward on CPU - use backend='sdpa' or 'auto'")
    flex, create_block_mask = fns
    b, _, n, _ = q.shape
    m = k.shape[2]
    if mode == "self":
        def mask_mod(bi, hi, qi, ki):  # flex's fixed signature (b, h, q_idx, kv_idx)
            return q_ids[bi, qi] == kv_ids[bi, ki]
    else:
        def mask_mod(bi, hi, qi, ki):
            return (q_ids[bi, qi] == kv_ids[bi, ki]) & (kv_ids[bi, ki] >= 0)
    block_mask = create_block_mask(mask_mod, b, None, n, m, device=q.device)
    # FlexAttention returns 0 for rows without any allowed key (its logsumexp is -inf).
    return flex(q, k, v, block_mask=block_mask, scale=scale)


#: CPU self-attention with at least this many (query, key) pairs per sample goes to ``grouped``
#: (``benchmarks/results/masked_attention_cpu.md``, a busy 2-core machine): at 4,096 tokens
#: (dit-4b heads) grouped ran forward 0.3-0.5x and forward+backward 0.3-0.4x the time of
#: *unmasked* SDPA, where the sdpa backend is at or above it; at 1,024 tokens grouped won with
#: one thread (0.7x / 0.3x) but mostly lost with two (many small per-group kernels), so the
#: switch sits between the two sizes.
GROUPED_MIN_PAIRS_CPU = 2048 * 2048


def choose_backend(q: torch.Tensor, k: torch.Tensor, mode: Mode) -> str:
    """What ``backend="auto"`` runs: flex on CUDA; on a CPU grouped for large self-attention
    (it skips the cross-group work), sdpa otherwise."""
    if q.device.type == "cuda" and flex_available(q.device):
        return "flex"
    if q.device.type == "cpu" and mode == "self" and q.shape[-2] * k.shape[-2] \
            >= GROUPED_MIN_PAIRS_CPU:
        return "grouped"
    return "sdpa"


_IMPLS = {"sdpa": _sdpa, "flex": _flex, "grouped": _grouped}


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
    kv_ids: torch.Tensor, *, mode: Mode, backend: Backend = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + log M) v`` with ``M`` given by object ids (module docstring).

    q ``[B, heads, N, d]``, k/v ``[B, heads, M, d]``, q_ids ``[B, N]`` and kv_ids ``[B, M]``
    long (-1 = no object). ``mode="self"``: ``q_ids[i] == kv_ids[j]`` (background is one
    group); ``mode="cross"``: ``q_ids[i] == kv_ids[j] >= 0``; queries without an allowed key
    get exactly 0. ``scale`` defaults to ``1/sqrt(d)``. Returns ``[B, heads, N, d_v]``.
    """
    _check(q, k, v, q_ids, kv_ids, mode)
    if backend == "auto":
        backend = choose_backend(q, k, mode)
    if backend not in _IMPLS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    same = kv_ids is q_ids  # self-attention over the same tokens: no row can be empty
    q_ids = q_ids.to(device=q.device, dtype=torch.long)
    kv_ids = q_ids if same else kv_ids.to(device=q.device, dtype=torch.long)
    return _IMPLS[backend](q, k, v, q_ids, kv_ids, mode, scale)


class MaskedAttention(nn.Module):
    """An added masked self- or cross-attention layer (stage 2, first K blocks).

    ``mode="self"``: queries, keys and values from ``x``; token ``i`` attends token ``j`` iff
    they carry the same object id (background, -1, included as its own group).
    ``mode="cross"``: keys/values from ``context`` (all local prompts' token embeddings,
    ``context_ids`` naming each token's object, -1 = padding); a token attends only its own
    object's text, and a token with no object gets 0.

    The output projection is zero-initialised, so inserting the layer (residually) leaves a
    pretrained model's function unchanged at step 0. ``qk_norm`` is RMSNorm over each head's
    queries and keys (MovieGen); parameters: ``dim * (2 * dim + 2 * context_dim) + 2 * d``.
    """

    def __init__(self, dim: int, heads: int, *, mode: Mode, context_dim: int | None = None,
                 qk_norm: bool = True, eps: float = 1e-6, backend: Backend = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if mode == "self" and context_dim not in (None, dim):
            raise ValueError("context_dim is only for mode='cross' (self attends to x)")
        self.dim, self.heads, self.mode, self.backend = dim, heads, mode, backend
        self.head_dim = dim // heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init for q/k/v, zeros for the output projection (start as a no-op)."""
        for lin in (self.to_q, self.to_k, self.to_v):
            lin.reset_parameters()
        nn.init.zeros_(self.to_out.weight)
        for norm in (self.norm_q, self.norm_k):
            if isinstance(norm, nn.RMSNorm):
                norm.reset_parameters()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor,
                context: torch.Tensor | None = None,
                context_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, N, D]``, token_ids ``[B, N]`` (or ``[B, T', H', W']``, flattened in that
        order) -> ``[B, N, D]``. Cross mode needs ``context [B, M, Dc]`` and
        ``context_ids [B, M]``."""
        b, n, _ = x.shape
        token_ids = token_ids.reshape(b, -1)
        if token_ids.shape[1] != n:
            raise ValueError(f"token_ids hold {token_ids.shape[1]} tokens per sample, x has {n}")
        if self.mode == "self":
            if context is not None or context_ids is not None:
                raise ValueError("mode='self' takes no context (keys/values come from x)")
            context, context_ids = x, token_ids
        elif context is None or context_ids is None:
            raise ValueError("mode='cross' needs context [B, M, Dc] and context_ids [B, M]")
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(context)))
        v = self._heads(self.to_v(context))
        out = masked_attention(q, k, v, token_ids, context_ids, mode=self.mode,
                               backend=self.backend)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.dim))
