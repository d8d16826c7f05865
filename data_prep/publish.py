"""Publish the work store as a dataset version, and refilter a version, as streaming jobs.

The driver never holds rows. It lists the work store's parts, asks one Ray task per hash
bucket which rows a later row superseded (:mod:`data_prep.work_index`; usually none), and
cuts the parts into **shard groups**: consecutive parts of one run, about
``publish.rows_per_file`` rows each. One task per group reads its parts, drops superseded
rows, applies the filter to every scored row (so a version always matches the config's
thresholds), converts kept rows to training rows (re-encoding clip bytes there when asked),
writes the group's ``data`` and ``rejects`` files into the version and returns their manifest
entries plus the group's card statistics (:mod:`data_prep.card`).

A group's *fingerprint* hashes what its files depend on: its parts, the rows dropped from
them, the filter and the shard settings. An incremental publish reuses the previous version's
files of every group whose fingerprint is unchanged, by reference (manifest entries naming the
version that holds them, with their sha256), so a nightly run writes only its new groups.
Refilter is the same job over a version's groups instead of the work store: no model, and the
fingerprints line up, so a refilter back to an earlier filter reuses nothing it need not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.card import CardStats, build_card
from data_prep.filtering import FilterConfig, refilter_rows
from data_prep.rows import COLUMNS, OK, REJECTED, ROW_SCHEMA, to_table
from data_prep.work_index import buckets_for, superseded
from data_prep.writer import WorkPart, list_parts, read_part
from ttm_ray.conditioning.trajectory import COLOUR_TABLE_VERSION
from ttm_ray.config import constrained, to_dict
from ttm_ray.dataset.schema import SCHEMA_VERSION, SHARD_SCHEMA
from ttm_ray.dataset.versions import (
    DatasetVersion,
    DatasetVersionError,
    VersionWriter,
    latest_version,
    open_version,
    write_part,
)
from ttm_ray.dataset.video import filesystem, read_frames, resize_center_crop, write_video

log = logging.getLogger(__name__)

VERSION_COLUMNS = ("caption_model", "caption_prompt_version", "prompts_model",
                   "motion_prompt_version", "local_prompt_version", "grounding_model",
                   "mask_model", "score_model")
GROUPS_FILE = "groups.json"  # per version: each shard group's fingerprint, files and stats
# Row groups of the data table. Training reads one row group per cache miss and shuffles
# over windows of row groups (data.shuffle_groups), so a group should be about a micro batch,
# not a file: 64 rows is a few micro batches; 8 MiB keeps a group with embedded clip bytes at
# one S3 range GET of a few MB; at 10,000 rows per file that is ~160 groups per file, whose
# footer metadata stays small next to the data.
ROW_GROUP_ROWS = 64
ROW_GROUP_BYTES = 8 << 20


@dataclass
class PublishConfig:
    dataset_root: str | None = constrained(
        None, help="dataset root (versions/, latest), a folder or an s3:// URI; null: "
        "<run.root>/<run.name>/dataset")
    rows_per_file: int = constrained(10_000, gt=0, help="rows per training shard file (a "
                                     "shard group: parts of one run, published together)")
    embed_clip_bytes: bool = constrained(
        False, help="also store each clip re-encoded at the first clip.resolutions size")
    row_group_rows: int = constrained(
        ROW_GROUP_ROWS, gt=0, help="rows per Parquet row group of the data table: training "
        "reads one group per cache miss, so 64 (a few micro batches) makes shuffled reads "
        "cheap; more groups grow each file's footer")
    row_group_bytes: int = constrained(
        ROW_GROUP_BYTES, gt=0, help="bytes (in memory) per data row group at most: caps "
        "groups of large rows (embedded clip bytes) at about one 8 MiB S3 range GET")
    keep_versions: int | None = constrained(
        None, gt=0, help="after publishing, delete all but the newest N versions (files a "
        "kept version still references stay)")


# ----------------------------------------------------------------------------- row shapes
def clip_bytes_encoder(height: int, width: int) -> Callable[[dict], bytes]:
    """``row -> mp4 bytes`` of the clip resized/cropped to ``height x width`` (the shared
    rule). Built and run inside the shard-group tasks, so encoding spreads over the workers."""
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


# ----------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class ShardSettings:
    """Everything besides rows and filter that a shard file's bytes depend on."""

    embed_size: tuple[int, int] | None = None
    row_group_rows: int | None = ROW_GROUP_ROWS  # None: pyarrow's default (1 group a file)
    row_group_bytes: int | None = ROW_GROUP_BYTES
    schema_version: str = SCHEMA_VERSION
    colour_table: str = COLOUR_TABLE_VERSION


@dataclass
class GroupSpec:
    """One shard group: where its rows come from and what its files depend on."""

    index: int
    source: str  # hash of the rows' origin (parts + dropped rows, or the source group's)
    # from the work store: (part path, rank, superseded row indices)
    parts: list[tuple[str, int, list[int]]] = field(default_factory=list)
    # from a published version (refilter): data and rejects file URIs
    data_files: list[str] = field(default_factory=list)
    reject_files: list[str] = field(default_factory=list)

    def fingerprint(self, filt: FilterConfig, settings: ShardSettings) -> str:
        blob = json.dumps({"source": self.source, "filter": to_dict(filt),
                           "settings": asdict(settings)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def work_groups(parts: list[WorkPart], dropped: dict[int, list[int]],
                rows_per_group: int) -> list[GroupSpec]:
    """Consecutive parts of one run, closed at ``rows_per_group`` rows: a finished run's
    groups never change when later runs append, which is what lets a publish reuse them."""
    groups: list[list[WorkPart]] = []
    rows = 0
    for p in parts:
        if not groups or groups[-1][-1].run != p.run or rows >= rows_per_group:
            groups.append([])
            rows = 0
        groups[-1].append(p)
        rows += p.rows
    specs = []
    for i, members in enumerate(groups):
        entries = [(str(p.path), p.rank, sorted(dropped.get(p.rank, []))) for p in members]
        source = _sha([[Path(path).name, rank_rows, drop] for (path, _, drop), rank_rows
                       in zip(entries, (p.rows for p in members), strict=True)])
        specs.append(GroupSpec(index=i, source=source, parts=entries))
    return specs


def file_key(entry: dict, version: str) -> str:
    """A manifest entry's identity across versions: ``<version holding it>/<path>``."""
    return f"{entry.get('version') or version}/{entry['path']}"


def _entry_uris(version: DatasetVersion) -> dict[str, tuple[dict, str]]:
    """``file key -> (manifest entry, URI)`` for the version's data and rejects files."""
    out = {}
    for table in ("data", "rejects"):
        entries = [f for f in version.manifest["files"] if f["table"] == table]
        for entry, uri in zip(entries, version.files(table), strict=True):
            out[file_key(entry, version.name)] = (entry, uri)
    return out


def version_groups(version: DatasetVersion) -> list[GroupSpec]:
    """A published version's shard groups (from its ``groups.json``), for refiltering."""
    record = read_groups(version)
    if record is None:
        raise DatasetVersionError(
            f"{version.path}: version has no {GROUPS_FILE} (published before streaming "
            "publish); republish it from its work store with `ttm-ray prep` first")
    uris = _entry_uris(version)
    return [GroupSpec(index=g["index"], source=g["source"],
                      data_files=[uris[k][1] for k in g["files"].get("data", [])],
                      reject_files=[uris[k][1] for k in g["files"].get("rejects", [])])
            for g in record]


def read_groups(version: DatasetVersion) -> list[dict] | None:
    try:
        return json.loads(version.read_bytes(GROUPS_FILE))
    except (FileNotFoundError, OSError, DatasetVersionError):
        return None


# ----------------------------------------------------------------------------- one group
def _group_rows(spec: GroupSpec) -> Iterator[list[dict]]:
    """The group's rows in pipeline-row form, one part (or file) at a time."""
    for path, _, drop in spec.parts:
        table = read_part(Path(path))
        if drop:
            keep = pc.invert(pc.is_in(pa.array(range(table.num_rows)), pa.array(drop)))
            table = table.filter(keep)
        yield table.to_pylist()
    for uri in spec.data_files:
        fs, path = filesystem(uri)
        yield [shard_to_row(s) for s in pq.read_table(path, filesystem=fs).to_pylist()]
    for uri in spec.reject_files:
        fs, path = filesystem(uri)
        table = pq.read_table(path, filesystem=fs)
        table = table.cast(ROW_SCHEMA) if table.schema != ROW_SCHEMA else table
        yield [dict(r, status=REJECTED) for r in table.to_pylist()]


def publish_group(spec: GroupSpec, fingerprint: str, staging_uri: str, filt: FilterConfig,
                  settings: ShardSettings) -> dict[str, Any]:
    """Filter and write one shard group; returns its manifest entries and card stats.
    Runs in a Ray task (or in-process): memory is bounded by one group."""
    embed = clip_bytes_encoder(*settings.embed_size) if settings.embed_size else None
    shards: list[pa.Table] = []
    rejects: list[pa.Table] = []
    stats = CardStats()
    for rows in _group_rows(spec):
        kept, rejected = refilter_rows(rows, filt)
        stats = stats + CardStats.of(kept, rejected)
        shards.append(pa.Table.from_pylist(
            [row_to_shard(r, embed(r) if embed else None) for r in kept], schema=SHARD_SCHEMA))
        rejects.append(to_table(rejected, stage="publish"))
    files: dict[str, list[dict]] = {}
    for name, tables in (("data", shards), ("rejects", rejects)):
        table = pa.concat_tables(tables) if tables else None
        if table is not None and table.num_rows:
            # The fingerprint in the name: a file reused from an older version never shares
            # a path with one this version writes for the same group index.
            rel = f"{name}/group-{spec.index:05d}-{fingerprint[:12]}.parquet"
            # Small row groups for the table training reads at random (rejects: one group).
            groups = ((settings.row_group_rows, settings.row_group_bytes) if name == "data"
                      else (None, None))
            files[name] = [write_part(staging_uri, rel, table, *groups)]
    return {"files": files, "stats": stats.to_dict()}


# ----------------------------------------------------------------------------- the driver
def _run_tasks(fn: Callable[..., Any], calls: Iterable[tuple], max_in_flight: int = 0
               ) -> Iterator[Any]:
    """``fn(*args)`` for each call: as Ray tasks (bounded in flight) when Ray is up, else
    in-process. Yields results in call order."""
    import ray

    if not ray.is_initialized():
        for args in calls:
            yield fn(*args)
        return
    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    limit = max_in_flight or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    pending: list[Any] = []
    for args in calls:
        pending.append(remote.remote(*args))
        if len(pending) >= limit:
            yield ray.get(pending.pop(0))
    for ref in pending:
        yield ray.get(ref)


def superseded_rows(work_dir: Path, total_rows: int) -> dict[int, list[int]]:
    """``part rank -> row indices`` a later row replaced, computed per hash bucket."""
    buckets = buckets_for(total_rows)
    dropped: dict[int, list[int]] = {}
    for pairs in _run_tasks(superseded, [(work_dir, b, buckets) for b in range(buckets)]):
        for rank, index in pairs:
            dropped.setdefault(rank, []).append(index)
    return dropped


@dataclass
class Published:
    """What a publish did: the version, its card stats, and how many bytes it wrote."""

    version: DatasetVersion
    stats: CardStats
    written_bytes: int
    reused_groups: int
    new_groups: int


def publish_groups(specs: list[GroupSpec], root: str | Path, filt: FilterConfig,
                   lineage: dict[str, Any], settings: ShardSettings = ShardSettings(),
                   previous: DatasetVersion | None = None,
                   before_commit: Any = None) -> Published:
    """Write a version from shard groups, reusing ``previous``'s files of unchanged groups."""
    reusable: dict[str, dict] = {}
    prev_files: dict[str, tuple[dict, str]] = {}
    if previous is not None:
        reusable = {g["fingerprint"]: g for g in read_groups(previous) or []}
        prev_files = _entry_uris(previous)
    writer = VersionWriter(root)
    try:
        record: list[dict] = []
        stats = CardStats()
        todo = []
        for spec in specs:
            fp = spec.fingerprint(filt, settings)
            old = reusable.get(fp)
            if old is not None:
                for keys in old["files"].values():
                    for key in keys:
                        writer.reuse(prev_files[key][0], previous.name)
                record.append({**old, "index": spec.index})
                stats = stats + CardStats.from_dict(old["stats"])
            else:
                todo.append((spec, fp))
        calls = [(spec, fp, writer.staging_uri, filt, settings) for spec, fp in todo]
        written = 0
        for (spec, fp), result in zip(todo, _run_tasks(publish_group, calls), strict=True):
            for table, entries in result["files"].items():
                writer.add_entries(table, entries)
                written += sum(e["bytes"] for e in entries)
            record.append({"index": spec.index, "fingerprint": fp, "source": spec.source,
                           "files": {t: [file_key(e, writer.name) for e in es]
                                     for t, es in result["files"].items()},
                           "stats": result["stats"]})
            stats = stats + CardStats.from_dict(result["stats"])
        record.sort(key=lambda g: g["index"])
        written += _ensure_tables(writer, {t for g in record for t in g["files"]})
        full_lineage = {**lineage, "schema_version": SCHEMA_VERSION, "kept": stats.kept,
                        "rejected": stats.rejected, **{k: v for k, v in stats.summary().items()
                                                       if k.startswith("rejected_")}}
        for path, content in build_card(stats, filt, full_lineage).items():
            writer.add_file(path, content)
            written += len(content)
        groups_json = json.dumps(record, sort_keys=True).encode()
        writer.add_file(GROUPS_FILE, groups_json)
        written += len(groups_json)
        version = writer.publish(full_lineage, before_commit=before_commit)
    except BaseException:
        writer.abort()
        raise
    reused = len(specs) - len(todo)
    log.info("published %s: %d groups (%d reused, %d written), %d bytes written",
             version.name, len(specs), reused, len(todo), written)
    return Published(version, stats, written, reused, len(todo))


def _ensure_tables(writer: VersionWriter, present: set[str]) -> int:
    """Readers expect every table to have at least one (maybe empty) file."""
    written = 0
    for name, schema in (("data", SHARD_SCHEMA), ("rejects", ROW_SCHEMA)):
        if name not in present:
            entry = write_part(writer.staging_uri, f"{name}/empty.parquet", schema.empty_table())
            writer.add_entries(name, [entry])
            written += entry["bytes"]
    return written


def previous_version(root: str | Path) -> DatasetVersion | None:
    if latest_version(root) is None:
        return None
    return open_version(root)


def plan_work_store(work_dir: Path, rows_per_group: int) -> list[GroupSpec]:
    """The shard groups of the whole work store (superseded rows computed in workers)."""
    parts = list_parts(work_dir)
    dropped = superseded_rows(work_dir, sum(p.rows for p in parts))
    return work_groups(parts, dropped, rows_per_group)


def publish_work_store(work_dir: Path, root: str | Path, filt: FilterConfig,
                       lineage: dict[str, Any], rows_per_file: int = 10_000,
                       settings: ShardSettings = ShardSettings(),
                       before_commit: Any = None) -> Published:
    """Publish every current row of the work store as a new version (incrementally)."""
    specs = plan_work_store(work_dir, rows_per_file)
    return publish_groups(specs, root, filt, lineage, settings, previous_version(root),
                          before_commit)


def unchanged(specs: list[GroupSpec], root: str | Path, filt: FilterConfig,
              settings: ShardSettings) -> DatasetVersion | None:
    """The latest version if publishing ``specs`` now would reproduce it exactly."""
    latest = previous_version(root)
    if latest is None:
        return None
    old = read_groups(latest)
    if old is None:
        return None
    want = [s.fingerprint(filt, settings) for s in specs]
    return latest if [g["fingerprint"] for g in old] == want else None


def refilter_version(root: str | Path, filt: FilterConfig, lineage: dict[str, Any],
                     version: str = "latest") -> Published:
    """Re-apply ``filt`` to a published version's stored scores; publish the result. No model;
    groups whose result would not change are reused from the source version."""
    source = open_version(root, version)
    specs = version_groups(source)
    return publish_groups(specs, root, filt, {**lineage, "refiltered_from": source.name},
                          previous=source)
