"""The training-shard schema: what a published dataset version holds, column by column.

Schema version ``ttm-shards/1``. One row per clip that passed the filters (``data/``); rows that
did not, with their scores and reason, are kept beside them (``rejects/``) so thresholds can
be re-applied without running a model.

| column | type | meaning |
|---|---|---|
| clip_id | string | ``<video_id>-<start>-<end>``, unique in a version |
| video_id | string | content hash of the source video |
| source_uri | string | where the source video is (URI or path) |
| start_frame, end_frame | int64 | the clip's span in source frames, ``[start, end)`` |
| frame_indices | list<int64> | source frame index of every sampled frame |
| clip_fps, src_fps | float64 | sampling fps of the clip, fps of the source |
| num_frames | int64 | sampled frames in the clip |
| src_height, src_width | int64 | source frame size (masks are stored at this size) |
| caption | string | global prompt c |
| c_motion | string | motion-only prompt |
| c_local | list<struct<name, prompt, color_index>> | per-object prompts and their colour slot |
| masks | list<struct<name, color_index, rle: list<RLE>>> | COCO RLE per object per frame |
| mask_source | string | ``sam2`` or ``gt`` |
| boxes | list<struct<name, box, score>> | first-frame boxes (x0, y0, x1, y1, source px) |
| score_temporal_min | float64 | the omega score: min CLIP cosine similarity of neighbours |
| score_temporal_mean | float64 | mean of the same |
| object_scores | list<OBJECT_SCORES> | persistence, motion, IoU gap, confidence |
| filter_failed | list<string> | thresholds the row failed (empty for kept rows) |
| colour_table_version | string | version of the trajectory colour table |
| versions | map<string, string> | models and prompt templates that produced the row |
| clip_bytes | binary (nullable) | optional: the clip re-encoded (mp4) at the first target size |

Readers must go through :mod:`ttm_ray.dataset.versions`, which only opens published versions.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "ttm-shards/1"

OBJECT_PROMPT = pa.struct([("name", pa.string()), ("prompt", pa.string())])
LOCAL_PROMPT = pa.struct([("name", pa.string()), ("prompt", pa.string()),
                          ("color_index", pa.int64())])
RLE = pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])
OBJECT_BOX = pa.struct([("name", pa.string()), ("box", pa.list_(pa.float64())),
                        ("score", pa.float64())])
DROPPED_OBJECT = pa.struct([("name", pa.string()), ("reason", pa.string())])
OBJECT_MASKS = pa.struct([("name", pa.string()), ("color_index", pa.int64()),
                          ("rle", pa.list_(RLE))])
OBJECT_SCORES = pa.struct([
    ("name", pa.string()),
    ("persistence", pa.float64()),  # fraction of sampled frames where the object is visible
    ("centroid_motion", pa.float64()),  # mean centroid displacement per frame / frame diagonal
    ("motion_iou_gap", pa.float64()),  # 1 - IoU(first mask, last mask)
    ("track_confidence", pa.float64()),  # SAM2's mean object score (null for GT masks)
])

SHARD_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("video_id", pa.string()),
        ("source_uri", pa.string()),
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),
        ("frame_indices", pa.list_(pa.int64())),
        ("clip_fps", pa.float64()),
        ("src_fps", pa.float64()),
        ("num_frames", pa.int64()),
        ("src_height", pa.int64()),
        ("src_width", pa.int64()),
        ("caption", pa.string()),
        ("c_motion", pa.string()),
        ("c_local", pa.list_(LOCAL_PROMPT)),
        ("masks", pa.list_(OBJECT_MASKS)),
        ("mask_source", pa.string()),
        ("boxes", pa.list_(OBJECT_BOX)),
        ("score_temporal_min", pa.float64()),
        ("score_temporal_mean", pa.float64()),
        ("object_scores", pa.list_(OBJECT_SCORES)),
        ("filter_failed", pa.list_(pa.string())),
        ("colour_table_version", pa.string()),
        ("versions", pa.map_(pa.string(), pa.string())),
        ("clip_bytes", pa.binary()),
    ],
    metadata={b"schema_version": SCHEMA_VERSION.encode()},
)
