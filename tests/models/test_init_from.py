"""``init_from`` across input widths: the widened input layer shared by the DiT's patchify and
the U-Net's conv_in (``models.widening``), text-to-video checkpoints loading into the stage-1/2
models, each family loading the other's input-layer layout, and the load-free
``check_init_from``.

A "text-to-video model" here is the same model class with no condition channels
(``visual_channels = 0``): its input layer is a plain convolution over x_t's channels, which
is the shape a text-to-video checkpoint's ``patchify.weight`` / ``conv_in.weight`` has.

Output comparisons use ``torch.testing.assert_close`` at float32's default tolerance, not
``torch.equal``: the widened layer runs ONE convolution over C + Cv input channels, and
although the extra weights are exact zeros, a backend may block that contraction differently
from the narrow one and round differently (on the CPUs measured it is bit-exact). What is
exact by construction (the loaded weights, the zero extra channels) is checked with
``torch.equal``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.models import ModelConfig, build_model, check_init_from, resolve_family_config
from ttm_ray.models.dit import TTMDiT, build_dit
from ttm_ray.models.unet import TTMUNet, build_unet
from ttm_ray.models.widening import WidenedConv, widen_input

LATENT = 4
CV = 2 * LATENT + 1  # layout.visual_channels: E(x0) | E(s0) or E(s) | given
TEXT_DIM = 32  # dit-tiny and unet-tiny
GRIDS = {"dit": (3, 4, 6), "unet": (4, 8, 8)}


def cfg(family: str, stage: int, **kw) -> ModelConfig:
    t, h, w = GRIDS[family]
    return ModelConfig(family=family, size=f"{family}-tiny", stage=stage, latent_channels=LATENT,
                       num_frames=t, height=h, width=w, **kw)


def text_to_video(family: str, seed: int = 0) -> nn.Module:
    """The family's model without condition channels (and without masked layers), perturbed
    so its output is not the adaLN-Zero / zero-init trivial one."""
    resolved = dataclasses.replace(resolve_family_config(cfg(family, 1)), visual_channels=0)
    torch.manual_seed(seed)
    model = (build_dit if family == "dit" else build_unet)(resolved)
    perturb(model, seed)
    return model.eval()


def perturb(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def inputs(family: str, visual_channels: int, batch: int = 2, local: bool = False,
           zero_visual: bool = True, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, ModelConditioning]:
    gen = torch.Generator().manual_seed(seed)
    grid = GRIDS[family]
    x_t = torch.randn(batch, LATENT, *grid, generator=gen)
    t = torch.rand(batch, generator=gen) if family == "dit" else torch.tensor([999, 250])
    visual = torch.randn(batch, visual_channels, *grid, generator=gen)
    cond = ModelConditioning(visual=visual * 0 if zero_visual else visual,
                             text=torch.randn(batch, 5, TEXT_DIM, generator=gen))
    if local:
        token_grid = grid if family == "unet" else (grid[0], grid[1] // 2, grid[2] // 2)
        ids = torch.full((batch, *token_grid), -1, dtype=torch.long)
        ids[:, :, : token_grid[1] // 2, : token_grid[2] // 2] = 0
        ids[:, :, token_grid[1] // 2:, token_grid[2] // 2:] = 1
        cond = cond.replace(local_text=torch.randn(batch, 6, TEXT_DIM, generator=gen),
                            local_text_ids=torch.tensor([[0, 0, 0, 1, 1, -1]] * batch),
                            token_ids=ids)
    return x_t, t, cond


def input_layer(model: nn.Module) -> nn.Module:
    return model.patchify if isinstance(model, TTMDiT) else model.unet.conv_in


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("dims", [2, 3])
def test_widened_conv_is_one_conv_over_all_channels(dims: int, split: bool) -> None:
    conv = (nn.Conv2d(4, 6, 3, padding=1) if dims == 2 else
            nn.Conv3d(4, 6, (1, 2, 2), stride=(1, 2, 2)))  # the U-Net's and the DiT's
    layer = widen_input(conv, 3, split=split)
    assert isinstance(layer, WidenedConv)
    kernel = tuple(conv.kernel_size)
    if split:
        assert layer.weight is conv.weight  # the base's own parameter: pretrained stays put
        assert list(layer.state_dict()) == ["weight", "bias", "visual_weight"]
    else:
        assert list(layer.state_dict()) == ["weight", "bias"]
        assert torch.equal(layer.weight[:, :4], conv.weight)
    assert torch.equal(layer.full_weight()[:, 4:], torch.zeros(6, 3, *kernel))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(2, 7, *([4] * len(kernel)))
    reference = type(conv)(7, 6, conv.kernel_size, stride=conv.stride, padding=conv.padding)
    with torch.no_grad():
        reference.weight.copy_(layer.full_weight())
        reference.bias.copy_(layer.bias)
        torch.testing.assert_close(layer(x), reference(x))
    assert widen_input(conv, 0) is conv  # no condition channels: the plain layer


@pytest.mark.parametrize("split", [True, False])
def test_widened_conv_loads_every_layout(split: bool) -> None:
    layer = widen_input(nn.Conv2d(4, 6, 3, padding=1), 3, split=split)
    assert isinstance(layer, WidenedConv)
    bias = torch.randn(6)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)  # a narrow load must zero the condition channels, not keep these
    narrow = torch.randn(6, 4, 3, 3)
    layer.load_state_dict({"weight": narrow, "bias": bias})  # strict: nothing missing
    assert torch.equal(layer.full_weight(), torch.cat([narrow, torch.zeros(6, 3, 3, 3)], 1))

    full = torch.randn(6, 7, 3, 3)
    layer.load_state_dict({"weight": full, "bias": bias})  # one conv over all 7 channels
    assert torch.equal(layer.full_weight(), full)

    extra = torch.randn(6, 3, 3, 3)
    layer.load_state_dict({"weight": narrow, "visual_weight": extra, "bias": bias})
    assert torch.equal(layer.full_weight(), torch.cat([narrow, extra], 1))

    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({"weight": torch.randn(6, 5, 3, 3), "bias": bias})


# --------------------------------------------------------------------------- text-to-video


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_text_to_video_checkpoint_initialises_stage2(family: str, tmp_path: Path) -> None:
    """The bug this fixes: a text-to-video checkpoint's narrow input weight into the widened
    model. It loads through build_model(init_from), the condition channels start at zero, and
    the stage-2 model then predicts what the text-to-video model does with zero conditions
    and no local prompts; at init the conditions and local prompts cannot change that."""
    t2v = text_to_video(family)
    narrow = input_layer(t2v)
    assert isinstance(narrow, nn.Conv2d | nn.Conv3d) and narrow.in_channels == LATENT
    path = save(t2v.state_dict(), tmp_path / "t2v.safetensors")

    torch.manual_seed(9)  # a different init: everything compared below must come from the file
    two = build_model(cfg(family, 2, init_from=str(path))).eval()
    assert isinstance(two, TTMDiT | TTMUNet)
    layer = input_layer(two)
    assert isinstance(layer, WidenedConv) and layer.extra_channels == CV
    assert torch.equal(layer.full_weight()[:, :LATENT], narrow.weight)
    assert torch.equal(layer.full_weight()[:, LATENT:], torch.zeros(narrow.out_channels, CV,
                                                                    *narrow.kernel_size))
    assert check_init_from(cfg(family, 2, init_from=str(path))) == []

    x_t, t, cond = inputs(family, 0)
    with torch.no_grad():
        reference = t2v(x_t, t, cond)
        assert reference.abs().mean() > 1e-3  # not the trivial zero output
        zero = cond.replace(visual=torch.zeros(x_t.shape[0], CV, *x_t.shape[2:]))
        torch.testing.assert_close(two(x_t, t, zero), reference)
        # Stronger, and what the zero-init promises: any condition, any local prompts.
        _, _, rich = inputs(family, CV, local=True, zero_visual=False)
        torch.testing.assert_close(two(x_t, t, rich.replace(text=cond.text)), reference)


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_the_other_layout_loads(family: str, tmp_path: Path) -> None:
    """Each family keeps its own layout (DiT: one full-width ``patchify.weight``; U-Net:
    ``conv_in.weight`` + ``conv_in.visual_weight``) and loads the other's: e.g. a U-Net
    whose conv_in was widened in place, as diffusers-based image-to-video trainings do."""
    torch.manual_seed(0)
    one = build_model(cfg(family, 1))
    perturb(one)
    one.eval()
    prefix = "patchify." if family == "dit" else "unet.conv_in."
    state = one.state_dict()
    if family == "dit":  # full width -> split
        full = state.pop(prefix + "weight")
        state[prefix + "weight"], state[prefix + "visual_weight"] = full[:, :LATENT], \
            full[:, LATENT:]
    else:  # split -> full width
        full = torch.cat([state[prefix + "weight"], state.pop(prefix + "visual_weight")], 1)
        state[prefix + "weight"] = full
    save(state, tmp_path / "model.safetensors")

    for stage in (1, 2):
        assert check_init_from(cfg(family, stage, init_from=str(tmp_path))) == []
        loaded = build_model(cfg(family, stage, init_from=str(tmp_path))).eval()
        layer = input_layer(loaded)
        assert isinstance(layer, WidenedConv) and layer.split == (family == "unet")
        assert torch.equal(layer.full_weight(), full)
        x_t, t, cond = inputs(family, CV, zero_visual=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x_t, t, cond), one(x_t, t, cond))


# --------------------------------------------------------------------------- check_init_from


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("init_from")
    torch.manual_seed(0)
    stage1 = build_model(cfg("dit", 1)).state_dict()
    wrong = dict(stage1)
    wrong["patchify.weight"] = torch.zeros(128, 7, 1, 2, 2)
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    return {
        "good": save(stage1, root / "stage1.safetensors"),
        "narrow": save(text_to_video("dit").state_dict(), root / "t2v.safetensors"),
        "wrong_width": save(wrong, root / "wrong.safetensors"),
        "unet": save(build_model(cfg("unet", 2)).state_dict(), root / "unet.safetensors"),
        "garbage": garbage,
    }


def test_check_init_from_accepts_good_and_narrow_files(files: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def no_loading(*_: object, **__: object) -> None:
        raise AssertionError("check_init_from must read the header only")

    monkeypatch.setattr(safetensors.torch, "load_file", no_loading)
    assert check_init_from(cfg("dit", 2)) == []  # no init_from: nothing to check
    assert check_init_from(cfg("dit", 2, init_from=str(files["good"]))) == []
    assert check_init_from(cfg("dit", 1, init_from=str(files["good"]))) == []
    assert check_init_from(cfg("dit", 2, init_from=str(files["narrow"]))) == []
    assert check_init_from(cfg("dit", 1, init_from=str(files["narrow"]))) == []
    # The directory form (what training exports) resolves to its model.safetensors.
    folder = files["good"].parent / "export"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(files["good"].read_bytes())
    assert check_init_from(cfg("dit", 2, init_from=str(folder))) == []


def test_check_init_from_names_key_shapes_and_fix(files: dict[str, Path]) -> None:
    problems = check_init_from(cfg("dit", 2, init_from=str(files["wrong_width"])))
    assert len(problems) == 1, problems
    message = problems[0]
    file = files["wrong_width"]
    assert message.startswith(f"model.init_from: {file}: patchify.weight [128, 7, 1, 2, 2] "
                              "in the checkpoint does not fit the input layer of the model "
                              "(dit dit-tiny, stage 2, latent_channels 4)")
    assert "patchify.weight [128, 4, 1, 2, 2] alone" in message  # text-to-video: x_t only
    assert "patchify.weight [128, 13, 1, 2, 2] alone" in message  # x_t + 9 condition ch.
    assert "fix:" in message and "model.init_from" in message.split("fix:")[1]
    # The loader refuses the same file with the same explanation.
    with pytest.raises(ValueError, match=r"patchify\.weight \[128, 7, 1, 2, 2\] in the"):
        build_model(cfg("dit", 2, init_from=str(files["wrong_width"])))


def test_check_init_from_other_problems(files: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.safetensors"
    [message] = check_init_from(cfg("dit", 2, init_from=str(missing)))
    assert message.startswith(f"model.init_from: no weights at {missing}")
    assert "model.init_from: null" in message

    [message] = check_init_from(cfg("dit", 2, init_from=str(files["garbage"])))
    assert "not a readable safetensors file" in message

    # Another family's weights: every key is missing or unexpected; two messages, not 200.
    problems = check_init_from(cfg("dit", 2, init_from=str(files["unet"])))
    assert len(problems) == 2
    assert "lacks" in problems[0] and "blocks.0." in problems[0]
    assert "holds" in problems[1] and "more" in problems[1]

    # A stage-2 checkpoint into a stage-1 model: its masked layers have nowhere to go.
    two = save(build_model(cfg("dit", 2)).state_dict(), tmp_path / "two.safetensors")
    [message] = check_init_from(cfg("dit", 1, init_from=str(two)))
    assert "does not have" in message and "masked_" in message
    assert check_init_from(cfg("dit", 2, init_from=str(two))) == []


def test_check_init_from_unet_narrow_and_wrong_width(tmp_path: Path) -> None:
    narrow = save(text_to_video("unet").state_dict(), tmp_path / "t2v.safetensors")
    assert check_init_from(cfg("unet", 2, init_from=str(narrow))) == []
    state = build_model(cfg("unet", 1)).state_dict()
    state["unet.conv_in.visual_weight"] = torch.zeros(16, 5, 3, 3)  # another layout's width
    wrong = save(state, tmp_path / "wrong.safetensors")
    [message] = check_init_from(cfg("unet", 2, init_from=str(wrong)))
    assert "unet.conv_in.weight [16, 4, 3, 3], unet.conv_in.visual_weight [16, 5, 3, 3] in " \
        "the checkpoint" in message
    assert "unet.conv_in.visual_weight [16, 9, 3, 3]" in message
