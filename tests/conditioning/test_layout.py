"""The visual-condition layout of both stages: channel counts, placement, errors."""

from __future__ import annotations

import pytest
import torch

from ttm_ray.conditioning.layout import build_visual, condition_layout, visual_channels


@pytest.mark.parametrize("stage", [1, 2])
def test_visual_channels_is_two_latents_plus_flag(stage: int) -> None:
    assert visual_channels(stage, 16) == 33  # the DiT's 16-channel temporal autoencoder
    assert visual_channels(stage, 4) == 9    # the U-Net's SD VAE


def test_stage1_repeats_both_single_frame_latents_on_every_frame() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 1, 3, 5, generator=gen)
    s0 = torch.randn(2, 4, 1, 3, 5, generator=gen)
    vis = build_visual(1, x0, s0, num_frames=6, frames="repeat")
    assert vis.shape == (2, 9, 6, 3, 5) and vis.dtype == x0.dtype
    for f in range(6):
        assert torch.equal(vis[:, 0:4, f:f + 1], x0)
        assert torch.equal(vis[:, 4:8, f:f + 1], s0)
    assert torch.equal(vis[:, 8, 0], torch.ones(2, 3, 5))
    assert (vis[:, 8, 1:] == 0).all()  # the flag still marks the given frame only


def test_stage1_first_places_both_single_frame_latents_at_frame0() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 1, 3, 5, generator=gen)
    s0 = torch.randn(2, 4, 1, 3, 5, generator=gen)
    vis = build_visual(1, x0, s0, num_frames=6)  # the default: first
    assert vis.shape == (2, 9, 6, 3, 5) and vis.dtype == x0.dtype
    assert torch.equal(vis[:, 0:4, :1], x0)
    assert torch.equal(vis[:, 4:8, :1], s0)
    assert torch.equal(vis[:, 8, 0], torch.ones(2, 3, 5))
    assert (vis[:, :, 1:] == 0).all()  # zero padding, flag 0 included


@pytest.mark.parametrize("frames", ["repeat", "first"])
def test_stage2_places_the_whole_trajectory(frames: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 1, 2, 2, generator=gen)
    s = torch.randn(1, 4, 5, 2, 2, generator=gen)
    vis = build_visual(2, x0, s, num_frames=5, frames=frames)
    assert torch.equal(vis[:, 0:4, :1], x0)
    if frames == "repeat":
        assert torch.equal(vis[:, 0:4], x0.expand(1, 4, 5, 2, 2))
    else:
        assert (vis[:, 0:4, 1:] == 0).all()
    assert torch.equal(vis[:, 4:8], s)
    assert torch.equal(vis[:, 8], torch.tensor([1.0, 0, 0, 0, 0]).view(1, 5, 1, 1).expand(
        1, 5, 2, 2))


def test_layout_description_and_groups() -> None:
    layout = condition_layout(2, 16)
    assert layout.channels == 33
    assert [g.name for g in layout.groups] == ["E(x0)", "E(s)", "given"]
    assert layout.group("E(s)").frames == "all frames"
    assert layout.describe() == ("stage 2 visual (33 ch): E(x0)[0:16]@frame 0 | "
                                 "E(s)[16:32]@all frames | given[32:33]@frame 0")
    assert condition_layout(1, 16, "repeat").describe() == (
        "stage 1 visual (33 ch): E(x0)[0:16]@all frames | E(s0)[16:32]@all frames | "
        "given[32:33]@frame 0")
    assert condition_layout(1, 16).group("E(s0)").channels == 16
    with pytest.raises(KeyError):
        layout.group("E(s0)")


def test_build_visual_rejects_mismatched_inputs() -> None:
    x0 = torch.zeros(1, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="stage"):
        visual_channels(3, 4)
    with pytest.raises(ValueError, match="latent_channels"):
        visual_channels(1, 0)
    with pytest.raises(ValueError, match="condition_frames"):
        build_visual(1, x0, x0, num_frames=3, frames="middle")
    with pytest.raises(ValueError, match=r"E\(s0\)"):
        build_visual(1, x0, torch.zeros(1, 4, 3, 2, 2), num_frames=3)  # stage 1: one frame
    with pytest.raises(ValueError, match=r"E\(s\)"):
        build_visual(2, x0, torch.zeros(1, 4, 3, 2, 2), num_frames=4)
    with pytest.raises(ValueError, match="first_frame_latent"):
        build_visual(2, torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 4, 2, 2, 2), num_frames=2)
