"""Turn the pipeline's work rows into a published, versioned dataset (and refilter one).

Publishing re-applies the filter thresholds of the config to *every* scored row, so the
version always matches the config, and an incremental run republishes old and new rows
together. ``--refilter`` does the same from an existing version's stored scores, with no model.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_prep.filtering import FilterConfig, refilter_rows
from data_prep.rows import COLUMNS, OK, REJECTED, ROW_SCHEMA, to_table
from ttm_ray.conditioning.trajectory import COLOUR_TABLE_VERSION
from ttm_ray.config import constrained
from ttm_ray.dataset.schema import SCHEMA_VERSION, SHARD_SCHEMA
from ttm_ray.dataset.versions import DatasetVersion, VersionWriter, open_version
from ttm_ray.dataset.video import read_frames, resize_center_crop, write_video

VERSION_COLUMNS = ("caption_model", "caption_prompt_version", "prompts_model",
                   "motion_prompt_version", "local_prompt_version", "grounding_model",
                   "mask_model", "score_model")


@dataclass
class PublishConfig:
    dataset_root: str | None = constrained(
        None, help="dataset root (versions/, latest); null: <run.root>/<run.name>/dataset")
    rows_per_file: int = constrained(10_000, gt=0, help="rows per training shard file")
    embed_clip_bytes: bool = constrained(
        False, help="also store each clip re-encoded at the first clip.resolutions size")
    keep_versions: int | None = constrained(
        None, gt=0, help="after publishing, delete all but the newest N versions")


def clip_bytes_encoder(height: int, width: int) -> Callable[[dict], bytes]:
    """``row -> mp4 bytes`` of the clip resized/cropped to ``height x width`` (the shared rule).

    For datasets that must not depend on the source videos staying where they are. Runs at
    publish time on the driver: fine for small datasets; at scale keep the URI+span default.
    """
    def encode(row: dict) -> bytes:
        frames = resize_center_crop(read_frames(row["source_uri"], row["frame_indices"]),
                                    height, width)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "clip.mp4"
            pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
            write_video(path, frames, row["clip_fps"] or 8.0, pix_fmt=pix_fmt)
            return path.read_bytes()

    return encode


def row_to_shard(row: dict, embed: bytes | None = None) -> dict:
    """A kept pipeline row as a training-shard row (SHARD_SCHEMA)."""
    masks = row.get("masks") or []
    colours = {m["name"]: m["color_index"] for m in masks}
    if masks:
        # An object whose mask was dropped (no box, empty mask) has no pixels: its prompt is
        # left out, so it can never take a colour slot that belongs to another object.
        local = [{"name": o["name"], "prompt": o["prompt"], "color_index": colours[o["name"]]}
                 for o in row.get("c_local") or [] if o["name"] in colours]
    else:  # a caption-only dataset (mask_source: none): prompts in their own order
        local = [{"name": o["name"], "prompt": o["prompt"], "color_index": i}
                 for i, o in enumerate(row.get("c_local") or [])]
    versions = {k: row[k] for k in VERSION_COLUMNS if row.get(k)}
    versions["colour_table"] = COLOUR_TABLE_VERSION
    shard = {name: row.get(name) for name in SHARD_SCHEMA.names}
    shard.update(c_local=local, versions=versions, colour_table_version=COLOUR_TABLE_VERSION,
                 clip_bytes=embed, filter_failed=row.get("filter_failed") or [])
    return shard


def shard_to_row(shard: dict) -> dict:
    """A shard row back in pipeline-row form (for refiltering a published version)."""
    row = dict.fromkeys(COLUMNS)
    row.update({k: v for k, v in shard.items() if k in row})
    row["c_local"] = [{"name": o["name"], "prompt": o["prompt"]} for o in shard["c_local"] or []]
    for key, value in dict(shard.get("versions") or []).items():
        if key in row:
            row[key] = value
    row["status"] = OK
    return row


def row_key(clip_id: str | None, video_id: str | None, source_uri: str | None) -> str:
    """The identity of a row in the work store and in a version: its clip, or for a
    whole-video reject (no clip) the video."""
    return clip_id or f"video:{video_id}:{source_uri}"


def dedupe(rows: list[dict]) -> list[dict]:
    """One row per clip (the last written wins); whole-video rejects keyed by video id."""
    by_key: dict[str, dict] = {}
    for r in rows:
        by_key[row_key(r["clip_id"], r["video_id"], r["source_uri"])] = r
    return list(by_key.values())


def _histogram_png(values: dict[str, list[float]], title: str, threshold: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for label, vals in values.items():
        if vals:
            ax.hist(vals, bins=30, alpha=0.6, label=f"{label} ({len(vals)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold}")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def build_card(kept: list[dict], rejected: list[dict], filt: FilterConfig,
               lineage: dict[str, Any]) -> dict[str, bytes]:
    """The dataset card: counts by reason and stage, score histograms (kept vs filtered)."""
    reasons = Counter(r["reject_reason"] for r in rejected)
    stages = Counter(r["reject_stage"] for r in rejected)
    filtered = [r for r in rejected if r["reject_reason"] == "filtered"]

    def scores(rows: list[dict], key: str) -> list[float]:
        return [r[key] for r in rows if r.get(key) is not None]

    def obj_scores(rows: list[dict], key: str) -> list[float]:
        return [o[key] for r in rows for o in r.get("object_scores") or []
                if o.get(key) is not None]

    files = {
        "card/omega.png": _histogram_png(
            {"kept": scores(kept, "score_temporal_min"),
             "filtered": scores(filtered, "score_temporal_min")},
            "temporal consistency (min CLIP cos-sim)", filt.omega),
        "card/persistence.png": _histogram_png(
            {"kept": obj_scores(kept, "persistence"),
             "filtered": obj_scores(filtered, "persistence")},
            "object persistence", filt.min_persistence),
        "card/motion.png": _histogram_png(
            {"kept": obj_scores(kept, "centroid_motion"),
             "filtered": obj_scores(filtered, "centroid_motion")},
            "object centroid motion", filt.min_motion),
    }
    lines = [
        f"# Dataset card ({SCHEMA_VERSION})", "",
        f"- kept clips: {len(kept)}",
        f"- rejected rows: {len(rejected)}",
        f"- objects per kept clip: {dict(Counter(len(r.get('c_local') or []) for r in kept))}",
        "", "## Rejects by reason", "", "| reason | rows |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(reasons.items())),
        "", "## Rejects by stage", "", "| stage | rows |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in sorted(stages.items())),
        "", "## Filter", "", "```json", json.dumps(filt.__dict__, indent=2), "```",
        "", "## Lineage", "", "```json", json.dumps(lineage, indent=2, default=str), "```",
        "", "![omega](omega.png) ![persistence](persistence.png) ![motion](motion.png)", "",
    ]
    files["card/README.md"] = "\n".join(lines).encode()
    return files


def publish_rows(rows: list[dict], root: Path, filt: FilterConfig, lineage: dict[str, Any],
                 rows_per_file: int = 10_000, embed: Any = None,
                 before_commit: Any = None) -> DatasetVersion:
    """Filter, dedupe and publish ``rows`` as a new version of the dataset at ``root``."""
    kept, rejected = refilter_rows(dedupe(rows), filt)
    kept.sort(key=lambda r: r["clip_id"])
    rejected.sort(key=lambda r: (r["clip_id"] or "", r["video_id"] or ""))
    writer = VersionWriter(root, rows_per_file=rows_per_file)
    try:
        shards = [row_to_shard(r, embed(r) if embed else None) for r in kept]
        writer.write_table("data", pa.Table.from_pylist(shards, schema=SHARD_SCHEMA))
        writer.write_table("rejects", to_table(rejected))
        for path, content in build_card(kept, rejected, filt, lineage).items():
            writer.add_file(path, content)
        return writer.publish({**lineage, "schema_version": SCHEMA_VERSION,
                               "kept": len(kept), "rejected": len(rejected)},
                              before_commit=before_commit)
    except BaseException:
        writer.abort()
        raise


def version_rows(version: DatasetVersion) -> list[dict]:
    """All rows of a published version in pipeline-row form (kept and rejected)."""
    kept = [shard_to_row(s) for s in version.read("data").to_pylist()]
    rejects = version.read("rejects")
    rejects = rejects.cast(ROW_SCHEMA) if rejects.schema != ROW_SCHEMA else rejects
    return kept + [dict(r, status=REJECTED) for r in rejects.to_pylist()]


def refilter_version(root: Path, filt: FilterConfig, lineage: dict[str, Any],
                     version: str = "latest") -> DatasetVersion:
    """Re-apply ``filt`` to a published version's stored scores; publish the result. No model."""
    source = open_version(root, version)
    rows = version_rows(source)
    return publish_rows(rows, root, filt, {**lineage, "refiltered_from": source.name},
                        rows_per_file=max(1, max((f["rows"] for f in source.manifest["files"]),
                                                 default=1)))
