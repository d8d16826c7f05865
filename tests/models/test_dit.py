"""The MovieGen-style DiT: paper-size parameter counts (meta device), shapes and errors, the
stage-2 additions (zero-init equivalence, gradient flow, masked cross-attention binding),
activation checkpointing, and a CPU training step of ``dit-tiny``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.conditioning.masked_attention import ObjectLayout
from ttm_ray.models import ModelConfig, build_model, count_parameters, resolve_family_config
from ttm_ray.models.dit import DIT_SIZES, TTMDiT
from ttm_ray.models.dit import config as dit_config_module

LATENT = 4  # latent channels of the tiny runs
TEXT_DIM = DIT_SIZES["dit-tiny"].text_dim


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box their
    spin-waiting makes a 10 ms forward take a second; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(stage: int = 1, grid: tuple[int, int, int] = (3, 4, 6), **kw) -> ModelConfig:
    t, h, w = grid
    return ModelConfig(family="dit", size="dit-tiny", stage=stage, latent_channels=LATENT,
                       num_frames=t, height=h, width=w, **kw)


def build(cfg: ModelConfig, seed: int = 0) -> TTMDiT:
    torch.manual_seed(seed)
    model = build_model(cfg)
    assert isinstance(model, TTMDiT)
    return model


def perturb(model: torch.nn.Module, seed: int = 1, std: float = 0.05,
            only: str | None = None) -> None:
    """Add noise to every parameter (or those whose name contains ``only``): a freshly
    initialised DiT predicts exactly 0 (adaLN-Zero), which would make equality tests vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=gen) * std)


def object_ids(batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Token object ids: object 0 in the top-left block, object 1 in the bottom-right block,
    background (-1) elsewhere; the second sample swaps the objects."""
    t, h, w = grid
    ids = torch.full((batch, t, h, w), -1, dtype=torch.long)
    ids[:, :, : h // 2, : w // 2] = 0
    ids[:, :, h // 2:, w // 2 + 1:] = 1
    if batch > 1:
        ids[1] = torch.where(ids[1] >= 0, 1 - ids[1], ids[1])
    return ids


def make_inputs(model: TTMDiT, batch: int = 2, latent: tuple[int, int, int] = (3, 4, 6),
                local: bool = True, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, ModelConditioning]:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x_t = torch.randn(batch, cfg.in_channels, *latent, generator=gen)
    visual = torch.randn(batch, cfg.visual_channels, *latent, generator=gen)
    text = torch.randn(batch, 5, cfg.text_dim, generator=gen)
    text_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:batch]
    cond = ModelConditioning(visual=visual, text=text, text_mask=text_mask)
    if local:
        # Two objects with 3 local-prompt tokens each, then 2 pad tokens.
        cond = cond.replace(
            local_text=torch.randn(batch, 8, cfg.text_dim, generator=gen),
            local_text_ids=torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]] * batch),
            token_ids=object_ids(batch, model.token_grid(*latent)),
        )
    t = torch.rand(batch, generator=gen)
    return x_t, t, cond


# --------------------------------------------------------------------------- sizes


def _block_formula(d: int, f: int, head_dim: int) -> dict[str, int]:
    """Per-block parameters of the base block (no biases; q/k RMSNorm per head)."""
    return {
        "self_attn": 4 * d * d + 2 * head_dim,
        "cross_attn": 4 * d * d + 2 * head_dim + d,  # + its RMSNorm
        "ffn": 3 * d * f,
        "adaln": 6 * d,  # adaLN-single: the block's learnable table
    }


def _masked_formula(d: int, head_dim: int) -> int:
    """Per-block parameters of the stage-2 additions: masked self- and masked
    cross-attention (context already at width D), q/k RMSNorm each, plus their two
    input RMSNorms."""
    return 2 * (4 * d * d + 2 * head_dim) + 2 * d


def test_dit_4b_parameter_counts_on_meta() -> None:
    counts = {}
    for stage in (1, 2):
        model = build_model(ModelConfig(family="dit", size="dit-4b", stage=stage), device="meta")
        assert all(p.is_meta for p in model.parameters())
        counts[stage] = count_parameters(model)
    cfg = resolve_family_config(ModelConfig(family="dit", size="dit-4b", stage=2))
    d, k, head_dim = cfg.dim, cfg.masked_blocks, cfg.head_dim
    assert (cfg.depth, k, cfg.patch) == (40, 10, (1, 2, 2))

    one, two = counts[1], counts[2]
    assert 3.8e9 <= one["total"] <= 4.2e9, f"dit-4b stage 1 has {one['total']:,} parameters"
    assert "masked_layers" not in one
    # Stage 2 = stage 1 + exactly the masked layers of the first K blocks.
    assert two["total"] - one["total"] == k * _masked_formula(d, head_dim)
    assert two["masked_layers"] == k * _masked_formula(d, head_dim)
    assert {n: c for n, c in two.items() if n not in ("masked_layers", "total")} == \
        {n: c for n, c in one.items() if n != "total"}

    # The breakdown is complete and each block component matches its formula.
    for c in counts.values():
        assert sum(v for n, v in c.items() if n != "total") == c["total"]
    for name, per_block in _block_formula(d, cfg.hidden, head_dim).items():
        assert one[f"blocks.{name}"] == cfg.depth * per_block, name
    t, h, w = cfg.max_t_tokens, cfg.max_h_tokens, cfg.max_w_tokens
    assert one["pos_embed"] == (t + h + w) * d
    assert one["patchify"] == (cfg.in_channels + cfg.visual_channels) * cfg.patch_volume * d + d

    # The config docstring states both totals; keep it honest.
    doc = dit_config_module.__doc__ or ""
    for total in (one["total"], two["total"]):
        assert f"{total:,}" in doc, f"config.py docstring lacks {total:,}"
    per_block = re.search(r"([\d,]+) per block", doc)
    assert per_block and int(per_block.group(1).replace(",", "")) == _masked_formula(d, head_dim)


def test_dit_tiny_is_tiny_and_stage2_adds_only_masked_layers() -> None:
    one = count_parameters(build_model(tiny(1), device="meta"))
    two = count_parameters(build_model(tiny(2), device="meta"))
    cfg = resolve_family_config(tiny(2))
    assert one["total"] < 2_000_000
    assert two["total"] - one["total"] == cfg.masked_blocks * _masked_formula(cfg.dim,
                                                                             cfg.head_dim)


# --------------------------------------------------------------------------- shapes, errors


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("latent", [(3, 4, 6), (1, 2, 2), (5, 6, 2), (2, 10, 4)])
def test_forward_shapes(stage: int, latent: tuple[int, int, int]) -> None:
    model = build(tiny(stage, grid=latent))
    perturb(model)
    x_t, t, cond = make_inputs(model, latent=latent, local=stage == 2)
    with torch.no_grad():
        out = model(x_t, t, cond)
    assert out.shape == x_t.shape
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


@pytest.mark.parametrize("overrides", [{}, {"adaln": "per_block"}, {"patch": [2, 2, 2]},
                                       {"patch": [1, 1, 1], "qk_norm": False}])
def test_variants_start_at_zero_and_train(overrides: dict) -> None:
    """adaLN-Zero: a fresh model predicts exactly 0 (every variant), yet one backward
    reaches the output layer."""
    latent = (2, 4, 6)
    model = build(tiny(2, grid=latent, overrides=overrides))
    x_t, t, cond = make_inputs(model, latent=latent, local=True)
    out = model(x_t, t, cond)
    assert out.shape == x_t.shape
    assert torch.all(out == 0)
    (out - x_t).square().mean().backward()
    assert model.final.linear.weight.grad.abs().sum() > 0


def test_forward_scalar_t_and_smaller_grid_than_tables() -> None:
    model = build(tiny(2, grid=(4, 8, 8)))
    x_t, _, cond = make_inputs(model, latent=(3, 4, 6))
    out = model(x_t, torch.tensor(0.3), cond)
    assert out.shape == x_t.shape


def test_clear_input_errors() -> None:
    model = build(tiny(2))
    x_t, t, cond = make_inputs(model)
    cfg = model.config
    with pytest.raises(ValueError, match=f"x_t has {LATENT + 1} channels"):
        model(torch.randn(2, LATENT + 1, 3, 4, 6), t, cond)
    with pytest.raises(ValueError, match=r"cond\.visual"):
        model(x_t, t, cond.replace(visual=cond.visual[:, :-1]))
    with pytest.raises(ValueError, match="not divisible by patch"):
        odd = torch.randn(2, LATENT, 3, 5, 6)
        model(odd, t, cond.replace(visual=torch.randn(2, cfg.visual_channels, 3, 5, 6)))
    with pytest.raises(ValueError, match=r"token_ids .*expected \[2, 3, 2, 3\]"):
        # The latent grid instead of the token grid: the classic off-by-patch mistake.
        model(x_t, t, cond.replace(token_ids=torch.zeros(2, 3, 4, 6, dtype=torch.long)))
    with pytest.raises(ValueError, match="text_dim"):
        model(x_t, t, cond.replace(text=torch.randn(2, 5, TEXT_DIM + 1)))
    with pytest.raises(ValueError, match="local_text_ids"):
        model(x_t, t, cond.replace(local_text_ids=None))
    with pytest.raises(ValueError, match="t must be"):
        model(x_t, torch.rand(3), cond)
    big = (3, 2 * cfg.max_h_tokens + 2, 6)
    with pytest.raises(ValueError, match="exceeds the positional tables"):
        model(torch.randn(1, LATENT, *big),
              t[:1], ModelConditioning(visual=torch.randn(1, cfg.visual_channels, *big),
                                       text=cond.text[:1]))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"height 5 .*not divisible by patch"):
        resolve_family_config(tiny(1, grid=(3, 5, 6)))
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        resolve_family_config(tiny(1, overrides={"widht": 3}))
    with pytest.raises(ValueError, match="masked_attention_blocks 9 exceeds depth"):
        resolve_family_config(tiny(2, masked_attention_blocks=9))
    with pytest.raises(ValueError, match="not divisible by heads"):
        resolve_family_config(tiny(1, overrides={"heads": 3}))
    cfg = resolve_family_config(tiny(2, overrides={"depth": 3}, masked_attention_blocks=1))
    assert (cfg.depth, cfg.masked_blocks) == (3, 1)
    assert resolve_family_config(tiny(1)).masked_blocks == 0
    # A larger grid grows the tables; a smaller one keeps the size's own (checkpoint-stable).
    assert resolve_family_config(tiny(1, grid=(40, 4, 6))).max_t_tokens == 40
    assert resolve_family_config(tiny(1, grid=(2, 4, 6))).max_t_tokens == \
        DIT_SIZES["dit-tiny"].max_t_tokens


# --------------------------------------------------------------------------- stage 2 additions


def _masked_layers(model: TTMDiT) -> list[tuple[str, torch.nn.Module]]:
    return [(f"{i}.{kind}", getattr(block, kind)) for i, block in enumerate(model.blocks)
            if block.masked for kind in ("masked_self_attn", "masked_cross_attn")]


def _out_proj(layer: torch.nn.Module) -> torch.nn.Linear:
    return layer.to_out


@pytest.fixture(scope="module")
def stage1_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TTMDiT]:
    """A (perturbed, so non-trivial) stage-1 dit-tiny exported like training does."""
    model = build(tiny(1))
    perturb(model)
    path = tmp_path_factory.mktemp("dit_stage1") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.eval()


def test_stage2_from_stage1_weights_matches_stage1(stage1_weights: tuple[Path, TTMDiT]) -> None:
    path, base = stage1_weights
    # The real loading path: build_model(init_from) accepts only masked_* keys as missing.
    two = build_model(tiny(2, init_from=str(path))).eval()
    missing = two.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.split(".")[2].startswith("masked_") for k in missing)
    assert {k.split(".")[1] for k in missing} == {str(i) for i in range(two.config.masked_blocks)}

    x_t, t, cond = make_inputs(two, local=True)
    with torch.no_grad():
        ref = base(x_t, t, cond)
        assert ref.abs().mean() > 1e-3  # non-trivial output
        torch.testing.assert_close(two(x_t, t, cond), ref, rtol=1e-5, atol=1e-6)
        no_local = cond.replace(local_text=None, local_text_ids=None, token_ids=None)
        torch.testing.assert_close(two(x_t, t, no_local), ref, rtol=1e-5, atol=1e-6)
        ids_only = cond.replace(local_text=None, local_text_ids=None)
        torch.testing.assert_close(two(x_t, t, ids_only), ref, rtol=1e-5, atol=1e-6)


def test_gradients_reach_masked_layers(stage1_weights: tuple[Path, TTMDiT]) -> None:
    path, _ = stage1_weights
    model = build_model(tiny(2, init_from=str(path)))
    x_t, t, cond = make_inputs(model, local=True)
    model(x_t, t, cond).square().mean().backward()
    layers = _masked_layers(model)
    assert len(layers) == 2 * model.config.masked_blocks
    for name, layer in layers:
        out = _out_proj(layer)
        assert torch.all(out.weight == 0), name  # zero-initialised ...
        assert out.weight.grad is not None and out.weight.grad.abs().sum() > 0, name  # ... live
        inner = [p for n, p in layer.named_parameters() if not n.startswith("to_out")]
        # Upstream of a zero projection, nothing moves yet.
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in inner), name

    model.zero_grad(set_to_none=True)
    perturb(model, only="to_out", seed=3)
    model(x_t, t, cond).square().mean().backward()
    for name, layer in layers:
        for pname, p in layer.named_parameters():
            if p.dim() == 2:  # q / k / v / out projections
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"


@pytest.mark.parametrize("backend", ["sdpa", "grouped"])
def test_masked_cross_attention_binds_local_prompt_to_its_object(backend: str) -> None:
    """One block, all of it masked: the masked cross-attention is the only path by which the
    local prompts reach the output, and everything after it is per token. Changing object
    1's prompt must change exactly object 1's tokens (every one of them), nothing else."""
    latent = (2, 8, 8)
    model = build(tiny(2, grid=latent, masked_attention_blocks=1,
                       overrides={"depth": 1, "masked_attention_backend": backend}))
    perturb(model)  # opens the adaLN gates, the final layer and the masked out-projections
    model.eval()
    x_t, t, cond = make_inputs(model, latent=latent, local=True)
    ids = cond.local_text_ids
    changed = cond.local_text.clone()
    changed[ids == 1] += torch.randn_like(changed[ids == 1])
    with torch.no_grad():
        a = model(x_t, t, cond)
        b = model(x_t, t, cond.replace(local_text=changed))
    # Per-token difference on the token grid (patch 1x2x2 -> max over each patch).
    diff = (a - b).abs().amax(dim=1)
    pt, ph, pw = model.config.patch
    diff = torch.nn.functional.max_pool3d(diff, (pt, ph, pw))
    obj1 = cond.token_ids == 1
    assert obj1.any() and (~obj1).any()
    assert (diff[obj1] > 1e-4).all(), "some token of object 1 ignored its prompt"
    assert diff[~obj1].max() < 1e-6, "the prompt of object 1 leaked to other tokens"

    # Without token ids the masked layers are skipped: the same change has no effect at all.
    with torch.no_grad():
        no_ids = cond.replace(token_ids=None)
        torch.testing.assert_close(model(x_t, t, no_ids),
                                   model(x_t, t, no_ids.replace(local_text=changed)))


# --------------------------------------------------------------------------- training


def test_activation_checkpointing_matches_plain(stage1_weights: tuple[Path, TTMDiT]) -> None:
    path, _ = stage1_weights
    plain = build_model(tiny(2, init_from=str(path)))
    ckpt = build_model(tiny(2, init_from=str(path), activation_checkpointing=True))
    perturb(plain, only="masked_", seed=5)
    ckpt.load_state_dict(plain.state_dict())
    assert all(b.checkpointing for b in ckpt.blocks)
    assert not any(b.checkpointing for b in plain.blocks)
    calls = []
    # A pre-hook: recomputation may stop early, before a forward hook would fire.
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))

    x_t, t, cond = make_inputs(plain, local=True)
    losses = []
    for model in (plain, ckpt):
        model.train()
        loss = (model(x_t, t, cond) - x_t).square().mean()
        loss.backward()
        losses.append(loss.detach())
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing is real
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_one_object_layout_per_forward_shared_by_all_masked_layers(
        stage1_weights: tuple[Path, TTMDiT], layouts_made: list[ObjectLayout]) -> None:
    """The forward builds one ObjectLayout; every masked layer of the K blocks and the
    recomputation in backward share it (ids sorted once), and the result equals the dense
    sdpa path (no layout use), forward and gradients."""
    path, _ = stage1_weights
    made = layouts_made
    results = {}
    for backend in ("sdpa", "grouped"):
        model = build(tiny(2, init_from=str(path), activation_checkpointing=True,
                           masked_attention_blocks=2,
                           overrides={"masked_attention_backend": backend}))
        perturb(model, only="masked_", seed=5)
        model.train()
        calls: list[int] = []
        model.blocks[1].masked_self_attn.register_forward_pre_hook(
            lambda *_, seen=calls: seen.append(1))
        x_t, t, cond = make_inputs(model, local=True)
        made.clear()
        out = model(x_t, t, cond)
        (out - x_t).square().mean().backward()
        assert len(calls) == 2  # forward + recomputation
        assert len(made) == 1
        sorts = {} if backend == "sdpa" else {"sort_tokens": 1, "sort_context": 1}
        assert made[0].builds == sorts
        results[backend] = (out.detach(), {n: p.grad for n, p in model.named_parameters()
                                           if p.grad is not None})
    (dense_out, dense_grads), (out, grads) = results["sdpa"], results["grouped"]
    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == dense_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_cpu_training_step_dit_tiny() -> None:
    """A few flow-matching steps on one fixed batch: the loss falls (the model learns)."""
    from ttm_ray.diffusion.flow_matching import flow_matching_loss

    latent = (4, 8, 8)
    model = build(tiny(2, grid=latent))
    model.train()
    x1, _, cond = make_inputs(model, latent=latent, local=True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        loss = flow_matching_loss(model, x1, cond, torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
