"""Masked attention from token object ids: the one implementation both model families use.

The paper's stage-2 layers compute ``h = softmax(q k^T / sqrt(d) + log M) v`` with

* ``M_self[i, j] = 1`` iff tokens ``i`` and ``j`` belong to the same object (background, id -1,
  is its own group), across all frames;
* ``M_cross[i, l] = 1`` iff text token ``l`` belongs to the object at token ``i``
  (``q_ids[i] == kv_ids[l] >= 0``); a token with no object, or whose object has no text,
  attends to nothing and gets exactly zero output (never NaN, and zero gradient).

Design: nothing ``N x M`` is built per layer
---------------------------------------------
A model forward builds one :class:`ObjectLayout` (a "mask plan") from the per-token object
ids and the local-text ids, and hands it to every masked layer (all K blocks, self and cross,
and activation checkpointing's recomputation, which sees the same object). Everything in it
is computed lazily, once, on first use:

* a **stable sort of the tokens by object id** (permutation and inverse) and of the context
  tokens (padding, id < 0, sorted last for cross-attention so it never shares a block with a
  real object);
* per-sample **group spans** (``{id: (start, length)}`` in sorted order, one host sync per
  layout) for the ``grouped`` backend;
* per mode, a FlexAttention :class:`~torch.nn.attention.flex_attention.BlockMask` built
  **directly from block id ranges**, never from a dense mask: after sorting, each 128-token
  block spans the ids ``[first, last]``; a (query block, key block) pair can hold an allowed
  pair only if the ranges overlap (then it is *partial*: the ``mask_mod`` compares the sorted
  ids element-wise), and every pair is allowed when both blocks are whole and hold one and the
  same id (*full*: no ``mask_mod``). Because both sides are sorted, the key blocks overlapping a
  query block are one contiguous run (two binary searches) and its full blocks a sub-run, so
  the forward lists (``kv_num_blocks``/``kv_indices``, ``full_kv_*``) and their transposes for
  backward (``q_*``, ``full_q_*``) are index arithmetic on ``[B, N/128, M/128]``: memory
  ``O((N/128) (M/128))`` (~4 MiB at 65,536 tokens), no host sync, no compile, no per-token
  pass. ``create_block_mask``, used per call before, evaluated the mask on a dense
  ``[B, 1, N, M]`` grid: 4 GiB per sample at the U-Net's level 0 (16 x 64 x 64 tokens).

Backends (``backend=``), all taking the ids (and optionally the layout):

* ``"flex"``: gathers q/k/v into object-sorted order, runs compiled
  :func:`~torch.nn.attention.flex_attention.flex_attention` with the layout's block mask, and
  gathers the output back. Block-sparse skipping needs same-object tokens contiguous, which the
  sort provides, so masked self-attention costs about ``sum_l n_l^2`` (block-granular) instead
  of ``N^2``. Used on CUDA; torch 2.14 on CPU has no FlexAttention backward, so on CPU it only
  serves inference (``auto`` never picks it there). Rows with no allowed key: FlexAttention
  returns 0 (their logsumexp is -inf).
* ``"grouped"``: one unmasked SDPA per (sample, id) over the layout's sorted spans: cost
  ``sum_g n_g m_g``, no mask, but id-sorted copies of q, k, v and a host sync per layout
  (it breaks a ``torch.compile`` graph); on a CPU the fastest at large token counts.
* ``"sdpa"``: one boolean ``[B, 1, N, M]`` mask (1 byte per pair, shared by all heads) through
  :func:`torch.nn.functional.scaled_dot_product_attention`; dense work, for small sizes. Rows
  with no allowed key are made finite (allowed everywhere) and zeroed afterwards. It ignores
  the layout.

``"auto"`` (:func:`choose_backend`) picks flex on CUDA; on a CPU grouped for large
self-attention and sdpa otherwise (``benchmarks/results/masked_attention_cpu.md`` has the
measurements behind the choice). Called without a layout, :func:`masked_attention` builds a
one-off layout for that call (same results, no sharing).
:func:`masked_attention_reference` is the float64 naive definition the tests check all of
them against; :meth:`ObjectLayout.computed_pairs` counts the (query, key) pairs the
block-sparse kernel computes, which ``ttm_ray/models/flops.py`` uses for the masked layers'
FLOPs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Mode = Literal["self", "cross"]
Backend = Literal["auto", "sdpa", "flex", "grouped"]
BACKENDS: tuple[str, ...] = ("sdpa", "flex", "grouped")
MODES: tuple[str, ...] = ("self", "cross")
#: FlexAttention's tile (query and key block) size: the granularity of the block mask.
BLOCK_SIZE = 128
#: Sort key of context padding in cross mode: after every real id, equal to no query id.
_PAD_KEY = torch.iinfo(torch.long).max


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
    _check_integer(q_ids, kv_ids)


def _check_integer(*ids: torch.Tensor) -> None:
    if any(t.is_floating_point() or t.is_complex() for t in ids):
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
    scale: float | None = None, layout: ObjectLayout | None = None,
) -> torch.Tensor:
    """The definition, naively in float64: ``softmax(q k^T * scale + log M) v``.

    A row with no allowed key has output 0 (its logits are replaced by finite zeros before
    the softmax so neither the value nor its gradient is NaN). Returns q's dtype.
    ``backend`` and ``layout`` are accepted (and ignored) so the signature matches
    :func:`masked_attention`.
    """
    del backend, layout
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


# --- the layout (mask plan) ------------------------------------------------------------------


@dataclass(eq=False)
class SortedIds:
    """One id sequence ``[B, L]`` stably sorted by its key: ``order`` (sorted position ->
    original), ``inverse`` (original -> sorted), ``ids`` (the original ids in sorted order) and
    ``keys`` (what the block mask compares: the ids, or for cross-attention context the ids
    with padding replaced by a key no query has)."""

    order: torch.Tensor
    inverse: torch.Tensor
    ids: torch.Tensor
    keys: torch.Tensor
    _spans: list[dict[int, tuple[int, int]]] | None = None

    @classmethod
    def build(cls, ids: torch.Tensor, *, padding_last: bool) -> SortedIds:
        keys = torch.where(ids >= 0, ids, _PAD_KEY) if padding_last else ids
        order = torch.argsort(keys, dim=1, stable=True)
        inverse = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return cls(order, inverse, ids.gather(1, order), keys.gather(1, order))

    def spans(self) -> list[dict[int, tuple[int, int]]]:
        """Per sample, ``{id: (start, length)}`` in sorted order (one host sync, cached)."""
        if self._spans is None:
            self._spans = []
            for row in self.ids:
                uniq, counts = torch.unique_consecutive(row, return_counts=True)
                spans, start = {}, 0
                for gid, count in zip(uniq.tolist(), counts.tolist(), strict=True):
                    spans[gid] = (start, count)
                    start += count
                self._spans.append(spans)
        return self._spans


def _block_ranges(keys: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """Per block of sorted ``keys [B, L]``: first key, last key, whether the block is whole."""
    length = keys.shape[1]
    starts = torch.arange(0, length, block, device=keys.device)
    ends = (starts + block).clamp(max=length)
    return keys[:, starts], keys[:, ends - 1], (ends - starts == block)


def block_structure(q_keys: torch.Tensor, kv_keys: torch.Tensor, block: int = BLOCK_SIZE
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) ``[B, N/block, M/block]`` bool from sorted keys: *partial* blocks may
    hold allowed pairs (their id ranges overlap; the mask is applied inside), *full* blocks hold
    only allowed pairs (one and the same id on both sides, both blocks whole)."""
    q_first, q_last, q_whole = _block_ranges(q_keys, block)
    k_first, k_last, k_whole = _block_ranges(kv_keys, block)
    overlap = (q_first[:, :, None] <= k_last[:, None, :]) & \
        (k_first[:, None, :] <= q_last[:, :, None])
    uniform = ((q_first == q_last) & q_whole)[:, :, None] & \
        ((k_first == k_last) & k_whole)[:, None, :] & (q_first[:, :, None] == k_first[:, None, :])
    full = overlap & uniform
    return overlap & ~full, full


def _runs(rows: tuple[torch.Tensor, ...], cols: tuple[torch.Tensor, ...]
          ) -> tuple[torch.Tensor, ...]:
    """FlexAttention's ordered block lists of (partial, full) blocks, rows over cols, from
    :func:`_block_ranges` of both sides: ``num [B, 1, rows]`` and ``indices
    [B, 1, rows, cols]`` int32 for each.

    Both sides are sorted, so the columns overlapping row ``i`` form one run ``[lo, hi)``
    (found by binary search), and its full columns (one id, equal to the row's one id) one
    sub-run ``[f_lo, f_lo + f_num)``; the partial ones are the run without it. Arithmetic
    on ``[B, rows, cols]`` indices, no sort and nothing per token."""
    r_first, r_last, r_whole = rows
    c_first, c_last, c_whole = cols
    lo = torch.searchsorted(c_last, r_first, side="left")  # first col with last >= first
    hi = torch.searchsorted(c_first, r_last, side="right")  # past the last col with first <= last
    num = (hi - lo).clamp(min=0)
    r_uniform = (r_first == r_last) & r_whole
    c_uniform = (c_first == c_last) & c_whole
    full = r_uniform[:, :, None] & c_uniform[:, None, :] & \
        (r_first[:, :, None] == c_first[:, None, :])
    f_num = full.sum(dim=-1)
    f_lo = torch.where(f_num > 0, full.to(torch.int8).argmax(dim=-1), hi)
    ncols = c_first.shape[1]
    t = torch.arange(ncols, device=lo.device)
    partial_idx = lo[..., None] + t
    partial_idx = partial_idx + (partial_idx >= f_lo[..., None]) * f_num[..., None]
    full_idx = f_lo[..., None] + t

    def pack(count: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.clamp(max=ncols - 1).to(torch.int32)  # entries past count: unused
        return count.to(torch.int32)[:, None].contiguous(), idx[:, None].contiguous()

    return (*pack(num - f_num, partial_idx), *pack(f_num, full_idx))


class ObjectLayout:
    """The per-forward plan of the masked layers (module docstring): built once from
    ``token_ids [B, N]`` (and ``context_ids [B, M]``, the local-text ids, for cross mode),
    passed to every masked layer through ``masked_attention(..., layout=layout)``.

    Nothing is computed at construction (so building one on the meta device, or for a model
    whose masked layers run ``sdpa``, costs nothing); each part is built on first use and
    cached: the sorts, the group spans, and one block mask per mode. Count of block-mask and
    sort builds: ``builds`` (what the tests check: once per forward).
    """

    def __init__(self, token_ids: torch.Tensor, context_ids: torch.Tensor | None = None, *,
                 block_size: int = BLOCK_SIZE, self_context: bool = False) -> None:
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be [B, N], got {tuple(token_ids.shape)}; flatten "
                             "a [B, T, H, W] grid with .flatten(1)")
        if context_ids is not None and (context_ids.ndim != 2
                                        or context_ids.shape[0] != token_ids.shape[0]):
            raise ValueError(f"context_ids must be [B={token_ids.shape[0]}, M], got "
                             f"{tuple(context_ids.shape)}")
        if self_context and context_ids is None:
            raise ValueError("self_context=True needs context_ids (the keys' ids)")
        _check_integer(token_ids, *([] if context_ids is None else [context_ids]))
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.token_ids = token_ids
        self.context_ids = context_ids
        self.block_size = block_size
        # Self-attention over keys other than the queries (``masked_attention`` with distinct
        # kv_ids): the context side then holds the keys' ids, sorted like the tokens.
        self.self_context = self_context
        self.builds: dict[str, int] = {}
        self._sorted: dict[str, SortedIds] = {}
        self._blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.token_ids.device

    def kv_ids(self, mode: Mode) -> torch.Tensor:
        """The ids of the keys of ``mode``: the tokens' own (self) or the context's (cross)."""
        if mode == "self" and not self.self_context:
            return self.token_ids
        if self.context_ids is None:
            raise ValueError("this layout has no context_ids; build it with "
                             "ObjectLayout(token_ids, context_ids) for cross-attention")
        return self.context_ids

    def _count(self, what: str) -> None:
        self.builds[what] = self.builds.get(what, 0) + 1

    def sorted(self, side: Literal["tokens", "context"]) -> SortedIds:
        """The stable sort of the tokens' or the context's ids (built once)."""
        got = self._sorted.get(side)
        if got is None:
            self._count("sort_" + side)
            if side == "tokens":
                got = SortedIds.build(self.token_ids, padding_last=False)
            else:
                # Cross: padding (< 0) sorts last, so no real object's block holds it.
                got = SortedIds.build(self.kv_ids("self" if self.self_context else "cross"),
                                      padding_last=not self.self_context)
            self._sorted[side] = got
        return got

    def kv_sorted(self, mode: Mode) -> SortedIds:
        """The sorted keys' side of ``mode``."""
        if mode == "self" and not self.self_context:
            return self.sorted("tokens")
        if mode == "cross" and self.self_context:
            raise ValueError("this layout was built for self-attention over context ids")
        return self.sorted("context")

    def blocks(self, mode: Mode) -> tuple[torch.Tensor, torch.Tensor]:
        """(partial, full) ``[B, N/block, M/block]`` bool of ``mode`` (:func:`block_structure`)."""
        got = self._blocks.get(mode)
        if got is None:
            self._count("blocks_" + mode)
            got = block_structure(self.sorted("tokens").keys, self.kv_sorted(mode).keys,
                                  self.block_size)
            self._blocks[mode] = got
        return got

    def block_mask(self, mode: Mode) -> Any:
        """FlexAttention ``BlockMask`` over the *sorted* tokens of ``mode`` (built once)."""
        got = self._masks.get(mode)
        if got is None:
            from torch.nn.attention.flex_attention import BlockMask

            self._count("block_mask_" + mode)
            q_keys, kv_keys = self.sorted("tokens").keys, self.kv_sorted(mode).keys
            q_blocks = _block_ranges(q_keys, self.block_size)
            kv_blocks = _block_ranges(kv_keys, self.block_size)

            def mask_mod(b, h, q_idx, kv_idx):  # flex's fixed signature
                return q_keys[b, q_idx] == kv_keys[b, kv_idx]

            kv_lists = _runs(q_blocks, kv_blocks)  # forward: key blocks per query block
            q_lists = _runs(kv_blocks, q_blocks)  # backward (dK, dV): the transpose
            got = BlockMask(
                (q_keys.shape[1], kv_keys.shape[1]), *kv_lists, *q_lists,
                BLOCK_SIZE=(self.block_size, self.block_size), mask_mod=mask_mod)
            self._masks[mode] = got
        return got

    def computed_pairs(self, mode: Mode) -> torch.Tensor:
        """Per sample, the (query, key) pairs a block-sparse kernel computes for ``mode``: the
        sizes of all partial and full blocks (what the FLOP report counts)."""
        partial, full = self.blocks(mode)
        block = self.block_size
        rows = _block_lengths(self.token_ids.shape[1], block, self.device)
        cols = _block_lengths(self.kv_ids(mode).shape[1], block, self.device)
        area = rows[:, None] * cols[None, :]
        return ((partial | full) * area).sum(dim=(1, 2))

    def check(self, q_ids: torch.Tensor, kv_ids: torch.Tensor, mode: Mode) -> None:
        """Raise unless ``q_ids``/``kv_ids`` are this layout's ids of ``mode`` (the same
        tensors or views of them: a cheap check, no compare of values)."""
        if not _same(q_ids, self.token_ids) or not _same(kv_ids, self.kv_ids(mode)):
            raise ValueError(
                f"the layout was built from other ids than the q_ids/kv_ids given for mode "
                f"{mode!r}; pass layout.token_ids and layout.kv_ids(mode), or build the layout "
                "from the ids you pass")


def _block_lengths(length: int, block: int, device: torch.device) -> torch.Tensor:
    starts = torch.arange(0, length, block, device=device)
    return (starts + block).clamp(max=length) - starts


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and a.dtype == b.dtype
                      and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def _take_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x [B, heads, L, d]`` with its tokens in ``order [B, L]`` (differentiable gather)."""
    index = order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return x.gather(2, index)


# --- backends --------------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
          kv_ids: torch.Tensor, mode: Mode, scale: float | None,
          layout: ObjectLayout | None) -> torch.Tensor:
    del layout  # dense: the mask needs no sorting
    allowed = allowed_mask(q_ids, kv_ids, mode)  # [B, N, M] bool
    if mode == "self" and q_ids is kv_ids:
        # Every token sees at least itself: no empty row, skip the extra N x M passes.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    nonempty = allowed.any(dim=-1)  # [B, N]
    # Fully masked rows: allow everything (finite softmax, finite gradients), zero later.
    allowed = allowed | ~nonempty[:, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    return out * nonempty[:, None, :, None].to(out.dtype)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
             kv_ids: torch.Tensor, mode: Mode, scale: float | None,
             layout: ObjectLayout | None) -> torch.Tensor:
    layout = layout or _call_layout(q_ids, kv_ids, mode)
    q_side, kv_side = layout.sorted("tokens"), layout.kv_sorted(mode)
    b, h, n, _ = q.shape
    # Rows of every sample side by side; rows without an allowed key stay 0.
    out = q.new_zeros(h, b * n, v.shape[-1])
    for i, (q_spans, kv_spans) in enumerate(zip(q_side.spans(), kv_side.spans(), strict=True)):
        q_order, kv_order = q_side.order[i], kv_side.order[i]
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
def _flex_fn() -> Any:
    """Compiled ``flex_attention``, or None where this torch lacks it."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # pragma: no cover - torch without FlexAttention
        return None
    # Default (automatic) dynamic shapes: token and local-text lengths change between
    # batches, and a static compile per length would hit the recompile limit.
    return torch.compile(flex_attention)


def flex_available(device: torch.device | str, *, requires_grad: bool = False) -> bool:
    """Whether the ``flex`` backend runs here: CUDA (forward and backward), CPU forward only."""
    device = torch.device(device)
    if _flex_fn() is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and not requires_grad


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ids: torch.Tensor,
          kv_ids: torch.Tensor, mode: Mode, scale: float | None,
          layout: ObjectLayout | None) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not flex_available(q.device, requires_grad=needs_grad):
        raise RuntimeError(f"flex backend unavailable on {q.device} (requires_grad="
                           f"{needs_grad}); torch {torch.__version__} has no FlexAttention "
                           "backward on CPU - use backend='sdpa' or 'auto'")
    layout = layout or _call_layout(q_ids, kv_ids, mode)
    q_order = layout.sorted("tokens")
    kv_order = layout.kv_sorted(mode)
    qs = _take_tokens(q, q_order.order)
    ks, vs = _take_tokens(k, kv_order.order), _take_tokens(v, kv_order.order)
    out = _flex_fn()(qs, ks, vs, block_mask=layout.block_mask(mode), scale=scale)
    return _take_tokens(out, q_order.inverse)


def _call_layout(q_ids: torch.Tensor, kv_ids: torch.Tensor, mode: Mode) -> ObjectLayout:
    """A one-off layout for a call made without one."""
    if mode == "self" and kv_ids is q_ids:
        return ObjectLayout(q_ids)
    return ObjectLayout(q_ids, kv_ids, self_context=mode == "self")


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
    scale: float | None = None, layout: ObjectLayout | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + log M) v`` with ``M`` given by object ids (module docstring).

    q ``[B, heads, N, d]``, k/v ``[B, heads, M, d]``, q_ids ``[B, N]`` and kv_ids ``[B, M]``
    long (-1 = no object). ``mode="self"``: ``q_ids[i] == kv_ids[j]`` (background is one
    group); ``mode="cross"``: ``q_ids[i] == kv_ids[j] >= 0``; queries without an allowed key
    get exactly 0. ``scale`` defaults to ``1/sqrt(d)``. ``layout``: the forward's
    :class:`ObjectLayout` built from these ids (``layout.token_ids`` / ``layout.kv_ids(mode)``),
    so the sort and the block mask are shared by every layer; without one, the flex and
    grouped backends build their own for this call. Returns ``[B, heads, N, d_v]``.
    """
    _check(q, k, v, q_ids, kv_ids, mode)
    if backend == "auto":
        backend = choose_backend(q, k, mode)
    if backend not in _IMPLS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if layout is not None:
        layout.check(q_ids, kv_ids, mode)
        if layout.device != q.device:
            raise ValueError(f"the layout's ids are on {layout.device} but q is on {q.device}; "
                             "build the layout from ids on q's device")
        if q_ids.dtype != torch.long or kv_ids.dtype != torch.long:
            raise ValueError("a layout needs long ids (build it from ids.long())")
        return _IMPLS[backend](q, k, v, q_ids, kv_ids, mode, scale, layout)
    same = kv_ids is q_ids  # self-attention over the same tokens: no row can be empty
    q_ids = q_ids.to(device=q.device, dtype=torch.long)
    kv_ids = q_ids if same else kv_ids.to(device=q.device, dtype=torch.long)
    return _IMPLS[backend](q, k, v, q_ids, kv_ids, mode, scale, None)


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
        """Default init for q/k/v, zeros for the output projection (start as a no-op).
        Through ``Module.apply``, one module's own parameters at a time: DeepSpeed's
        ``zero.Init`` has partitioned the children by now and gathers them per module only
        inside ``apply`` (a direct ``zeros_`` would silently do nothing)."""
        self.apply(self._reset_module)

    def _reset_module(self, module: nn.Module) -> None:
        if module is self.to_out:
            nn.init.zeros_(module.weight)
        elif module in (self.to_q, self.to_k, self.to_v) or isinstance(module, nn.RMSNorm):
            module.reset_parameters()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor,
                context: torch.Tensor | None = None,
                context_ids: torch.Tensor | None = None, *,
                layout: ObjectLayout | None = None) -> torch.Tensor:
        """x ``[B, N, D]``, token_ids ``[B, N]`` (or ``[B, T', H', W']``, flattened in that
        order) -> ``[B, N, D]``. Cross mode needs ``context [B, M, Dc]`` and
        ``context_ids [B, M]``. ``layout``: the forward's :class:`ObjectLayout` built from these
        very ids (``layout.token_ids``, ``layout.context_ids``), shared by all masked layers."""
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
        # The module-level name is looked up per call: training/plan.py swaps it to account
        # for activations on the meta device.
        out = masked_attention(q, k, v, token_ids, context_ids, mode=self.mode,
                               backend=self.backend, layout=layout)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.dim))
