"""The AnimateDiff-style U-Net: paper-size parameter count (meta device), shapes per stage,
zero-init equivalence of the stage-2 additions and the widened input, gradient flow, no state
carried between calls, the text mask, activation checkpointing, and loading a pretrained
U-Net + motion adapter from local folders."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.conditioning.masked_attention import ObjectLayout
from ttm_ray.models import ModelConfig, build_model, count_parameters, resolve_family_config
from ttm_ray.models.unet import UNET_SIZES, TTMUNet, UNetConfig, build_unet, unet_config_from
from ttm_ray.models.unet.pretrained import build_motion_unet

LATENT = 4  # SD1.5's latent channels
GRID = (4, 8, 8)  # latent T, H, W of the tiny runs
TINY = UNET_SIZES["unet-tiny"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads on a busy 2-core box; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(stage: int = 2, **kw) -> ModelConfig:
    t, h, w = GRID
    fields = {"num_frames": t, "height": h, "width": w, **kw}
    return ModelConfig(family="unet", size="unet-tiny", stage=stage, latent_channels=LATENT,
                       **fields)


def build(cfg: ModelConfig, seed: int = 0) -> TTMUNet:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    assert isinstance(model, TTMUNet)
    return model


@pytest.fixture(scope="module")
def stage2() -> TTMUNet:
    return build(tiny(2))


def perturb_added(model: TTMUNet, seed: int = 1, std: float = 0.2) -> None:
    """Noise on the stage-2 additions and the widening: zero-initialised, they would make
    every "does it matter" test vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.component_of(name) in ("masked_layers", "conv_in_widening"):
                p.add_(torch.randn(p.shape, generator=gen) * std)


def inputs(model: TTMUNet, batch: int = 2, local: bool = True, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, ModelConditioning]:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x_t = torch.randn(batch, cfg.in_channels, *GRID, generator=gen)
    t = torch.tensor([999, 250][:batch])  # DDIM integer timesteps
    visual = torch.randn(batch, cfg.visual_channels, *GRID, generator=gen)
    text = torch.randn(batch, 6, cfg.text_dim, generator=gen)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])[:batch]
    cond = ModelConditioning(visual=visual, text=text, text_mask=mask)
    if not local:
        return x_t, t, cond
    # Object 0 top-left, object 1 bottom-right (2x2-aligned so the coarser level keeps
    # them), background elsewhere; 3 local-prompt tokens each, then 2 pad tokens.
    ids = torch.full((batch, *GRID), -1, dtype=torch.long)
    ids[:, :, :4, :4] = 0
    ids[:, :, 4:, 4:] = 1
    local_ids = torch.tensor([[0, 0, 0, 1, 1, 1, -1, -1]] * batch)
    return x_t, t, cond.replace(local_text=torch.randn(batch, 8, cfg.text_dim, generator=gen),
                                local_text_ids=local_ids, token_ids=ids)


def base_of(model: TTMUNet) -> UNetMotionModel:
    """The plain diffusers model with ``model``'s weights (no widening, default processors)."""
    base = build_motion_unet(model.config).eval()
    state = {k: v for k, v in model.unet.state_dict().items() if k != "conv_in.visual_weight"}
    base.load_state_dict(state)
    return base


def base_forward(base: UNetMotionModel, x_t: torch.Tensor, t: torch.Tensor,
                 cond: ModelConditioning) -> torch.Tensor:
    text = cond.text.repeat_interleave(x_t.shape[2], dim=0)
    return base(x_t, t, encoder_hidden_states=text, return_dict=False)[0]


# ---------------------------------------------------------------------------- sizes
def test_unet_1_4b_parameter_band_on_meta() -> None:
    """SD1.5 (859.5M) + AnimateDiff V3 motion modules (417.1M) + widening + 6 masked blocks:
    the paper's ~1.4B within 7%; the numbers in ``unet/config.py``'s docstring."""
    sizes = {}
    for stage in (1, 2):
        cfg = ModelConfig(family="unet", size="unet-1.4b", stage=stage, latent_channels=4,
                          num_frames=16, height=64, width=64)
        model = build_model(cfg, device="meta")
        assert all(p.is_meta for p in model.parameters())
        sizes[stage] = count_parameters(model)
    one, two = sizes[1], sizes[2]
    assert one["unet_spatial"] == 859_520_964
    assert one["motion_modules"] == 417_137_600
    assert one["conv_in_widening"] == 320 * 9 * 3 * 3  # 2C+1 condition channels
    assert "masked_layers" not in one
    assert two["masked_layers"] > 30_000_000
    assert 0.93 * 1.4e9 <= two["total"] <= 1.07 * 1.4e9
    assert two["total"] == one["total"] + two["masked_layers"]


def test_tiny_is_a_few_hundred_thousand_parameters() -> None:
    counts = count_parameters(build(tiny(2)))
    assert 100_000 < counts["total"] < 1_000_000
    assert set(counts) == {"unet_spatial", "motion_modules", "conv_in_widening",
                           "masked_layers", "total"}


def test_config_resolution_and_errors() -> None:
    assert resolve_family_config(tiny(1)).masked_blocks == 0
    two = resolve_family_config(tiny(2))
    assert two.masked_blocks == TINY.masked_blocks
    assert two.visual_channels == 2 * LATENT + 1 and two.num_frames == GRID[0]
    assert resolve_family_config(tiny(2, masked_attention_blocks=1)).masked_blocks == 1
    with pytest.raises(ValueError, match="exceeds the 2 encoder transformer blocks"):
        resolve_family_config(tiny(2, masked_attention_blocks=3))
    with pytest.raises(ValueError, match="divisible by 4"):
        resolve_family_config(ModelConfig(family="unet", size="unet-tiny", height=6, width=8))
    with pytest.raises(ValueError, match="unknown UNetConfig"):
        resolve_family_config(tiny(2, overrides={"depth": 3}))
    # Frames beyond the motion modules' positions: the table grows for random init ...
    assert resolve_family_config(tiny(2, num_frames=40)).motion_max_seq_length == 40
    # ... but a size may not be asked for fewer positions than frames.
    with pytest.raises(ValueError, match="motion_max_seq_length"):
        UNetConfig(num_frames=40, motion_max_seq_length=32).validate()


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("stage", [1, 2])
def test_shapes(stage: int) -> None:
    model = build(tiny(stage))
    assert model.has_masked_layers == (stage == 2)
    x_t, t, cond = inputs(model, local=stage == 2)
    with torch.no_grad():
        out = model(x_t, t, cond)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="channels"):
        model(x_t, t, cond.replace(visual=cond.visual[:, :2]))


def test_bad_token_ids_shape_is_a_clear_error(stage2: TTMUNet) -> None:
    x_t, t, cond = inputs(stage2)
    with pytest.raises(ValueError, match="latent grid"):
        stage2(x_t, t, cond.replace(token_ids=cond.token_ids[:, :, ::2, ::2]))


def test_zero_init_leaves_the_base_output_unchanged(stage2: TTMUNet) -> None:
    """Widened input (any visual) + masked layers (with masks) == the plain diffusers model:
    a pretrained U-Net starts exactly where it was."""
    base = base_of(stage2)
    x_t, t, cond = inputs(stage2)
    zero_visual = cond.replace(visual=torch.zeros_like(cond.visual))
    with torch.no_grad():
        expected = base_forward(base, x_t, t, cond)
        for c in (cond, zero_visual):
            assert torch.allclose(stage2(x_t, t, c), expected, atol=1e-5)


def test_gradients_reach_the_added_layers(stage2: TTMUNet) -> None:
    """After moving the zero output projections, every added parameter gets a gradient and
    the additions change the prediction (the masks are wired in, not bypassed)."""
    model = copy.deepcopy(stage2).train()
    perturb_added(model)
    x_t, t, cond = inputs(model)
    out = model(x_t, t, cond)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if model.component_of(name) in ("masked_layers", "conv_in_widening"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        assert not torch.allclose(out, base_forward(base_of(model), x_t, t, cond), atol=1e-4)


def test_masks_decide_what_the_masked_layers_see(stage2: TTMUNet) -> None:
    """Swapping which local prompt belongs to which object changes the output (the masked
    cross-attention binds prompts to their objects), the prompts' order alone does not."""
    model = copy.deepcopy(stage2)
    perturb_added(model)
    x_t, t, cond = inputs(model)
    swapped = cond.replace(local_text_ids=1 - cond.local_text_ids.clamp(min=0)
                           - 2 * (cond.local_text_ids < 0).long())
    reordered = cond.replace(local_text=cond.local_text[:, [3, 4, 5, 0, 1, 2, 6, 7]],
                             local_text_ids=cond.local_text_ids[:, [3, 4, 5, 0, 1, 2, 6, 7]])
    with torch.no_grad():
        out = model(x_t, t, cond)
        assert not torch.allclose(out, model(x_t, t, swapped), atol=1e-5)
        assert torch.allclose(out, model(x_t, t, reordered), atol=1e-5)


def test_no_state_leaks_between_calls_or_models(stage2: TTMUNet) -> None:
    """A call with masks leaves nothing behind for the next call; a second model called
    *inside* the first one's forward (the worst interleaving) uses its own inputs only."""
    a = copy.deepcopy(stage2)
    perturb_added(a, seed=1)
    b = copy.deepcopy(stage2)
    perturb_added(b, seed=2)
    x_a, t_a, with_masks = inputs(a, seed=0)
    x_b, t_b, cond_b = inputs(b, seed=3)
    without = with_masks.replace(local_text=None, local_text_ids=None, token_ids=None)
    with torch.no_grad():
        plain = a(x_a, t_a, without)
        masked = a(x_a, t_a, with_masks)
        assert not torch.allclose(plain, masked, atol=1e-5)
        assert torch.equal(a(x_a, t_a, without), plain)
        ref_b = b(x_b, t_b, cond_b)

        nested: list[torch.Tensor] = []
        hook = a.masked_layers[0].masked_self.register_forward_hook(
            lambda *_: nested.append(b(x_b, t_b, cond_b)))
        try:
            assert torch.allclose(a(x_a, t_a, with_masks), masked, atol=1e-6)
        finally:
            hook.remove()
    assert len(nested) == 1 and torch.allclose(nested[0], ref_b, atol=1e-6)


def test_text_mask_is_honoured_only_when_asked() -> None:
    """With ``honour_text_mask`` the padded text positions of sample 1 cannot matter; by
    default (SD1.5 behaviour) they do."""
    for honour in (True, False):
        model = build(tiny(1, overrides={"honour_text_mask": honour}))
        x_t, t, cond = inputs(model, local=False)
        text = cond.text.clone()
        text[1, 3:] = torch.randn(3, text.shape[-1])
        with torch.no_grad():
            a, b = model(x_t, t, cond), model(x_t, t, cond.replace(text=text))
        assert torch.allclose(a[0], b[0], atol=1e-6)
        assert torch.allclose(a[1], b[1], atol=1e-5) == honour


def test_activation_checkpointing_gives_the_same_gradients(stage2: TTMUNet) -> None:
    """diffusers' checkpointing recomputes the transformer blocks in backward; the masked
    layers' per-call inputs must still be there then."""
    grads = []
    for enabled in (False, True):
        model = copy.deepcopy(stage2).train()
        perturb_added(model)
        model.set_activation_checkpointing(enabled)
        x_t, t, cond = inputs(model)
        model(x_t, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.masked_layers.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert build(tiny(2, activation_checkpointing=True)).unet.down_blocks[0] \
        .gradient_checkpointing


def test_one_object_layout_per_level_per_forward(stage2: TTMUNet,
                                                 layouts_made: list[ObjectLayout]) -> None:
    """Each forward builds one ObjectLayout per masked level, shared by that level's masked
    self- and cross-attention and by diffusers' recomputation (ids sorted once); the result
    equals the dense sdpa path (no layout use), forward and gradients."""
    made = layouts_made
    cfg = stage2.config
    levels = set(cfg.encoder_transformer_levels[:cfg.masked_blocks])
    results = {}
    for backend in ("sdpa", "grouped"):
        model = copy.deepcopy(stage2).train()
        perturb_added(model)
        model.set_activation_checkpointing(True)
        for block in model.masked_layers:
            block.masked_self.backend = block.masked_cross.backend = backend
        x_t, t, cond = inputs(model)
        made.clear()
        out = model(x_t, t, cond)
        out.square().mean().backward()
        assert len(made) == len(levels)
        sorts = {} if backend == "sdpa" else {"sort_tokens": 1, "sort_context": 1}
        assert all(layout.builds == sorts for layout in made)
        results[backend] = (out.detach(), torch.cat(
            [p.grad.flatten() for p in model.masked_layers.parameters()]))
    torch.testing.assert_close(results["grouped"][0], results["sdpa"][0], rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(results["grouped"][1], results["sdpa"][1], rtol=1e-4,
                               atol=1e-6)


def test_training_step_on_cpu() -> None:
    model = build(tiny(2, num_frames=16)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, LATENT, 16, 8, 8, generator=gen)
    ids = torch.full((2, 16, 8, 8), -1)
    ids[:, :, :4] = 0
    cond = ModelConditioning(
        visual=torch.randn(2, 2 * LATENT + 1, 16, 8, 8, generator=gen),
        text=torch.randn(2, 6, TINY.text_dim, generator=gen),
        local_text=torch.randn(2, 3, TINY.text_dim, generator=gen),
        local_text_ids=torch.tensor([[0, 0, -1]] * 2), token_ids=ids)
    before = model.unet.conv_out.weight.detach().clone()
    loss = (model(x_t, torch.tensor([10, 900]), cond) - x_t).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.unet.conv_out.weight)


# ---------------------------------------------------------------------------- pretrained
def save_tiny_pretrained(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny SD-style pipeline folder (weights under unet/) and a motion adapter folder,
    shaped like ``unet-tiny``, with random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=LATENT, out_channels=LATENT,
        block_out_channels=TINY.block_out_channels, layers_per_block=TINY.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY.text_dim, attention_head_dim=TINY.attention_heads,
        norm_num_groups=TINY.norm_num_groups)
    adapter = MotionAdapter(
        block_out_channels=TINY.block_out_channels, motion_layers_per_block=1,
        motion_num_attention_heads=TINY.motion_heads, motion_norm_num_groups=4,
        motion_max_seq_length=24, use_motion_mid_block=False)
    # Non-zero motion output projections, so the motion weights visibly take part.
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "proj_out" in name:
                p.normal_(std=0.1)
    unet.save_pretrained(root / "sd" / "unet")
    adapter.save_pretrained(root / "motion")
    return root / "sd", root / "motion"


def test_pretrained_unet_and_adapter_load_then_widen(tmp_path: Path) -> None:
    sd, motion = save_tiny_pretrained(tmp_path)
    model = build(tiny(2, overrides={"pretrained_unet": str(sd),
                                     "motion_adapter": str(motion)}))
    assert model.max_frames == 24  # the adapter's table, not the size's
    reference = UNetMotionModel.from_unet2d(
        UNet2DConditionModel.from_pretrained(sd / "unet"),
        MotionAdapter.from_pretrained(motion)).eval()
    x_t, t, cond = inputs(model)
    with torch.no_grad():
        assert torch.allclose(model(x_t, t, cond), base_forward(reference, x_t, t, cond),
                              atol=1e-5)
        assert torch.equal(model.unet.conv_in.weight, reference.conv_in.weight)
        assert model.unet.conv_in.visual_weight.abs().sum() == 0


def test_missing_or_mismatched_pretrained_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"pretrained_unet.*nowhere.*huggingface-cli"):
        build(tiny(2, overrides={"pretrained_unet": str(missing)}))
    sd, motion = save_tiny_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="motion_adapter"):
        build(tiny(2, overrides={"pretrained_unet": str(sd),
                                 "motion_adapter": str(missing)}))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        build(tiny(2, overrides={"pretrained_unet": str(sd), "text_dim": 48}))
    with pytest.raises(ValueError, match="num_frames 32"):
        build(tiny(2, num_frames=32, overrides={"pretrained_unet": str(sd),
                                                "motion_adapter": str(motion)}))


def test_stage1_export_initialises_stage2(tmp_path: Path) -> None:
    """``init_from`` a stage-1 export: only the masked layers are missing, and the stage-2
    model then predicts what stage 1 does."""
    from safetensors.torch import save_file

    one = build(tiny(1), seed=3)
    save_file(one.state_dict(), tmp_path / "model.safetensors")
    two = build(tiny(2, init_from=str(tmp_path)), seed=4)
    x_t, t, cond = inputs(two)
    with torch.no_grad():
        assert torch.allclose(two(x_t, t, cond), one(x_t, t, cond), atol=1e-5)


def test_meta_build_with_pretrained_paths_reads_nothing(tmp_path: Path) -> None:
    """Plans count a run's model on the meta device; the weight folders may not exist there."""
    cfg = unet_config_from(tiny(2, overrides={"pretrained_unet": str(tmp_path / "absent")}))
    with torch.device("meta"):
        model = build_unet(cfg)
    assert all(p.is_meta for p in model.parameters())
