"""Masked attention: every backend against the float64 definition, and the added layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import _ordered_to_dense
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ttm_ray.conditioning.masked_attention import (
    MaskedAttention,
    ObjectLayout,
    allowed_mask,
    block_structure,
    choose_backend,
    flex_available,
    masked_attention,
    masked_attention_reference,
)

CPU_BACKENDS = ["sdpa", "grouped"]


def make_ids(gen: torch.Generator, b: int, n: int, objects: int) -> torch.Tensor:
    """Per-sample random layouts over ids -1..objects-1; sample 1 is background only."""
    ids = torch.randint(-1, objects, (b, n), generator=gen)
    if b > 1:
        ids[1] = -1
    return ids


def make_case(seed: int, mode: str, objects: int, *, b: int = 3, heads: int = 2, n: int = 24,
              m: int = 10, d: int = 8, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q_ids = make_ids(gen, b, n, objects)
    if mode == "self":
        k_len, kv_ids = n, q_ids
    else:
        # Local text: ids 0..objects (id `objects` has no token in the video: an empty object),
        # -1 padding, and object 0's text is missing in sample 0 (those tokens get 0).
        k_len = m
        kv_ids = torch.randint(-1, objects + 1, (b, m), generator=gen)
        kv_ids[0][kv_ids[0] == 0] = -1
    # An id present among queries only (an object without text / an empty group).
    q_ids[0, 0] = objects + 5
    if mode == "self":
        kv_ids = q_ids
    q = torch.randn(b, heads, n, d, generator=gen, dtype=dtype)
    k = torch.randn(b, heads, k_len, d, generator=gen, dtype=dtype)
    v = torch.randn(b, heads, k_len, d, generator=gen, dtype=dtype)
    return q, k, v, q_ids, kv_ids


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["self", "cross"])
@pytest.mark.parametrize("objects", [1, 2, 3, 4])
def test_forward_matches_reference(backend: str, mode: str, objects: int) -> None:
    q, k, v, q_ids, kv_ids = make_case(objects, mode, objects)
    ref = masked_attention_reference(q, k, v, q_ids, kv_ids, mode=mode)
    out = masked_attention(q, k, v, q_ids, kv_ids, mode=mode, backend=backend)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_gradients_match_reference_float64(backend: str, mode: str) -> None:
    q, k, v, q_ids, kv_ids = make_case(7, mode, 3, dtype=torch.float64)
    upstream = torch.randn((*q.shape[:3], v.shape[-1]), dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (masked_attention_reference, masked_attention):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        kwargs = {} if fn is masked_attention_reference else {"backend": backend}
        out = fn(*leaves, q_ids, kv_ids, mode=mode, **kwargs)
        (out * upstream).sum().backward()
        grads.append([t.grad for t in leaves])
    for ref, got in zip(*grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_with_separate_key_ids_and_missing_groups(backend: str) -> None:
    """Self mode over a different key set (not the same tensor): a query whose group has no
    key, background included, gets 0 like in cross mode."""
    q, k, v, q_ids, _ = make_case(8, "self", 3, dtype=torch.float64)
    kv_ids = q_ids.clone()
    kv_ids[kv_ids == 1] = 2   # group 1 loses its keys
    kv_ids[2][kv_ids[2] == -1] = 0  # sample 2: background loses its keys
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = masked_attention(*leaves, q_ids, kv_ids, mode="self", backend=backend)
    ref = masked_attention_reference(q, k, v, q_ids, kv_ids, mode="self")
    torch.testing.assert_close(out, ref)
    assert (out.transpose(1, 2)[q_ids == 1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_cross_with_empty_rows(backend: str) -> None:
    q, k, v, q_ids, kv_ids = make_case(3, "cross", 2, b=2, n=6, m=5, d=3, dtype=torch.float64)
    leaves = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b_, c: masked_attention(a, b_, c, q_ids, kv_ids, mode="cross",
                                          backend=backend), leaves, fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_object_tokens_get_exact_zero_in_cross(backend: str) -> None:
    q, k, v, q_ids, kv_ids = make_case(11, "cross", 2)
    q.requires_grad_(True)
    out = masked_attention(q, k, v, q_ids, kv_ids, mode="cross", backend=backend)
    empty = ~allowed_mask(q_ids, kv_ids, "cross").any(-1)  # [B, N]
    assert empty[0, 0] and empty[1].all()  # the text-less id, the background sample
    assert (out.transpose(1, 2)[empty] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert (q.grad.transpose(1, 2)[empty] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_attention_isolates_objects(backend: str) -> None:
    """Changing object 1's values leaves every other token's output untouched, and
    background attends within background (it is a group, not 'nothing')."""
    q, k, v, q_ids, _ = make_case(5, "self", 3)
    out = masked_attention(q, k, v, q_ids, q_ids, mode="self", backend=backend)
    v2 = v.clone()
    v2[(q_ids == 1)[:, None, :, None].expand_as(v2)] += 10.0
    out2 = masked_attention(q, k, v2, q_ids, q_ids, mode="self", backend=backend)
    other = (q_ids != 1)[:, None, :, None].expand_as(out)
    assert torch.equal(out[other], out2[other])
    assert not torch.allclose(out[~other], out2[~other])
    assert out[1].abs().sum() > 0  # background-only sample: non-zero self-attention


def test_single_group_equals_unmasked_attention() -> None:
    q, k, v, _, _ = make_case(2, "self", 1)
    ids = torch.zeros(q.shape[0], q.shape[2], dtype=torch.long)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for backend in CPU_BACKENDS:
        torch.testing.assert_close(
            masked_attention(q, k, v, ids, ids, mode="self", backend=backend), plain)


def test_auto_and_flex_availability_on_cpu() -> None:
    q, k, v, q_ids, kv_ids = make_case(0, "self", 2)
    assert choose_backend(q, k, "self") == "sdpa"
    assert choose_backend(torch.empty(1, 1, 1024, 1), torch.empty(1, 1, 1024, 1),
                          "self") == "sdpa"  # small: no host-side grouping
    big = torch.empty(1, 1, 4096, 1)
    assert choose_backend(big, big, "self") == "grouped"  # large CPU self-attention
    assert choose_backend(big, big[:, :, :64], "cross") == "sdpa"
    torch.testing.assert_close(
        masked_attention(q, k, v, q_ids, kv_ids, mode="self"),
        masked_attention(q, k, v, q_ids, kv_ids, mode="self", backend="sdpa"))
    assert not flex_available("cpu", requires_grad=True)
    with pytest.raises(RuntimeError, match="no FlexAttention backward on CPU"):
        masked_attention(q.requires_grad_(True), k, v, q_ids, kv_ids, mode="self",
                         backend="flex")


def test_rejects_bad_arguments() -> None:
    q, k, v, q_ids, kv_ids = make_case(0, "self", 2)
    with pytest.raises(ValueError, match="mode"):
        masked_attention(q, k, v, q_ids, kv_ids, mode="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        masked_attention(q, k, v, q_ids, kv_ids, mode="self", backend="dense")  # type: ignore
    with pytest.raises(ValueError, match="q_ids"):
        masked_attention(q, k, v, q_ids[:, :-1], kv_ids, mode="self")
    with pytest.raises(ValueError, match="integer"):
        masked_attention(q, k, v, q_ids.float(), kv_ids, mode="self")


@pytest.mark.slow
def test_flex_forward_on_cpu_matches_reference() -> None:
    """CPU flex: forward only (compiles once, ~1 min on 2 cores). 300 tokens = 3 blocks, one
    of them ragged; a shared layout for self and cross, and one-off layouts without it."""
    q, k, v, q_ids, _ = make_case(4, "self", 3, n=300, d=16)
    _, ck, cv, _, ctx_ids = make_case(4, "cross", 3, n=300, m=150, d=16)
    layout = ObjectLayout(q_ids, ctx_ids)
    for mode, (kk, vv, kv_ids) in (("self", (k, v, q_ids)), ("cross", (ck, cv, ctx_ids))):
        ref = masked_attention_reference(q, kk, vv, q_ids, kv_ids, mode=mode)
        for lay in (layout, None):
            with torch.no_grad():
                out = masked_attention(q, kk, vv, q_ids, kv_ids, mode=mode, backend="flex",
                                       layout=lay)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert layout.builds == {"sort_tokens": 1, "sort_context": 1, "block_mask_self": 1,
                             "block_mask_cross": 1}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex", "grouped"])
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_cuda_backends_forward_backward(backend: str, mode: str) -> None:
    q, k, v, q_ids, kv_ids = make_case(9, mode, 3, n=256, m=64, d=64)
    q, k, v, q_ids, kv_ids = (t.cuda() for t in (q, k, v, q_ids, kv_ids))
    upstream = torch.randn(q.shape, device="cuda")
    results = []
    for fn in (masked_attention_reference, masked_attention):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        kwargs = {} if fn is masked_attention_reference else {"backend": backend}
        out = fn(*leaves, q_ids, kv_ids, mode=mode, **kwargs)
        (out * upstream).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


# --- the layout (one mask plan per forward) --------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_layout_path_matches_reference_forward_and_backward(backend: str, mode: str) -> None:
    """One layout shared by several calls (as the K masked layers share it) gives the
    reference's values and float64 gradients, empty rows exactly 0, and is built once."""
    q, k, v, q_ids, kv_ids = make_case(12, mode, 3, dtype=torch.float64)
    layout = ObjectLayout(q_ids, None if mode == "self" else kv_ids)
    kv_ids = layout.kv_ids(mode)
    upstream = torch.randn(q.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = masked_attention_reference(*ref_leaves, q_ids, kv_ids, mode=mode)
    (ref * upstream).sum().backward()
    for _ in range(3):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = masked_attention(*leaves, q_ids, kv_ids, mode=mode, backend=backend, layout=layout)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
        (out * upstream).sum().backward()
        for got, want in zip(leaves, ref_leaves, strict=True):
            torch.testing.assert_close(got.grad, want.grad, atol=1e-10, rtol=1e-8)
    empty = ~allowed_mask(q_ids, kv_ids, mode).any(-1)
    assert (out.transpose(1, 2)[empty] == 0).all()
    assert mode == "self" or empty.any()
    # Built once for all calls; the dense sdpa backend never needs the sort.
    sorts = {} if backend == "sdpa" else \
        {"sort_tokens": 1} | ({"sort_context": 1} if mode == "cross" else {})
    assert layout.builds == sorts


def _dense(num: torch.Tensor, indices: torch.Tensor, cols: int) -> torch.Tensor:
    return _ordered_to_dense(num, indices, cols)[:, 0].bool()


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_block_mask_lists_exactly_the_blocks_that_can_match(block: int, mode: str) -> None:
    """The BlockMask's lists (forward and the transposed backward ones) equal
    ``block_structure``: every block holding an allowed pair is listed, full blocks hold only
    allowed pairs (ragged tail blocks are never full), listed indices ascend."""
    gen = torch.Generator().manual_seed(block)
    for trial in range(8):
        b, n = 3, int(torch.randint(1, 90, (1,), generator=gen))
        m = n if mode == "self" else int(torch.randint(1, 40, (1,), generator=gen))
        objects = 1 + trial % 4
        q_ids = torch.randint(-1, objects, (b, n), generator=gen)
        q_ids[1] = -1
        kv_ids = q_ids if mode == "self" else torch.randint(-1, objects + 1, (b, m),
                                                            generator=gen)
        layout = ObjectLayout(q_ids, None if mode == "self" else kv_ids, block_size=block)
        q_sorted, kv_sorted = layout.sorted("tokens"), layout.kv_sorted(mode)
        assert torch.equal(q_sorted.ids, q_ids.gather(1, q_sorted.order))
        assert torch.equal(q_sorted.ids.gather(1, q_sorted.inverse), q_ids)
        allowed = allowed_mask(q_sorted.ids, kv_sorted.ids, mode)
        nq, nk = -(-n // block), -(-m // block)
        padded = torch.zeros(b, nq * block, nk * block, dtype=torch.bool)
        padded[:, :n, :m] = allowed
        valid = torch.zeros_like(padded)
        valid[:, :n, :m] = True
        tiles = padded.view(b, nq, block, nk, block)
        any_allowed = tiles.any(4).any(2)
        all_allowed = (tiles | ~valid.view(b, nq, block, nk, block)).all(4).all(2)
        partial, full = layout.blocks(mode)
        assert not (partial & full).any()
        assert ((partial | full) >= any_allowed).all(), "a block with allowed pairs is skipped"
        assert (full <= all_allowed).all(), "a full block holds a masked pair"
        mask = layout.block_mask(mode)
        assert torch.equal(_dense(mask.kv_num_blocks, mask.kv_indices, nk), partial)
        assert torch.equal(_dense(mask.full_kv_num_blocks, mask.full_kv_indices, nk), full)
        assert torch.equal(_dense(mask.q_num_blocks, mask.q_indices, nq), partial.mT)
        assert torch.equal(_dense(mask.full_q_num_blocks, mask.full_q_indices, nq), full.mT)
        for num, idx in ((mask.kv_num_blocks, mask.kv_indices),
                         (mask.full_kv_num_blocks, mask.full_kv_indices)):
            steps = idx[..., 1:] - idx[..., :-1]
            listed = torch.arange(1, idx.shape[-1]) < num[..., None]
            assert (steps[listed] > 0).all()
        assert mask.seq_lengths == (n, m)
    assert block_structure(q_sorted.keys, kv_sorted.keys, block)[0].shape == (b, nq, nk)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op creates (the real ops still run)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_block_mask_never_allocates_n_by_m() -> None:
    """The U-Net level-0 size (16 x 64 x 64 = 65,536 tokens): building the layout and both
    block masks creates no tensor bigger than per-token or per-block-pair, and the mask's
    tensors are O(blocks^2) (a dense [B, 1, N, N] bool mask would be 4 GiB)."""
    from ttm_ray.models.flops import representative_local_ids, representative_object_ids

    ids = representative_object_ids((16, 64, 64)).flatten(1)
    local = representative_local_ids(64)
    n, m = ids.shape[1], local.shape[1]
    blocks = n // 128
    with _LargestTensor() as spy:
        layout = ObjectLayout(ids, local)
        masks = [layout.block_mask(mode) for mode in ("self", "cross")]
    assert spy.largest <= max(n, blocks * (blocks + 1)), spy.largest
    assert spy.largest * 1000 < n * n
    for mask in masks:
        for t in mask.as_tuple():
            if isinstance(t, torch.Tensor):
                assert t.numel() <= blocks * blocks
    # Same-object tokens are contiguous after the sort: self-attention computes the blocks of
    # sum_l n_l^2 pairs (block-aligned here: exactly), cross only the object tokens' rows.
    counts = torch.unique(ids, return_counts=True)[1]
    assert int(layout.computed_pairs("self")[0]) == int(counts.square().sum())
    assert int(layout.computed_pairs("cross")[0]) == int((ids >= 0).sum()) * m


def test_layout_misuse_is_a_clear_error() -> None:
    q, k, v, q_ids, kv_ids = make_case(0, "cross", 2)
    layout = ObjectLayout(q_ids, kv_ids)
    with pytest.raises(ValueError, match="built from other ids"):
        masked_attention(q, k, v, q_ids.clone(), kv_ids, mode="cross", layout=layout)
    with pytest.raises(ValueError, match="no context_ids"):
        masked_attention(q, k, v, q_ids, kv_ids, mode="cross", layout=ObjectLayout(q_ids))
    with pytest.raises(ValueError, match="token_ids must be"):
        ObjectLayout(q_ids[0])
    with pytest.raises(ValueError, match="integer"):
        ObjectLayout(q_ids.float())
    with pytest.raises(ValueError, match="context_ids must be"):
        ObjectLayout(q_ids, kv_ids[:1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["self", "cross"])
def test_cuda_flex_with_shared_layout_forward_backward(mode: str) -> None:
    """CUDA flex through one shared layout (ragged blocks: 600 tokens, 150 text tokens):
    values and gradients of the reference, empty rows 0, the layout built once."""
    q, k, v, q_ids, kv_ids = make_case(13, mode, 3, n=600, m=150, d=64)
    q, k, v, q_ids, kv_ids = (t.cuda() for t in (q, k, v, q_ids, kv_ids))
    layout = ObjectLayout(q_ids, None if mode == "self" else kv_ids)
    kv_ids = layout.kv_ids(mode)
    upstream = torch.randn(q.shape, device="cuda")
    results = []
    for fn in (masked_attention_reference, masked_attention, masked_attention):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        kwargs = {} if fn is masked_attention_reference else {"backend": "flex",
                                                               "layout": layout}
        out = fn(*leaves, q_ids, kv_ids, mode=mode, **kwargs)
        (out * upstream).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for got in results[1:]:
        for want, have in zip(results[0], got, strict=True):
            torch.testing.assert_close(have, want, atol=2e-3, rtol=2e-3)
    empty = ~allowed_mask(q_ids, kv_ids, mode).any(-1)
    assert (results[1][0].transpose(1, 2)[empty] == 0).all()
    assert all(count == 1 for count in layout.builds.values())


# --- the module --------------------------------------------------------------------------


def module_inputs(seed: int = 0, b: int = 2, n: int = 12, m: int = 7, dim: int = 32,
                  context_dim: int = 24):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=gen)
    ids = torch.randint(-1, 3, (b, n), generator=gen)
    ctx = torch.randn(b, m, context_dim, generator=gen)
    ctx_ids = torch.randint(-1, 3, (b, m), generator=gen)
    return x, ids, ctx, ctx_ids


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_module_zero_at_init_then_gradients_reach_qkv(mode: str) -> None:
    torch.manual_seed(0)
    x, ids, ctx, ctx_ids = module_inputs()
    layer = MaskedAttention(32, 4, mode=mode, context_dim=24 if mode == "cross" else None)
    args = (x, ids) if mode == "self" else (x, ids, ctx, ctx_ids)
    out = layer(*args)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()  # zero output projection: nothing upstream learns yet
    assert layer.to_out.weight.grad.abs().sum() > 0
    assert layer.to_q.weight.grad.abs().sum() == 0
    layer.zero_grad()
    with torch.no_grad():
        layer.to_out.weight.normal_()
    (layer(*args) * upstream).sum().backward()
    for lin in (layer.to_q, layer.to_k, layer.to_v, layer.to_out):
        assert lin.weight.grad.abs().sum() > 0
    assert layer.norm_q.weight.grad.abs().sum() > 0


def test_module_matches_reference_composition_and_counts_parameters() -> None:
    torch.manual_seed(1)
    x, ids, ctx, ctx_ids = module_inputs()
    layer = MaskedAttention(32, 4, mode="cross", context_dim=24, qk_norm=False)
    with torch.no_grad():
        layer.to_out.weight.normal_()
        heads = lambda t: t.view(t.shape[0], t.shape[1], 4, 8).transpose(1, 2)  # noqa: E731
        ref = masked_attention_reference(heads(layer.to_q(x)), heads(layer.to_k(ctx)),
                                         heads(layer.to_v(ctx)), ids, ctx_ids, mode="cross")
        ref = layer.to_out(ref.transpose(1, 2).reshape(2, 12, 32))
        torch.testing.assert_close(layer(x, ids, ctx, ctx_ids), ref, atol=1e-5, rtol=1e-5)
        # A token with no object gets exactly zero from the masked cross layer.
        assert (layer(x, ids, ctx, ctx_ids)[ids < 0] == 0).all()
    d, hd = 2560, 128  # dit-4b: 4 D^2 + 2 d per added layer (see models/dit/config.py)
    with torch.device("meta"):
        for mode in ("self", "cross"):
            kw = {"context_dim": d} if mode == "cross" else {}
            n = sum(p.numel() for p in MaskedAttention(d, 20, mode=mode, **kw).parameters())
            assert n == 4 * d * d + 2 * hd


def test_module_accepts_grid_ids_and_rejects_misuse() -> None:
    x, ids, ctx, ctx_ids = module_inputs(n=8)
    layer = MaskedAttention(32, 4, mode="self")
    with torch.no_grad():
        layer.to_out.weight.normal_()
        torch.testing.assert_close(layer(x, ids.view(2, 2, 2, 2)), layer(x, ids))
    with pytest.raises(ValueError, match="no context"):
        layer(x, ids, ctx, ctx_ids)
    with pytest.raises(ValueError, match="tokens per sample"):
        layer(x, ids[:, :4])
    cross = MaskedAttention(32, 4, mode="cross", context_dim=24)
    with pytest.raises(ValueError, match="needs context"):
        cross(x, ids)
    with pytest.raises(ValueError, match="divisible"):
        MaskedAttention(30, 4, mode="self")
