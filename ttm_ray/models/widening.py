"""An input convolution widened with extra input channels that start at zero, loadable from a
checkpoint of the narrow layer: the DiT's patchify and the U-Net's ``conv_in`` both use it.

TTM concatenates the condition latents (``cond.visual``, see ``conditioning.layout``) to the
noisy latent on channels, so both families' first layer takes ``C + Cv`` channels where the
model they start from (a text-to-video DiT, SD1.5 + AnimateDiff) takes ``C``. The paper starts
the new channels' weights at zero, so the widened model at load time *is* the narrow one.

Two parameter layouts, each family keeping the one its checkpoints already have (a changed
layout would still load through :meth:`WidenedConv.adapt_checkpoint`, but DeepSpeed's ZeRO
optimizer state is a flat buffer restored by position, and the same number of elements in a
new order would resume silently scrambled):

* ``split=True`` (the U-Net): ``weight [out, C, *k]`` is the narrow layer's own parameter,
  under its own key (SD1.5's ``conv_in.weight`` loads as is), plus ``visual_weight
  [out, Cv, *k]`` (reports count the widening);
* ``split=False`` (the DiT): one ``weight [out, C + Cv, *k]``, what the DiT has always
  exported.

Checkpoint layouts :meth:`WidenedConv.adapt_checkpoint` turns into the layer's own (the load
hook and the load-free shape check in :mod:`ttm_ray.models.weights` run the same code):

* ``weight [out, C, *k]`` alone: a narrow checkpoint (text-to-video); the ``Cv`` condition
  channels are set to zero, explicitly, whatever the module held before;
* ``weight [out, C + Cv, *k]`` alone: one convolution over all channels;
* ``weight [out, C, *k]`` + ``visual_weight [out, Cv, *k]``: the split layout.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Name of the split layout's extra-channel parameter (the U-Net's reports and exports).
EXTRA = "visual_weight"

_CONV_FN: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class WidenedConv(nn.Module):
    """``base`` (a ``Conv1d/2d/3d``) plus ``extra_channels`` input channels after its own,
    their weights zero. Equal to one ``ConvNd`` over ``base.in_channels + extra_channels``
    (one conv op per call); ``split`` picks the parameter layout (module docstring)."""

    visual_weight: nn.Parameter | None

    def __init__(self, base: nn.Conv1d | nn.Conv2d | nn.Conv3d, extra_channels: int, *,
                 split: bool = True) -> None:
        super().__init__()
        if not isinstance(base, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            raise TypeError(f"only Conv1d/2d/3d can be widened, got {type(base).__name__}")
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("only a plain zero-padded convolution (groups=1) can be widened")
        if extra_channels < 1:
            raise ValueError(f"extra_channels must be >= 1, got {extra_channels} "
                             "(use the convolution itself: see widen_input)")
        zeros = torch.zeros(base.out_channels, extra_channels, *base.kernel_size,
                            dtype=base.weight.dtype, device=base.weight.device)
        self.split = split
        # Registration order is parameter order (weight, bias, visual_weight, as before this
        # class was shared): DeepSpeed's flat optimizer partitions depend on it.
        if split:
            # The base's Parameter itself (not a copy): pretrained weights loaded into
            # ``base`` before widening (the U-Net's SD1.5 conv_in) stay in place.
            self.weight = base.weight
        else:
            self.weight = nn.Parameter(_joint_weight(base, zeros))
        self.bias = base.bias
        self.register_parameter(EXTRA, nn.Parameter(zeros) if split else None)
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        self.base_in_channels = base.in_channels
        self.extra_channels = extra_channels
        self.in_channels = base.in_channels + extra_channels
        self.out_channels = base.out_channels
        self.kernel_size = tuple(base.kernel_size)
        self._conv = _CONV_FN[len(self.kernel_size)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.full_weight(), self.bias, self.stride, self.padding,
                          self.dilation)

    def full_weight(self) -> torch.Tensor:
        """``[out, C + Cv, *kernel]``: what one convolution over all channels holds."""
        if self.visual_weight is None:
            return self.weight
        return torch.cat([self.weight, self.visual_weight.to(self.weight.dtype)], dim=1)

    def extra_repr(self) -> str:
        return (f"{self.base_in_channels}+{self.extra_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, split={self.split}")

    # ------------------------------------------------------------------ checkpoints
    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Shapes of a checkpoint's entries: ``(narrow weight, full-width weight,
        visual_weight)``."""
        out, k = self.out_channels, self.kernel_size
        return ((out, self.base_in_channels, *k), (out, self.in_channels, *k),
                (out, self.extra_channels, *k))

    def adapt_checkpoint(self, state: MutableMapping[str, Any], prefix: str) -> str | None:
        """Rewrite this layer's entries of ``state`` (``prefix + "weight"``, ...) into its own
        layout, in place. Returns which layout it found when it rewrote something
        (``"narrow"``, ``"full"``, ``"split"``), else None: already the layer's own, or shapes
        no layout explains (the caller reports the mismatch). Works on any tensors, meta
        ones included (the shape check)."""
        w_key, v_key = prefix + "weight", prefix + EXTRA
        weight, extra = state.get(w_key), state.get(v_key)
        if weight is None:
            return None
        narrow, full, extra_shape = self.shapes()
        shape = tuple(weight.shape)
        if extra is not None:
            if self.split or shape != narrow or tuple(extra.shape) != extra_shape:
                return None
            state[w_key] = torch.cat([weight, extra.to(weight.dtype)], dim=1)
            del state[v_key]
            return "split"
        if shape == narrow:
            # Explicit zeros, not "leave the parameter alone": a narrow checkpoint means the
            # condition channels are new, whatever the module held before the load.
            zeros = torch.zeros(extra_shape, dtype=weight.dtype, device=weight.device)
            if self.split:
                state[v_key] = zeros
            else:
                state[w_key] = torch.cat([weight, zeros], dim=1)
            return "narrow"
        if shape == full and self.split:
            state[w_key] = weight[:, :self.base_in_channels]
            state[v_key] = weight[:, self.base_in_channels:]
            return "full"
        return None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # The way torch's own modules migrate old checkpoint layouts (BatchNorm's
        # num_batches_tracked): ``load_state_dict`` hands every module its own copy of the
        # checkpoint's entries, so rewriting our keys here touches nothing the caller holds.
        self.adapt_checkpoint(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


def _joint_weight(base: nn.Module, zeros: torch.Tensor) -> torch.Tensor:
    """``cat([base.weight, zeros], dim=1)``, reading the base's weight inside
    ``base.apply``: under DeepSpeed's ``zero.Init`` (a ZeRO-3 model built partitioned)
    ``base`` is partitioned by now, and ``apply`` is where it gathers a module's own
    parameters (a direct read would see an empty tensor)."""
    parts: list[torch.Tensor] = []

    def take(module: nn.Module) -> None:
        if module is base:
            parts.append(module.weight.detach().clone())

    base.apply(take)
    return torch.cat([parts[0], zeros], dim=1)


def widen_input(base: nn.Conv1d | nn.Conv2d | nn.Conv3d, extra_channels: int, *,
                split: bool = True) -> nn.Module:
    """``base`` widened by ``extra_channels`` zero-initialised input channels; ``base`` itself
    when there are none (a model without conditions keeps a plain convolution: the narrow
    checkpoint layout)."""
    return WidenedConv(base, extra_channels, split=split) if extra_channels else base


def init_input_weight_(layer: nn.Module, init: Callable[[torch.Tensor], Any]) -> None:
    """Run ``init`` on the layer's input weight as ONE ``[out, in, *kernel]`` tensor (widened:
    narrow and extra channels together). For a model trained from scratch: with no narrow
    model to preserve, the condition channels get the same distribution (fan-in over all
    channels) as the rest; a narrow checkpoint loaded later zeroes them again."""
    with torch.no_grad():
        if isinstance(layer, WidenedConv) and layer.visual_weight is not None:
            full = torch.empty_like(layer.full_weight())
            init(full)
            layer.weight.copy_(full[:, :layer.base_in_channels])
            layer.visual_weight.copy_(full[:, layer.base_in_channels:])
        else:
            weight = layer.weight
            assert isinstance(weight, torch.Tensor)
            init(weight)


def widened_layers(model: nn.Module) -> dict[str, WidenedConv]:
    """Every widened layer of ``model`` by its state-dict prefix (``"patchify."``,
    ``"unet.conv_in."``)."""
    return {f"{name}.": module for name, module in model.named_modules()
            if isinstance(module, WidenedConv)}


def adapt_checkpoint(model: nn.Module, state: MutableMapping[str, Any]) -> dict[str, str]:
    """Apply every widened layer's :meth:`WidenedConv.adapt_checkpoint` to ``state`` (in
    place); returns ``{prefix: layout found}`` for the layers it rewrote."""
    done = {}
    for prefix, layer in widened_layers(model).items():
        how = layer.adapt_checkpoint(state, prefix)
        if how:
            done[prefix] = how
    return done


__all__ = ["EXTRA", "WidenedConv", "adapt_checkpoint", "init_input_weight_", "widen_input",
           "widened_layers"]
