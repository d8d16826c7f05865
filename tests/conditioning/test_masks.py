"""Token object ids from hand-made masks, on a DiT-like and on the U-Net's grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ttm_ray.conditioning.masks import bounding_boxes, downsample_token_ids, token_object_ids
from ttm_ray.conditioning.trajectory import render_trajectory, trajectory_to_object_ids

N = -1  # no object


def ids(*frames: list[list[int]]) -> torch.Tensor:
    return torch.tensor(frames, dtype=torch.long)


def dit_like_masks() -> torch.Tensor:
    """[K=3, T=4, H=8, W=8] -> grid (2, 2, 2): each token covers 2 frames x 4 x 4 pixels
    (the DiT's 8 frames x 16 x 16, scaled down)."""
    m = torch.zeros(3, 4, 8, 8, dtype=torch.bool)
    m[0, :, 0:4, 0:4] = True     # top-left, every frame: 100 %
    m[1, 0, 4:8, 4:8] = True     # bottom-right, frame 0 of token-frame 0 only: 50 %
    m[2, 2:4, 0:3, 4:8] = True   # top-right, 3 of 4 rows, token-frame 1: 75 %
    return m


def test_area_rule_on_a_dit_like_grid() -> None:
    got = token_object_ids(dit_like_masks(), grid=(2, 2, 2))
    expected = ids([[0, N], [N, 1]],
                   [[0, 2], [N, N]])
    assert got.dtype == torch.long
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("threshold", "expected"), [
    (0.5, ids([[0, N], [N, 1]], [[0, 2], [N, N]])),     # 50 % is enough (>=)
    (0.51, ids([[0, N], [N, N]], [[0, 2], [N, N]])),    # object 1 drops just above 50 %
    (0.75, ids([[0, N], [N, N]], [[0, 2], [N, N]])),    # exactly 75 %: kept
    (0.76, ids([[0, N], [N, N]], [[0, N], [N, N]])),
    (1.0, ids([[0, N], [N, N]], [[0, N], [N, N]])),     # only full coverage
])
def test_threshold_edges(threshold: float, expected: torch.Tensor) -> None:
    assert torch.equal(token_object_ids(dit_like_masks(), (2, 2, 2), threshold=threshold),
                       expected)


def unet_masks() -> torch.Tensor:
    """[K=2, T=2, H=8, W=8]; the U-Net keeps every frame (temporal factor 1)."""
    m = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    m[0, :, 0:4, 0:6] = True  # 4 x 6 rectangle in both frames
    m[1, 0, 6:8, :] = True    # bottom two rows, frame 0 only
    return m


def test_area_rule_on_the_unet_grids() -> None:
    masks = unet_masks()
    fine = token_object_ids(masks, grid=(2, 4, 4))  # 2 x 2 pixels per token
    assert torch.equal(fine, ids(
        [[0, 0, 0, N], [0, 0, 0, N], [N, N, N, N], [1, 1, 1, 1]],
        [[0, 0, 0, N], [0, 0, 0, N], [N, N, N, N], [N, N, N, N]]))
    mid = token_object_ids(masks, grid=(2, 2, 2))  # 4 x 4 pixels: cols 4-5 are 50 % object 0
    assert torch.equal(mid, ids([[0, 0], [1, 1]], [[0, 0], [N, N]]))
    coarse = token_object_ids(masks, grid=(2, 1, 1))  # 37.5 % and 25 %: nobody at 0.5
    assert torch.equal(coarse, ids([[N]], [[N]]))
    # At 0.25 both objects qualify in frame 0: the lower index wins.
    assert torch.equal(token_object_ids(masks, (2, 1, 1), threshold=0.25), ids([[0]], [[0]]))
    # Downsampling the finest ids gives the same coarser grid here.
    assert torch.equal(downsample_token_ids(fine, (1, 2, 2)), mid)
    assert torch.equal(downsample_token_ids(fine, (1, 4, 4)), coarse)


def test_overlap_lower_index_wins_by_visible_area() -> None:
    """Painter's rule of the trajectory video: object 0 is on top of object 1."""
    m = torch.zeros(2, 1, 2, 6, dtype=torch.bool)  # three tokens of 2 x 2 pixels
    m[1] = True                       # object 1 everywhere
    m[0, 0, :, 0:2] = True            # token 0: object 0 hides all of object 1
    m[0, 0, 0, 2:4] = True            # token 1: 50 % / 50 %: tie -> lower index
    m[0, 0, 0, 4] = True              # token 2: object 0 25 %, object 1 visible 75 %
    assert torch.equal(token_object_ids(m, (1, 1, 3)), ids([[0, 0, 1]]))
    # The same order rule as rendering: per-pixel ids equal the trajectory video's ids.
    pixel = token_object_ids(m, (1, 2, 6))
    video = render_trajectory([m[0].numpy(), m[1].numpy()])
    assert np.array_equal(pixel.numpy(), trajectory_to_object_ids(video))


def test_box_rule_uses_each_frames_bounding_box() -> None:
    m = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    m[0, 0, 0, 0] = m[0, 0, 3, 3] = True  # frame 0: two corners -> box rows/cols 0-3
    m[0, 1, 4:6, 4:6] = True              # frame 1: a 2 x 2 square -> its own box
    assert torch.equal(token_object_ids(m, (2, 2, 2)), ids([[N, N], [N, N]],
                                                           [[N, N], [N, N]]))
    box = token_object_ids(m, (2, 2, 2), rule="box")
    assert torch.equal(box, ids([[0, N], [N, N]], [[N, N], [N, N]]))
    fine = token_object_ids(m, (2, 4, 4), rule="box")
    assert torch.equal(fine, ids([[0, 0, N, N], [0, 0, N, N], [N, N, N, N], [N, N, N, N]],
                                 [[N, N, N, N], [N, N, N, N], [N, N, 0, N], [N, N, N, N]]))
    boxes = bounding_boxes(m)
    assert boxes[0, 0, 0:4, 0:4].all() and boxes[0, 0].sum() == 16
    assert bounding_boxes(torch.zeros(3, 5, 5)).sum() == 0  # empty frame stays empty


def test_temporal_blocks_span_frames() -> None:
    m = torch.zeros(1, 4, 2, 2, dtype=torch.bool)
    m[0, 1] = True  # present in one frame of the first 2-frame block -> 50 %
    m[0, 2:4] = True
    assert torch.equal(token_object_ids(m, (2, 1, 1)), ids([[0]], [[0]]))
    assert torch.equal(token_object_ids(m, (2, 1, 1), threshold=0.6), ids([[N]], [[0]]))
    assert torch.equal(token_object_ids(m, (4, 1, 1)), ids([[N]], [[0]], [[0]], [[0]]))


def test_batched_layouts_numpy_and_soft_masks() -> None:
    batch = torch.stack([dit_like_masks(), dit_like_masks().flip(-1)])
    got = token_object_ids(batch.numpy(), (2, 2, 2))
    assert got.shape == (2, 2, 2, 2)
    assert torch.equal(got[0], token_object_ids(dit_like_masks(), (2, 2, 2)))
    assert torch.equal(got[1], token_object_ids(dit_like_masks(), (2, 2, 2)).flip(-1))
    soft = torch.full((1, 1, 2, 2), 0.5)  # half an object everywhere: exactly 50 %
    assert torch.equal(token_object_ids(soft, (1, 1, 1)), ids([[0]]))
    assert torch.equal(token_object_ids(soft * 0.99, (1, 1, 1)), ids([[N]]))
    empty = torch.zeros(0, 2, 4, 4, dtype=torch.bool)  # a clip without objects
    assert torch.equal(token_object_ids(empty, (2, 2, 2)), torch.full((2, 2, 2), N))


def test_downsample_ties_threshold_and_batches() -> None:
    fine = ids([[0, 1], [0, 1]], [[2, 2], [N, 2]])  # [T=2, H=2, W=2]
    assert torch.equal(downsample_token_ids(fine, (1, 2, 2)), ids([[0]], [[2]]))  # 0/1 tie
    assert torch.equal(downsample_token_ids(fine, (1, 2, 2), threshold=0.75),
                       ids([[N]], [[2]]))
    assert torch.equal(downsample_token_ids(fine, (2, 2, 2)), ids([[N]]))  # 2 has 3/8
    batched = torch.stack([fine, torch.full_like(fine, N)])
    assert torch.equal(downsample_token_ids(batched, (1, 2, 2))[1], ids([[N]], [[N]]))


def test_invalid_sizes_and_arguments_raise() -> None:
    masks = dit_like_masks()
    with pytest.raises(ValueError, match="not divisible by the token grid"):
        token_object_ids(masks, (3, 2, 2))
    with pytest.raises(ValueError, match="not divisible by the token grid"):
        token_object_ids(masks, (2, 3, 2))
    with pytest.raises(ValueError, match="threshold"):
        token_object_ids(masks, (2, 2, 2), threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        downsample_token_ids(torch.zeros(2, 4, 4, dtype=torch.long), (1, 2, 2), threshold=1.5)
    with pytest.raises(ValueError, match="rule"):
        token_object_ids(masks, (2, 2, 2), rule="hull")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[K, T, H, W\]"):
        token_object_ids(masks[0, 0], (1, 2, 2))
    with pytest.raises(ValueError, match="not divisible by factor"):
        downsample_token_ids(torch.zeros(2, 6, 4, dtype=torch.long), (1, 4, 2))
    with pytest.raises(ValueError, match="integer"):
        downsample_token_ids(torch.zeros(2, 4, 4), (1, 2, 2))
