"""Conditioning shared by both model families and data prep: plain PyTorch/numpy, no Ray.

``trajectory``: the colour table and mask <-> trajectory-video rendering. Later modules here
(masks -> token object ids, masked attention, text encoders, autoencoders) are imported from
their own modules so importing this package stays cheap.
"""

from ttm_ray.conditioning.trajectory import (
    COLOUR_TABLE,
    COLOUR_TABLE_VERSION,
    NUM_COLOURS,
    overlay,
    render_from_rle,
    render_trajectory,
    trajectory_to_object_ids,
)

__all__ = [
    "COLOUR_TABLE",
    "COLOUR_TABLE_VERSION",
    "NUM_COLOURS",
    "overlay",
    "render_from_rle",
    "render_trajectory",
    "trajectory_to_object_ids",
]
