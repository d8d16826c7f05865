"""Where the visual conditions sit in ``cond.visual``: one layout per stage, both families.

The paper concatenates the condition latents to the noisy latent along channels. A single
image (x0, or its segmentation s0) encodes to a one-frame latent, which
``model.condition_frames`` either

* ``first`` (the default, the Decision in ``method_notes.md``): places at latent frame 0 and
  zero-pads over the other frames, so the model carries frame 0 across time itself; or
* ``repeat``: copies to every latent frame (as Stable Video Diffusion does), so each frame's
  tokens see the condition at their own position.

Both add one binary "frame given" channel that is 1 at frame 0 only, so the model can tell
the given frame from the others. The DiT configs choose ``repeat``: a dit-tiny trained from
scratch learns to carry frame 0 forward only with it, while the U-Net, whose convolutions
and per-position temporal attention carry it already, learns better with ``first``
(measurements in ``benchmarks/results/it_learns.md``). Channel order, ``C`` = latent
channels:

* stage 1 (image-to-motion): ``[E(x0) | E(s0) | given]``  -> ``2C + 1``;
* stage 2 (motion-to-video): ``[E(x0) | E(s) all frames | given]`` -> ``2C + 1``.

Dropping the visual condition (guidance) zeroes the whole tensor, flag included. The models
size their input layer with :func:`visual_channels`; data loading and inference build the
tensor with :func:`build_visual`; reports print :func:`condition_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAGES: tuple[int, ...] = (1, 2)
#: How a one-frame condition latent fills the T latent frames (see the module docstring).
CONDITION_FRAMES: tuple[str, ...] = ("first", "repeat")


@dataclass(frozen=True)
class ChannelGroup:
    """One block of channels: ``[start, stop)``, what it holds and over which frames."""

    name: str
    start: int
    stop: int
    frames: str  # "frame 0" or "all frames"

    @property
    def channels(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ConditionLayout:
    """The visual-condition layout of one stage (for models, loaders and run reports)."""

    stage: int
    latent_channels: int
    groups: tuple[ChannelGroup, ...]

    @property
    def channels(self) -> int:
        return self.groups[-1].stop

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no channel group {name!r} in stage {self.stage}: "
                       f"{[g.name for g in self.groups]}")

    def describe(self) -> str:
        """One line, e.g. ``stage 2 visual (33 ch): E(x0)[0:16]@frame 0 | ...``."""
        parts = [f"{g.name}[{g.start}:{g.stop}]@{g.frames}" for g in self.groups]
        return f"stage {self.stage} visual ({self.channels} ch): " + " | ".join(parts)


def _check_stage(stage: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def _check_frames(frames: str) -> None:
    if frames not in CONDITION_FRAMES:
        raise ValueError(f"condition_frames must be one of {CONDITION_FRAMES}, got {frames!r}")


def condition_layout(stage: int, latent_channels: int,
                     frames: str = "first") -> ConditionLayout:
    """The layout of ``cond.visual`` for ``stage`` with ``latent_channels`` per latent;
    ``frames`` is how a one-frame latent fills the clip (:data:`CONDITION_FRAMES`)."""
    _check_stage(stage)
    _check_frames(frames)
    c = int(latent_channels)
    if c <= 0:
        raise ValueError(f"latent_channels must be positive, got {latent_channels}")
    single = "all frames" if frames == "repeat" else "frame 0"
    second = ("E(s0)", single) if stage == 1 else ("E(s)", "all frames")
    return ConditionLayout(stage, c, (
        ChannelGroup("E(x0)", 0, c, single),
        ChannelGroup(second[0], c, 2 * c, second[1]),
        ChannelGroup("given", 2 * c, 2 * c + 1, "frame 0"),
    ))


def visual_channels(stage: int, latent_channels: int) -> int:
    """Channels of ``cond.visual``: ``2 * latent_channels + 1`` in both stages."""
    return condition_layout(stage, latent_channels).channels


def build_visual(stage: int, first_frame_latent: torch.Tensor,
                 trajectory_latent: torch.Tensor, num_frames: int,
                 frames: str = "first") -> torch.Tensor:
    """Assemble ``cond.visual [B, 2C+1, T, H, W]`` (``T = num_frames`` latent frames);
    ``frames``: ``first`` puts the one-frame latents at frame 0 and leaves zeros, ``repeat``
    copies them to every frame.

    ``first_frame_latent``: E(x0), ``[B, C, 1, H, W]``. ``trajectory_latent``: stage 1 the
    first-frame segmentation E(s0), ``[B, C, 1, H, W]``; stage 2 the whole trajectory video
    E(s), ``[B, C, T, H, W]``. The result has the first latent's dtype and device.
    """
    _check_stage(stage)
    x0, s = first_frame_latent, trajectory_latent
    if x0.ndim != 5 or x0.shape[2] != 1:
        raise ValueError(f"first_frame_latent must be [B, C, 1, H, W], got {list(x0.shape)}")
    b, c, _, h, w = x0.shape
    want_t = 1 if stage == 1 else num_frames
    if tuple(s.shape) != (b, c, want_t, h, w):
        what = "E(s0) [B, C, 1, H, W]" if stage == 1 else "E(s) [B, C, T, H, W]"
        raise ValueError(f"stage {stage} trajectory_latent must be {what} = "
                         f"{[b, c, want_t, h, w]}, got {list(s.shape)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    layout = condition_layout(stage, c, frames)
    out = x0.new_zeros(b, layout.channels, num_frames, h, w)
    span = num_frames if frames == "repeat" else 1
    out[:, :c, :span] = x0
    out[:, c:2 * c, :span if stage == 1 else num_frames] = s.to(out.dtype)
    out[:, 2 * c, 0] = 1.0
    return out
