"""Quality filters over stored scores: no model here, so thresholds can change at any time.

The score stage stores every score on the row; this module only compares them with
thresholds. :class:`FilterStage` runs inside the pipeline; :func:`refilter_rows` re-applies
(new) thresholds to rows that were scored earlier, formerly kept and formerly filtered alike,
without decoding a frame or loading a model.

Thresholds (each null or unset = off) and how per-object scores make one clip decision:

* ``omega``: ``score_temporal_min >= omega`` (the paper's 0.955; see the method notes).
* ``min_temporal_mean``: ``score_temporal_mean >= min_temporal_mean``.
* ``min_objects`` / ``max_objects``: the number of objects in ``object_scores`` (null: 0).
* ``min_persistence``: *every* object is visible in at least that fraction of frames (a
  local prompt whose object vanishes has no pixels to bind to).
* ``min_motion``: *some* object's ``centroid_motion`` reaches it (rejects static clips; a
  static object beside a moving one is fine).
* ``max_motion``: *every* object's ``centroid_motion`` stays below it (catches track jumps).
* ``min_track_confidence``: every object that has a confidence (null for GT masks) reaches it.

A score a threshold needs but the row lacks (null: not computed) fails that threshold unless
``on_missing: pass``. Per-object scores that are null (fewer than two visible frames) are
skipped; if no object has the score, it counts as missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from data_prep.rows import OK, is_rejected, reject
from ttm_ray.config import constrained

STAGE = "filter"
FILTERED = "filtered"


@dataclass
class FilterConfig:
    enabled: bool = constrained(True, help="false: the stage passes rows through unfiltered")
    omega: float | None = constrained(
        0.955, ge=0.0, le=1.0,
        help="keep iff the min CLIP cosine similarity of consecutive frames is >= omega")
    min_temporal_mean: float | None = constrained(
        None, ge=-1.0, le=1.0, help="keep iff the mean consecutive-frame similarity is >= this")
    min_objects: int = constrained(1, ge=0, help="keep iff the clip has at least this many "
                                   "objects with masks")
    max_objects: int | None = constrained(None, ge=0, help="keep iff at most this many objects")
    min_persistence: float | None = constrained(
        None, ge=0.0, le=1.0, help="every object visible in at least this fraction of frames")
    min_motion: float | None = constrained(
        None, ge=0.0, help="some object's centroid moves at least this much per frame "
        "(fraction of the frame diagonal)")
    max_motion: float | None = constrained(
        None, ge=0.0, help="no object's centroid moves more than this per frame")
    min_track_confidence: float | None = constrained(
        None, ge=0.0, le=1.0, help="every object with a tracker confidence reaches this")
    on_missing: Literal["fail", "pass"] = constrained(
        "fail", help="a threshold whose score the row lacks: fail it, or let it pass")

    def validate(self) -> None:
        if (self.max_objects is not None and self.max_objects < self.min_objects):
            raise ValueError(f"max_objects ({self.max_objects}) < min_objects "
                             f"({self.min_objects})")
        if (self.min_motion is not None and self.max_motion is not None
                and self.max_motion < self.min_motion):
            raise ValueError(f"max_motion ({self.max_motion}) < min_motion ({self.min_motion})")


class Failure(NamedTuple):
    """One failed threshold: its config name and a readable account with the values."""

    name: str
    detail: str


def _objects(row: dict) -> list[dict]:
    return list(row.get("object_scores") or [])


def _values(row: dict, key: str) -> list[tuple[str, float]]:
    return [(o.get("name") or "?", float(o[key])) for o in _objects(row) if o.get(key) is not None]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _check_clip_score(row: dict, cfg: FilterConfig, name: str, column: str) -> str | None:
    threshold = getattr(cfg, name)
    value = row.get(column)
    if value is None:
        return None if cfg.on_missing == "pass" else f"{column} is missing (need >= {threshold})"
    if value < threshold:
        return f"{column}={_fmt(value)} < {threshold}"
    return None


def _check_every(row: dict, cfg: FilterConfig, name: str, key: str, above: bool) -> str | None:
    threshold = getattr(cfg, name)
    values = _values(row, key)
    if not values:
        return None if cfg.on_missing == "pass" else f"no object has {key} (need {threshold})"
    bad = [(n, v) for n, v in values if (v < threshold if above else v > threshold)]
    if not bad:
        return None
    op = "<" if above else ">"
    return ", ".join(f"{n!r} {key}={_fmt(v)} {op} {threshold}" for n, v in bad)


def _check_min_motion(row: dict, cfg: FilterConfig) -> str | None:
    values = _values(row, "centroid_motion")
    if not values:
        return None if cfg.on_missing == "pass" else "no object has centroid_motion"
    best_name, best = max(values, key=lambda nv: nv[1])
    if best < cfg.min_motion:  # type: ignore[operator]
        return f"largest centroid_motion={_fmt(best)} ({best_name!r}) < {cfg.min_motion}"
    return None


def _check_count(row: dict, cfg: FilterConfig) -> list[Failure]:
    n = len(_objects(row))
    out = []
    if n < cfg.min_objects:
        out.append(Failure("min_objects", f"{n} objects < {cfg.min_objects}"))
    if cfg.max_objects is not None and n > cfg.max_objects:
        out.append(Failure("max_objects", f"{n} objects > {cfg.max_objects}"))
    return out


# (threshold name, check) in report order; a check runs only when its threshold is set.
_CHECKS: list[tuple[str, Callable[[dict, FilterConfig], str | None]]] = [
    ("omega", lambda r, c: _check_clip_score(r, c, "omega", "score_temporal_min")),
    ("min_temporal_mean",
     lambda r, c: _check_clip_score(r, c, "min_temporal_mean", "score_temporal_mean")),
    ("min_persistence", lambda r, c: _check_every(r, c, "min_persistence", "persistence", True)),
    ("min_motion", _check_min_motion),
    ("max_motion", lambda r, c: _check_every(r, c, "max_motion", "centroid_motion", False)),
    ("min_track_confidence",
     lambda r, c: _check_every(r, c, "min_track_confidence", "track_confidence", True)),
]


def check_filter(row: dict, cfg: FilterConfig) -> list[Failure]:
    """Every threshold ``row`` fails, with the values that failed it (empty: keep)."""
    failures = []
    for name, check in _CHECKS:
        if getattr(cfg, name) is None:
            continue
        detail = check(row, cfg)
        if detail is not None:
            failures.append(Failure(name, detail))
    return failures + _check_count(row, cfg)


def evaluate_filter(row: dict, cfg: FilterConfig) -> list[str]:
    """Names of the thresholds ``row`` fails (e.g. ``["omega", "min_persistence"]``)."""
    return [f.name for f in check_filter(row, cfg)]


def apply_filter(row: dict, cfg: FilterConfig) -> dict:
    """``row`` with ``filter_failed`` set; rejected as ``filtered`` if any threshold fails.

    All scores stay on the row either way, so a later :func:`refilter_rows` can revisit it.
    """
    failures = check_filter(row, cfg)
    out = dict(row, filter_failed=[f.name for f in failures])
    if not failures:
        return out
    return reject(out, STAGE, FILTERED, "; ".join(f"{f.name}: {f.detail}" for f in failures))


class FilterStage:
    """Rows in, rows out: failing rows become ``filtered`` rejects; others pass through."""

    def __init__(self, cfg: FilterConfig | None = None) -> None:
        self.cfg = cfg or FilterConfig()

    def __call__(self, rows: list[dict]) -> list[dict]:
        if not self.cfg.enabled:
            return list(rows)
        return [row if is_rejected(row) else apply_filter(row, self.cfg) for row in rows]


def was_filtered(row: dict) -> bool:
    return is_rejected(row) and row.get("reject_reason") == FILTERED


def refilter_rows(rows: Iterable[dict], cfg: FilterConfig) -> tuple[list[dict], list[dict]]:
    """Re-apply ``cfg`` to scored rows: ``(kept, rejected)``, no model and no decoding.

    Kept rows and ``filtered`` rejects are judged again from their stored scores: a formerly
    filtered row that now passes comes back with status ``ok`` and its reject fields cleared.
    Rows rejected for any other reason stay rejected, untouched. Input rows are not modified.
    ``cfg.enabled: false`` keeps every scored row (a formerly filtered one comes back too).
    """
    kept: list[dict] = []
    rejected: list[dict] = []
    for row in rows:
        if is_rejected(row) and not was_filtered(row):
            rejected.append(row)
            continue
        fresh = dict(row, status=OK, reject_stage=None, reject_reason=None, reject_detail=None)
        out = apply_filter(fresh, cfg) if cfg.enabled else dict(fresh, filter_failed=[])
        (rejected if is_rejected(out) else kept).append(out)
    return kept, rejected


__all__ = ["FILTERED", "Failure", "FilterConfig", "FilterStage", "apply_filter", "check_filter",
           "evaluate_filter", "refilter_rows", "was_filtered"]
