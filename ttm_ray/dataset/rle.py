"""COCO run-length encoding of binary masks, the mask format of SA-V and of our shards.

An RLE is ``{"size": [H, W], "counts": str}`` with the *compressed* COCO counts string (what
SA-V publishes and what :data:`ttm_ray.dataset.schema.RLE` stores). pycocotools works on
column-major (Fortran-order) ``uint8`` arrays and returns ``bytes`` counts; these helpers hide
both so callers pass and get ordinary ``[H, W]`` bool arrays and JSON-ready dicts.

Decoding accepts ``counts`` as ``str`` or ``bytes`` (compressed) or as a list of ints (the
uncompressed COCO form some tools write); encoding always produces the compressed string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

Rle = dict[str, Any]


def _as_uint8(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"mask must be bool or integer, got {arr.dtype}")
    return (arr != 0).astype(np.uint8)


def _to_coco(rle: Mapping[str, Any]) -> dict[str, Any]:
    """The dict pycocotools' C code wants: compressed counts as ``bytes``."""
    try:
        size, counts = rle["size"], rle["counts"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not an RLE dict (needs 'size' and 'counts'): {rle!r:.120}") from exc
    if len(size) != 2:
        raise ValueError(f"RLE size must be [H, W], got {size!r}")
    h, w = int(size[0]), int(size[1])
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [h, w], "counts": counts}
    if isinstance(counts, Sequence):  # uncompressed: run lengths, starting with zeros
        return mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
    raise ValueError(f"RLE counts must be str, bytes or a list of ints, got {type(counts)}")


def _from_coco(rle: Mapping[str, Any]) -> Rle:
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def encode_mask(mask: np.ndarray) -> Rle:
    """``[H, W]`` bool/uint8 mask (nonzero = inside) -> ``{"size": [H, W], "counts": str}``."""
    arr = _as_uint8(mask)
    if arr.ndim != 2:
        raise ValueError(f"expected one [H, W] mask, got shape {arr.shape}")
    return _from_coco(mask_utils.encode(np.asfortranarray(arr)))


def encode_masks(masks: np.ndarray | Sequence[np.ndarray]) -> list[Rle]:
    """``[N, H, W]`` masks (or a list of same-size ``[H, W]`` masks) -> N RLEs, one C call."""
    if isinstance(masks, np.ndarray):
        stack = _as_uint8(masks)
    else:
        if len(masks) == 0:
            return []
        stack = np.stack([_as_uint8(m) for m in masks])
    if stack.ndim != 3:
        raise ValueError(f"expected [N, H, W] masks, got shape {stack.shape}")
    if stack.shape[0] == 0:
        return []
    # pycocotools wants [H, W, N] in column-major order: then each mask is contiguous.
    fortran = np.asfortranarray(stack.transpose(1, 2, 0))
    return [_from_coco(r) for r in mask_utils.encode(fortran)]


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """One RLE -> ``[H, W]`` bool mask."""
    return mask_utils.decode(_to_coco(rle)).astype(bool)


def decode_masks(rles: Sequence[Mapping[str, Any]],
                 size: tuple[int, int] | None = None) -> np.ndarray:
    """N RLEs of one size -> ``[N, H, W]`` bool. ``size`` gives the shape when ``rles`` is empty."""
    if len(rles) == 0:
        if size is None:
            raise ValueError("decode_masks([]) needs size=(H, W) to know the output shape")
        return np.zeros((0, int(size[0]), int(size[1])), bool)
    coco = [_to_coco(r) for r in rles]
    sizes = {tuple(r["size"]) for r in coco}
    if len(sizes) != 1:
        raise ValueError(f"RLEs of different sizes cannot be stacked: {sorted(sizes)}")
    if size is not None and tuple(size) not in sizes:
        raise ValueError(f"RLE size {sizes.pop()} differs from the expected {tuple(size)}")
    decoded = mask_utils.decode(coco)  # [H, W, N], Fortran order
    return np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)


def mask_area(rle: Mapping[str, Any]) -> int:
    """Pixels inside one RLE, without decoding it."""
    return int(mask_utils.area(_to_coco(rle)))


def mask_areas(rles: Sequence[Mapping[str, Any]]) -> list[int]:
    """Pixels inside each RLE, without decoding."""
    if len(rles) == 0:
        return []
    return [int(a) for a in mask_utils.area([_to_coco(r) for r in rles])]


def encode_frames_objects(masks: np.ndarray) -> list[list[Rle]]:
    """``[F, K, H, W]`` (frames x objects) -> SA-V's ``masklet`` layout ``[frame][object]``."""
    arr = np.asarray(masks)
    if arr.ndim != 4:
        raise ValueError(f"expected [F, K, H, W] masks, got shape {arr.shape}")
    f, k, h, w = arr.shape
    flat = encode_masks(arr.reshape(f * k, h, w))
    return [flat[i * k:(i + 1) * k] for i in range(f)]


def decode_frames_objects(masklet: Sequence[Sequence[Mapping[str, Any]]],
                          size: tuple[int, int] | None = None) -> np.ndarray:
    """SA-V's ``masklet`` (list over frames of list over objects) -> ``[F, K, H, W]`` bool.

    Every frame must list the same number of objects. ``size`` is needed only when there is
    no RLE at all to read it from (no frames or no objects).
    """
    counts = {len(frame) for frame in masklet}
    if len(counts) > 1:
        raise ValueError(f"frames list different numbers of objects: {sorted(counts)}")
    k = counts.pop() if counts else 0
    flat = [rle for frame in masklet for rle in frame]
    if flat:
        size = tuple(_to_coco(flat[0])["size"])
    elif size is None:
        raise ValueError("an empty masklet needs size=(H, W) to know the output shape")
    decoded = decode_masks(flat, size=size)
    return decoded.reshape(len(masklet), k, int(size[0]), int(size[1]))


__all__ = [
    "Rle",
    "decode_frames_objects",
    "decode_mask",
    "decode_masks",
    "encode_frames_objects",
    "encode_mask",
    "encode_masks",
    "mask_area",
    "mask_areas",
]
