"""The row every data-prep stage reads and writes.

A row is a plain ``dict`` whose keys are the columns of :data:`ROW_SCHEMA`. Every stage takes a
batch of rows (``list[dict]``) and returns a batch of rows, so stages run in-process in tests
and unchanged inside Ray Data (``pipeline.py`` adapts them to Arrow batches with this schema).

Errors are data, not exceptions: a stage that cannot handle a row returns it with
``status == "rejected"`` plus the stage, a reason from :data:`REJECT_REASONS` and a detail
(the raw LLM answer, the decoder error, ...). Later stages pass rejected rows through untouched,
and the writer splits them into the rejects table. So every input ends as clip rows or a reject.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from ttm_ray.dataset.schema import (
    DROPPED_OBJECT,
    OBJECT_BOX,
    OBJECT_MASKS,
    OBJECT_PROMPT,
    OBJECT_SCORES,
)

OK = "ok"
REJECTED = "rejected"

#: Why a row was rejected. A stage may only use these (tests check every reject has one).
REJECT_REASONS = {
    "unreadable_input": "the input file could not be read (missing, permission, I/O error)",
    "unreadable_video": "the file is not a decodable video (corrupt, truncated, not a video)",
    "bad_manifest_entry": "a manifest entry could not be used (no path/uri, malformed line/field)",
    "too_short": "the video has fewer frames than the clip policy needs",
    "too_small": "the video would need more upscaling than clip.max_upscale allows",
    "caption_failed": "no caption could be produced (engine error or empty answer)",
    "unparseable_llm_output": "the LLM answer did not parse after all retries",
    "no_objects": "the local-prompt answer named no object",
    "prompts_failed": "no motion/object prompts: the LLM engine failed on every attempt, or "
                      "the input brought none (or invalid ones) in manifest mode",
    "no_object_grounded": "Grounding DINO found no box for any object name on frame 0",
    "segmentation_failed": "mask propagation failed or produced no usable mask",
    "no_gt_masks": "the GT mask source was chosen but the input has no usable annotation",
    "filtered": "a quality filter (omega temporal consistency, trajectory scores) rejected it",
    "stage_error": "an unexpected error inside a stage (a bug: see detail)",
}

# The struct types are the dataset format's (training reads the same structs).
ROW_SCHEMA = pa.schema(
    [
        # identity and status
        ("video_id", pa.string()),
        ("source_uri", pa.string()),
        ("clip_id", pa.string()),
        ("status", pa.string()),
        ("reject_stage", pa.string()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
        # what the input brought with it (manifests; the generated corpus; SA-V-128)
        ("given_caption", pa.string()),
        ("given_motion_prompt", pa.string()),
        ("given_object_prompts", pa.list_(OBJECT_PROMPT)),
        ("annotation_uri", pa.string()),
        # probe
        ("src_bytes", pa.int64()),
        ("src_fps", pa.float64()),
        ("src_num_frames", pa.int64()),
        ("src_height", pa.int64()),
        ("src_width", pa.int64()),
        # clip
        ("clip_index", pa.int64()),
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),
        ("frame_indices", pa.list_(pa.int64())),
        ("clip_fps", pa.float64()),
        ("num_frames", pa.int64()),
        # caption (global prompt c)
        ("caption", pa.string()),
        ("caption_engine", pa.string()),
        ("caption_model", pa.string()),
        ("caption_prompt_version", pa.string()),
        # LLM prompts (c_motion, c_local)
        ("c_motion", pa.string()),
        ("c_local", pa.list_(OBJECT_PROMPT)),
        ("prompts_engine", pa.string()),
        ("prompts_model", pa.string()),
        ("motion_prompt_version", pa.string()),
        ("local_prompt_version", pa.string()),
        ("llm_raw_motion", pa.string()),
        ("llm_raw_local", pa.string()),
        ("llm_attempts", pa.int64()),
        # grounding (first-frame boxes, one per local-prompt object name)
        ("boxes", pa.list_(OBJECT_BOX)),
        ("dropped_objects", pa.list_(DROPPED_OBJECT)),
        ("grounding_model", pa.string()),
        # mask trajectories
        ("masks", pa.list_(OBJECT_MASKS)),
        ("mask_source", pa.string()),  # "sam2" | "gt"
        ("mask_model", pa.string()),
        # scores (all stored, so filters can be re-applied without any model)
        ("score_temporal_min", pa.float64()),  # omega score: min CLIP cos-sim of neighbours
        ("score_temporal_mean", pa.float64()),
        ("score_model", pa.string()),
        ("object_scores", pa.list_(OBJECT_SCORES)),
        ("filter_failed", pa.list_(pa.string())),  # names of failed thresholds (empty: kept)
    ]
)

COLUMNS = tuple(ROW_SCHEMA.names)


def new_row(**fields: Any) -> dict:
    """A row with every column present (``None`` where unknown) and status ``ok``."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not row columns: {sorted(unknown)}")
    row = dict.fromkeys(COLUMNS)
    row["status"] = OK
    row.update(fields)
    return row


def is_rejected(row: dict) -> bool:
    return row.get("status") == REJECTED


def reject(row: dict, stage: str, reason: str, detail: str = "") -> dict:
    """A copy of ``row`` marked rejected by ``stage`` for ``reason`` (one of REJECT_REASONS)."""
    if reason not in REJECT_REASONS:
        raise ValueError(f"unknown reject reason {reason!r}; add it to REJECT_REASONS")
    out = dict(row)
    out.update(status=REJECTED, reject_stage=stage, reject_reason=reason,
               reject_detail=str(detail)[:20_000])
    return out


def bug_reject(row: dict, stage: str, limit: int = 8) -> dict:
    """Reject ``row`` as ``stage_error`` with the current exception's traceback."""
    return reject(row, stage, "stage_error", traceback.format_exc(limit=limit))


def map_rows(
    rows: list[dict],
    stage: str,
    fn: Callable[[dict], dict | list[dict]],
    expected: Mapping[type[BaseException], str] | None = None,
    on_reject: Callable[[dict], dict] | None = None,
) -> list[dict]:
    """The per-row loop of a stage that handles one row at a time.

    Rejected rows pass through untouched; ``fn`` returns a row or a list of rows (fan-out);
    an exception of a type in ``expected`` rejects the row with the mapped reason and the
    message; any other exception is a bug and rejects only that row as ``stage_error`` with
    its traceback, so the rest of the batch goes on. ``on_reject`` can fill fields a reject
    row needs (e.g. an id) before it is written.
    """
    fix = on_reject or (lambda r: r)
    out: list[dict] = []
    for row in rows:
        if is_rejected(row):
            out.append(row)
            continue
        try:
            result = fn(row)
        except Exception as exc:
            reason = next((r for t, r in (expected or {}).items() if isinstance(exc, t)), None)
            if reason is None:
                out.append(bug_reject(fix(row), stage))
            else:
                out.append(reject(fix(row), stage, reason, str(exc)))
            continue
        out.extend(result if isinstance(result, list) else [result])
    return out


def to_table(rows: list[dict]) -> pa.Table:
    """Rows -> an Arrow table with exactly :data:`ROW_SCHEMA` (missing keys become null)."""
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=ROW_SCHEMA)
