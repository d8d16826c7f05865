"""Object masks -> which object each model token belongs to (the ids masked attention uses).

A model token covers a block of the input: with masks at pixel resolution ``[T, H, W]`` and a
token grid ``(t, h, w)`` it covers ``T/t`` frames x ``H/h`` rows x ``W/w`` columns (the DiT:
128x256x256 pixels -> 16x16x16 tokens, blocks of 8x16x16; the U-Net: 16x512x512 -> 16x64x64,
16x32x32, 16x16x16 per resolution). Sizes must divide; anything else is a ValueError rather
than a silent crop.

Rules (Decision in ``method_notes.md``; ``rule`` picks one):

* ``"area"`` (default): object ``k`` claims a token when its *visible* pixels cover at least
  ``threshold`` of the token's block. Visible = not hidden by a lower-index object, the same
  painter's rule as ``trajectory.render_trajectory`` (lower ``color_index`` on top), so the ids
  agree with what the trajectory video shows. Soft (float) masks use the soft version
  ``m_k * prod_{j<k} (1 - m_j)``.
* ``"box"``: as in the paper, each object's mask is first replaced, frame by frame, by its
  bounding box (pixels with mask >= 0.5), then the area rule applies to the boxes.

If several objects reach the threshold (ties at 0.5, or a threshold below 0.5), the lower
index wins. A token no object claims gets -1 (background / no object).
:func:`downsample_token_ids` maps ids to a coarser grid by the same threshold rule, for the
U-Net's lower resolutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

Rule = Literal["area", "box"]
RULES: tuple[str, ...] = ("area", "box")
NO_OBJECT = -1


def _factors(shape: Sequence[int], grid: Sequence[int], what: str) -> tuple[int, int, int]:
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be three positive ints (t, h, w), got {tuple(grid)}")
    bad = [(s, g) for s, g in zip(shape, grid, strict=True) if s % g]
    if bad:
        raise ValueError(f"{what} [T, H, W] = {list(shape)} is not divisible by the token grid "
                         f"{list(grid)}: every token must cover a whole block (resize or crop "
                         "the masks to a multiple of the grid first)")
    return tuple(int(s) // int(g) for s, g in zip(shape, grid, strict=True))  # type: ignore[return-value]


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return threshold


def _block_sum(x: torch.Tensor, factor: tuple[int, int, int]) -> torch.Tensor:
    """``[..., T, H, W]`` -> ``[..., T/ft, H/fh, W/fw]`` sums over each block."""
    *lead, t, h, w = x.shape
    ft, fh, fw = factor
    x = x.reshape(*lead, t // ft, ft, h // fh, fh, w // fw, fw)
    n = len(lead)
    return x.sum(dim=(n + 1, n + 3, n + 5))


def _fill_between(any_along: torch.Tensor) -> torch.Tensor:
    """True from the first to the last True along the last dim (a box's extent)."""
    after_first = any_along.cummax(dim=-1).values
    before_last = any_along.flip(-1).cummax(dim=-1).values.flip(-1)
    return after_first & before_last


def bounding_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` masks -> the same shape, each frame's mask replaced by its filled
    bounding box (pixels with value >= 0.5 count; an empty frame stays empty)."""
    inside = masks >= 0.5 if masks.is_floating_point() else masks.bool()
    rows = _fill_between(inside.any(dim=-1))  # [..., H]
    cols = _fill_between(inside.any(dim=-2))  # [..., W]
    return rows[..., :, None] & cols[..., None, :]


def _as_masks(object_masks: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, bool]:
    masks = torch.as_tensor(object_masks)
    if masks.ndim not in (4, 5):
        raise ValueError(f"object_masks must be [K, T, H, W] or [B, K, T, H, W], got "
                         f"{list(masks.shape)}")
    unbatched = masks.ndim == 4
    return (masks[None] if unbatched else masks), unbatched


def token_object_ids(
    object_masks: torch.Tensor | np.ndarray,
    grid: Sequence[int],
    rule: Rule = "area",
    threshold: float = 0.5,
) -> torch.Tensor:
    """Object masks -> token ids ``long [B, t, h, w]`` (``[t, h, w]`` for unbatched input).

    ``object_masks``: ``[B, K, T, H, W]`` or ``[K, T, H, W]``, bool or float in [0, 1]; object
    ``k`` is mask ``k`` (its colour index). ``grid``: the token grid ``(t, h, w)``; T, H and W
    must be multiples of it. See the module docstring for ``rule`` and overlaps.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    threshold = _check_threshold(threshold)
    masks, unbatched = _as_masks(object_masks)
    b, k, t, h, w = masks.shape
    factor = _factors((t, h, w), grid, "object masks")
    volume = factor[0] * factor[1] * factor[2]
    if rule == "box":
        masks = bounding_boxes(masks)
    ids = torch.full((b, *(int(g) for g in grid)), NO_OBJECT, dtype=torch.long,
                     device=masks.device)
    remaining = torch.ones(b, t, h, w, dtype=torch.float32, device=masks.device)
    claims = []
    for obj in range(k):
        m = masks[:, obj].to(torch.float32)
        visible = m * remaining
        remaining = remaining * (1.0 - m)
        # Sums of 0/1 values are exact in float32 up to 2^24 per block; compare counts, not
        # means, so 2/4 >= 0.5 holds exactly.
        claims.append(_block_sum(visible, factor) >= threshold * volume - 1e-6 * volume)
    for obj in reversed(range(k)):  # lower index written last: it wins
        ids[claims[obj]] = obj
    return ids[0] if unbatched else ids


def downsample_token_ids(
    ids: torch.Tensor,
    factor: Sequence[int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """Ids on a fine grid ``[B, T, H, W]`` (or ``[T, H, W]``) -> the grid coarser by ``factor``.

    A coarse token takes the object id that covers at least ``threshold`` of its
    ``ft * fh * fw`` children (lower id on ties), else -1. For the U-Net, whose masked layers
    run at several resolutions of one token grid.
    """
    threshold = _check_threshold(threshold)
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.ndim not in (3, 4):
        raise ValueError(f"ids must be integer [B, T, H, W] or [T, H, W], got "
                         f"{ids.dtype} {list(ids.shape)}")
    unbatched = ids.ndim == 3
    ids = ids[None] if unbatched else ids
    if len(factor) != 3 or any(int(f) < 1 for f in factor):
        raise ValueError(f"factor must be three positive ints (ft, fh, fw), got {tuple(factor)}")
    shape = tuple(int(s) for s in ids.shape[1:])
    fac = tuple(int(f) for f in factor)
    if any(s % f for s, f in zip(shape, fac, strict=True)):
        raise ValueError(f"ids grid {list(shape)} is not divisible by factor {list(fac)}")
    grid = tuple(s // f for s, f in zip(shape, fac, strict=True))
    volume = fac[0] * fac[1] * fac[2]
    out = torch.full((ids.shape[0], *grid), NO_OBJECT, dtype=torch.long, device=ids.device)
    present = sorted(int(i) for i in torch.unique(ids).tolist() if i >= 0)
    for obj in reversed(present):  # lower id written last: it wins
        count = _block_sum((ids == obj).to(torch.int32), fac)
        out[count >= threshold * volume - 1e-6 * volume] = obj
    return out[0] if unbatched else out


def masks_by_colour(masks: Sequence[np.ndarray], color_indices: Sequence[int]) -> np.ndarray:
    """Per-object ``[T, H, W]`` masks -> ``bool [K, T, H, W]`` where slot ``k`` is the object of
    colour index ``k`` (empty when no object has it): the layout :func:`token_object_ids` and
    the trajectory renderer agree on."""
    if not masks:
        raise ValueError("no object masks")
    t, h, w = np.asarray(masks[0]).shape
    slots = np.zeros((max(int(i) for i in color_indices) + 1, t, h, w), dtype=bool)
    for m, k in zip(masks, color_indices, strict=True):
        slots[int(k)] = np.asarray(m, dtype=bool)
    return slots


def align_to_latent_time(slots: np.ndarray, time_factor: int = 1, causal: bool = False
                         ) -> np.ndarray:
    """Pixel-frame masks ``[K, T, H, W]`` -> frames that group evenly into latent frames.

    A causal video autoencoder encodes frame 0 alone and every later ``time_factor`` frames
    together (``1 + 8n`` pixel frames -> ``1 + n`` latents): frame 0 is repeated
    ``time_factor`` times so every latent frame then covers exactly ``time_factor`` frames.
    """
    if causal and time_factor > 1 and slots.shape[1] > 1:
        head = np.repeat(slots[:, :1], time_factor - 1, axis=1)
        return np.concatenate([head, slots], axis=1)
    return slots


def trajectory_token_ids(
    masks: Sequence[np.ndarray],
    color_indices: Sequence[int],
    grid: Sequence[int],
    *,
    time_factor: int = 1,
    causal: bool = False,
    rule: Rule = "area",
    threshold: float = 0.5,
) -> torch.Tensor:
    """A clip's object masks (pixel frames) -> token ids ``long [t, h, w]`` on ``grid``: what
    training and inference both feed stage 2's masked attention."""
    slots = align_to_latent_time(masks_by_colour(masks, color_indices), time_factor, causal)
    return token_object_ids(slots, grid, rule=rule, threshold=threshold)
