"""The row every data-prep stage reads and writes.

A row is a plain ``dict`` whose keys are the columns of :data:`ROW_SCHEMA`. Every stage takes a
batch of rows (``list[dict]``) and returns a batch of rows, so stages run in-process in tests
and unchanged inside Ray Data (``pipeline.py`` adapts them to Arrow batches with this schema).

Errors are data, not exceptions: a stage that cannot handle a row returns it with
``status == "rejected"`` plus the stage, a reason from :data:`REJECT_REASONS` and a detail
(the raw LLM answer, the decoder error, ...). Later stages pass rejected rows through untouched,
and the writer splits them into the rejects table. So every input ends as clip rows or a reject.

Each reason is *permanent* (the input's fault: a rerun rejects it again) or *transient* (the
run's fault: a rerun may pass; :func:`reject_class`). Exceptions map to reasons in one place
(:data:`ERRORS`, :func:`reason_for`), used by :func:`map_rows` and by the batch stages through
:func:`reject_error` / :func:`reject_batch`, so a missing file or a CUDA out-of-memory gets the
same reason in every stage. :func:`to_table` never fails on a value Arrow cannot store: that
row alone becomes an ``unencodable_value`` reject.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pyarrow as pa

from data_prep.engines.base import EngineError
from ttm_ray.dataset.schema import (
    DROPPED_OBJECT,
    OBJECT_BOX,
    OBJECT_MASKS,
    OBJECT_PROMPT,
    OBJECT_SCORES,
)
from ttm_ray.dataset.video import InputNotReadable, VideoReadError

OK = "ok"
REJECTED = "rejected"

PERMANENT = "permanent"
TRANSIENT = "transient"
RejectClass = Literal["permanent", "transient"]

#: Why a row was rejected. A stage may only use these (tests check every reject has one).
#: Each reason has exactly one class (:func:`reject_class`): *permanent* reasons are facts
#: about the input (a rerun with the same config rejects it again, so it is not retried);
#: *transient* ones (:data:`TRANSIENT_REASONS`) are faults of the run (a rerun may not hit
#: them, so the pipeline's skip-done step retries them and counts ``attempts``). A cause
#: that can be either (a missing file vs a network hiccup) gets two reasons, never one.
REJECT_REASONS: dict[str, str] = {
    # ---- permanent: the input itself
    "bad_manifest_entry": "a manifest entry could not be used (no path/uri, malformed line/field)",
    "duplicate_input": "the manifest names the same input again; the first entry is processed "
                       "(detail: which entries)",
    "unreadable_input": "the input cannot be read: missing, permission denied, not a file, "
                        "or a URI no filesystem driver handles",
    "unreadable_video": "the file is not a decodable video (corrupt, truncated, not a video)",
    "too_short": "the video has fewer frames than the clip policy needs",
    "too_small": "the video would need more upscaling than clip.max_upscale allows",
    "low_fps": "the video's frame rate is so far below clip.fps that clips would repeat "
               "frames more than clip.max_frame_repeat allows",
    "caption_failed": "the caption model answered, but no answer was a usable caption after "
                      "all attempts (empty), or manifest mode found no given caption",
    "unparseable_llm_output": "the LLM answer did not parse after all retries",
    "no_objects": "the local-prompt answer named no object",
    "prompts_failed": "manifest mode: the input brought no (or invalid) motion/object prompts",
    "no_object_grounded": "Grounding DINO found no box for any object name on frame 0",
    "segmentation_failed": "no box to track, or every propagated mask is empty",
    "no_gt_masks": "the GT mask source was chosen but the input has no usable annotation",
    "filtered": "a quality filter (omega temporal consistency, trajectory scores) rejected it",
    "unencodable_value": "a value of the row cannot be stored in its Arrow column (e.g. a "
                         "string with a lone surrogate, a wrong type); detail: column and value",
    # ---- transient: the run, not the input
    "remote_read_error": "reading the input (or a file it names) failed with an I/O error that "
                         "is not a missing file: network, timeout, throttling, a flaky mount",
    "engine_error": "the LLM/VLM engine failed on every attempt (raised, crashed, wrong number "
                    "of answers): the model never answered",
    "out_of_memory": "CUDA (or host) memory ran out while handling this row's batch",
    "worker_crashed": "a worker process died natively (abort, segfault, OOM kill) while "
                      "handling the row; the pipeline assigns it",
    "stage_error": "an unexpected error inside a stage (a bug, or a model raising: see the "
                   "traceback in detail)",
}

#: The reasons a rerun may not hit (see :data:`REJECT_REASONS`); every other one is permanent.
TRANSIENT_REASONS: frozenset[str] = frozenset(
    {"remote_read_error", "engine_error", "out_of_memory", "worker_crashed", "stage_error"})


def reject_class(reason: str) -> RejectClass:
    """``"transient"`` (a rerun may pass) or ``"permanent"`` for a reason of REJECT_REASONS."""
    if reason not in REJECT_REASONS:
        raise ValueError(f"unknown reject reason {reason!r}; add it to REJECT_REASONS")
    return TRANSIENT if reason in TRANSIENT_REASONS else PERMANENT


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
        # How many runs have processed this row (null = 1). The pipeline's skip-done step
        # raises it when it retries a transient reject (see TRANSIENT_REASONS).
        ("attempts", pa.int64()),
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
        ("video_clips", pa.int64()),  # clips cut from the video (its clip rows all say so)
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


def is_transient_reject(row: dict) -> bool:
    """A reject a rerun may not hit (its reason is in :data:`TRANSIENT_REASONS`)."""
    return is_rejected(row) and row.get("reject_reason") in TRANSIENT_REASONS


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


# ----------------------------------------------------------------------------- exceptions
#: Exception type -> reject reason, shared by every stage (one vocabulary, so "a missing file"
#: is ``unreadable_input`` whichever stage meets it). The first ``isinstance`` match wins, so
#: a subclass comes before its base. Not listed: CUDA out-of-memory (matched by class name in
#: :func:`is_out_of_memory`, so this module never imports torch) and the fallback
#: ``stage_error``. An :class:`InputNotReadable` is classified by the ``OSError`` it wraps.
ERRORS: dict[type[BaseException], str] = {
    EngineError: "engine_error",
    InputNotReadable: "unreadable_input",
    VideoReadError: "unreadable_video",
    # An OSError saying the file is not there (or not ours) stays so: permanent ...
    FileNotFoundError: "unreadable_input",
    PermissionError: "unreadable_input",
    IsADirectoryError: "unreadable_input",
    NotADirectoryError: "unreadable_input",
    # ... any other one (connection reset, timeout, throttling, EIO on a mount) may pass.
    OSError: "remote_read_error",
    MemoryError: "out_of_memory",
}

# torch.cuda.OutOfMemoryError (and torch.OutOfMemoryError, its alias since torch 2.5).
_OOM_CLASS_NAMES = frozenset({"OutOfMemoryError"})
# What torch < 1.13 (a plain RuntimeError) and CUDA libraries say when memory runs out.
_OOM_MESSAGES = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA or host out-of-memory, recognised without importing torch."""
    if isinstance(exc, MemoryError) or any(
            c.__name__ in _OOM_CLASS_NAMES for c in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def free_cuda_memory(exc: BaseException) -> None:
    """After an out-of-memory, hand PyTorch's cached blocks back so the next batch can fit.

    torch comes from ``sys.modules``: a process that never imported it has no CUDA cache.
    """
    torch = sys.modules.get("torch")
    if torch is not None and is_out_of_memory(exc) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _lookup(exc: BaseException, errors: Mapping[type[BaseException], str]) -> str | None:
    return next((r for t, r in errors.items() if isinstance(exc, t)), None)


def reason_for(exc: BaseException,
               stage_specific: Mapping[type[BaseException], str] | None = None) -> str:
    """The reject reason for ``exc``: the stage's own mapping first (its exception types
    mean something there, e.g. ``ValueError`` from a URI parser is ``unreadable_input`` in
    ingest and a bug elsewhere), then out-of-memory, then :data:`ERRORS`; else ``stage_error``.
    """
    reason = _lookup(exc, stage_specific or {})
    if reason is not None:
        return reason
    if is_out_of_memory(exc):
        return "out_of_memory"
    if isinstance(exc, InputNotReadable) and isinstance(exc.__cause__, OSError):
        # Video() wraps every OSError: missing (permanent) and hiccup (transient) alike.
        return _lookup(exc.__cause__, ERRORS) or "unreadable_input"
    return _lookup(exc, ERRORS) or "stage_error"


def error_detail(exc: BaseException, reason: str, limit: int = 8) -> str:
    """What a reject for ``exc`` says: the traceback where it helps find the cause (a bug, an
    out-of-memory), else the message; builtin exceptions get their type name in front (the
    project's own exceptions already say what happened)."""
    if reason in ("stage_error", "out_of_memory"):
        return "".join(traceback.format_exception(exc, limit=limit))
    if type(exc).__module__.partition(".")[0] in ("data_prep", "ttm_ray"):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def reject_error(row: dict, stage: str, exc: BaseException,
                 stage_specific: Mapping[type[BaseException], str] | None = None,
                 limit: int = 8) -> dict:
    """``row`` rejected by ``stage`` because handling it raised ``exc`` (see :func:`reason_for`)."""
    reason = reason_for(exc, stage_specific)
    return reject(row, stage, reason, error_detail(exc, reason, limit))


def reject_batch(rows: list[dict], stage: str, exc: BaseException,
                 stage_specific: Mapping[type[BaseException], str] | None = None,
                 limit: int = 8) -> list[dict]:
    """Every not yet rejected row of ``rows`` rejected for ``exc`` (a failure of the whole
    batch, e.g. a model's forward pass); rows already rejected pass through untouched."""
    reason = reason_for(exc, stage_specific)
    detail = error_detail(exc, reason, limit)
    return [r if is_rejected(r) else reject(r, stage, reason, detail) for r in rows]


def map_rows(
    rows: list[dict],
    stage: str,
    fn: Callable[[dict], dict | list[dict]],
    expected: Mapping[type[BaseException], str] | None = None,
    on_reject: Callable[[dict], dict] | None = None,
) -> list[dict]:
    """The per-row loop of a stage that handles one row at a time.

    Rejected rows pass through untouched; ``fn`` returns a row or a list of rows (fan-out).
    An exception rejects only that row, with the reason :func:`reason_for` gives (``expected``
    is the stage-specific mapping; a bug ends as ``stage_error`` with its traceback), so the
    rest of the batch goes on. ``on_reject`` can fill fields a reject row needs (e.g. an id)
    before it is written.
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
            out.append(reject_error(fix(row), stage, exc, expected))
            continue
        out.extend(result if isinstance(result, list) else [result])
    return out


# ----------------------------------------------------------------------------- to Arrow
#: A reject must still say which input it was: these keep an escaped value, never null.
IDENTITY_COLUMNS = ("video_id", "source_uri", "clip_id")
_REPR_KEEP = 300  # characters of a bad value's repr kept in the detail


def to_table(rows: list[dict], stage: str = "encode") -> pa.Table:
    """Rows -> an Arrow table with exactly :data:`ROW_SCHEMA` (missing keys become null).

    Never raises on a value: a row Arrow cannot encode (a lone surrogate from a manifest, a
    wrong type) becomes an ``unencodable_value`` reject by ``stage`` naming the column and
    the value, and the other rows are kept as they are. One bad input must not fail the
    batch (and with it every other row of the block).
    """
    records = [{c: r.get(c) for c in COLUMNS} for r in rows]
    try:  # the fast path: one conversion of the whole batch
        return pa.Table.from_pylist(records, schema=ROW_SCHEMA)
    except Exception:
        pass
    return pa.Table.from_pylist(_encodable(records, stage), schema=ROW_SCHEMA)


def _encodes(records: list[dict]) -> bool:
    try:
        pa.Table.from_pylist(records, schema=ROW_SCHEMA)
    except Exception:
        return False
    return True


def _encodable(records: list[dict], stage: str) -> list[dict]:
    """``records`` with each row that does not encode replaced by its reject: halves are
    tried in turn, so a few bad rows in a large batch cost a few conversions, not one a row."""
    if _encodes(records):
        return records
    if len(records) == 1:
        return [_unencodable_reject(records[0], stage)]
    mid = len(records) // 2
    return _encodable(records[:mid], stage) + _encodable(records[mid:], stage)


def _value_encodes(value: Any, column: str) -> bool:
    try:
        pa.array([value], type=ROW_SCHEMA.field(column).type)
    except Exception:
        return False
    return True


def escape_text(value: Any) -> str | None:
    """``value`` as a string UTF-8 can encode: lone surrogates become ``\\udXXX`` escapes."""
    if value is None:
        return None
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _unencodable_reject(record: dict, stage: str) -> dict:
    bad = [c for c in COLUMNS if not _value_encodes(record[c], c)]
    parts = [f"column {c} cannot hold {ascii(record[c])[:_REPR_KEEP]}" for c in bad]
    if not parts:
        parts = ["the row does not encode, though each value does on its own"]
    if is_rejected(record):  # say what it was before, in a form that encodes
        parts.append(f"it was already rejected by {record.get('reject_stage')!a} for "
                     f"{record.get('reject_reason')!a}")
    fixed = dict(record)
    for c in bad:  # identity is escaped (who it was must survive), anything else dropped
        fixed[c] = escape_text(record[c]) if c in IDENTITY_COLUMNS else None
    out = reject(fixed, stage, "unencodable_value", "; ".join(parts))
    if _encodes([out]):
        return out
    # Nothing found column by column: keep only who it was and why.
    bare = dict.fromkeys(COLUMNS)
    bare.update({c: escape_text(record[c]) for c in IDENTITY_COLUMNS})
    return reject(bare, stage, "unencodable_value", out["reject_detail"])
