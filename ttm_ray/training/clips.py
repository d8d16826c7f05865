"""One dataset row -> one training clip on the CPU: frames, trajectory video, prompts, token ids.

The CPU half of the training data (the GPU half, encoding, is in :mod:`ttm_ray.training.data`).
Everything here is deterministic (the one draw, the colour slots of :func:`colour_slots_for`, is
seeded by the clip id), so clips can be prepared ahead on worker threads without changing what
a step sees.

Pixels follow the shared rules: frames come from ``clip_bytes`` when the row embeds them (the
clip already resized / centre-cropped by data prep) and from ``source_uri`` at
``frame_indices`` otherwise, both through :func:`~ttm_ray.dataset.video.resize_center_crop`;
masks go through :func:`~ttm_ray.conditioning.trajectory.masks_from_rle` with the same target
size, so trajectory pixels line up with frame pixels.

Rows are read lazily from the version's Parquet files by row group (an LRU cache bounded in
groups and bytes), so a worker never holds the masks of a million clips in memory.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ttm_ray.conditioning.masks import trajectory_token_ids
from ttm_ray.conditioning.trajectory import NUM_COLOURS, masks_from_rle, render_trajectory
from ttm_ray.dataset.versions import DatasetVersion
from ttm_ray.dataset.video import VideoReadError, read_frames, resize_center_crop

#: Columns training reads (everything else in the shard schema stays on disk).
COLUMNS = ("clip_id", "source_uri", "frame_indices", "num_frames", "src_height", "src_width",
           "caption", "c_motion", "c_local", "masks", "clip_bytes")


class BadClipError(ValueError):
    """A row that cannot become a training sample; the message starts with its clip_id."""

    def __init__(self, clip_id: str, reason: str) -> None:
        self.clip_id, self.reason = clip_id, reason
        super().__init__(f"clip {clip_id!r}: {reason}")


# ----------------------------------------------------------------------------- reading rows
#: Default cap on the bytes (Arrow, in memory) of cached row groups per reader: enough for 64
#: groups of publish's 8 MiB, and what keeps a version written with 10,000-row groups (older
#: publishes) from filling a worker's memory.
CACHE_BYTES = 1 << 30


class RowReader:
    """Random access to the rows of a dataset version's ``data`` table.

    Only the Parquet footers are read up front (row counts per row group). The row group is
    the unit of transfer: a miss reads one group (its columns coalesced into one range read,
    ``pre_buffer``, which matters on object stores) and an LRU cache keeps at most
    ``cache_groups`` groups and ``cache_bytes`` bytes, so memory is bounded by the cache, not
    the dataset. A sampler that walks windows of row groups (:class:`~ttm_ray.training.data.
    ShardedSampler` with ``group_rows``) then reads each group about once per epoch.
    Thread-safe.
    """

    def __init__(self, version: DatasetVersion, columns: Sequence[str] = COLUMNS,
                 cache_groups: int = 64, cache_bytes: int = CACHE_BYTES) -> None:
        self.version = version
        self.columns = list(columns)
        files = version.files("data")
        if not files:
            raise ValueError(f"{version.path}: dataset version has no data files")
        # Through the version: its files may be on an object store (s3://...).
        self._files = [pq.ParquetFile(version.open_input_file(f), pre_buffer=True)
                       for f in files]
        missing = sorted(set(self.columns) - set(self._files[0].schema_arrow.names))
        if missing:
            raise ValueError(f"{version.path}: data table lacks columns {missing}")
        #: (file, row group) of every row group, in file order, and its row count
        self._groups = [(fi, gi) for fi, f in enumerate(self._files)
                        for gi in range(f.metadata.num_row_groups)]
        self.group_rows: list[int] = [self._files[fi].metadata.row_group(gi).num_rows
                                      for fi, gi in self._groups]
        self._starts = np.concatenate([[0], np.cumsum(self.group_rows, dtype=np.int64)])
        self.num_rows = int(self._starts[-1])
        self._clip_ids: list[str] | None = None
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cache_groups, self._cache_bytes = max(1, cache_groups), max(1, cache_bytes)
        self._cached_bytes = 0
        self._lock = threading.Lock()
        #: row groups read so far (cache misses), for tests and benchmarks
        self.groups_read = 0

    @property
    def clip_ids(self) -> list[str]:
        """Every row's clip_id in row order (read once, on first use: only the ``clip_id``
        column, for looking up a clip such as ``data.validation_clip``)."""
        with self._lock:
            if self._clip_ids is None:
                self._clip_ids = [c for f in self._files for c in
                                  f.read(columns=["clip_id"]).column("clip_id").to_pylist()]
            return self._clip_ids

    def _group(self, index: int) -> pa.Table:
        table = self._cache.get(index)
        if table is not None:
            self._cache.move_to_end(index)
            return table
        fi, gi = self._groups[index]
        table = self._files[fi].read_row_group(gi, columns=self.columns)
        self.groups_read += 1
        self._cache[index] = table
        self._cached_bytes += table.nbytes
        while len(self._cache) > 1 and (len(self._cache) > self._cache_groups
                                        or self._cached_bytes > self._cache_bytes):
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return table

    def row(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} outside 0..{self.num_rows - 1}")
        g = int(np.searchsorted(self._starts, index, side="right") - 1)
        with self._lock:
            table = self._group(g)
        return table.slice(index - int(self._starts[g]), 1).to_pylist()[0]

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self.row(int(i)) for i in indices]


def validation_index(reader: RowReader, clip_id: str | None, where: str) -> int:
    """Row of ``data.validation_clip`` (row 0 when unset) in ``where`` (a version's name)."""
    if clip_id is None:
        return 0
    try:
        return reader.clip_ids.index(clip_id)
    except ValueError:
        raise ValueError(f"data.validation_clip {clip_id!r} is not in {where}") from None


# ----------------------------------------------------------------------------- one clip
@dataclass(frozen=True)
class ClipSpec:
    """What a training clip must look like (fixed per run).

    ``frames``/``height``/``width``: pixel size. ``time_factor``/``causal``: the autoencoder's
    temporal compression, to align pixel frames with latent frames for the token ids.
    ``token_grid``: the model's token grid ``(t, h, w)`` (stage 2 only).
    """

    stage: int
    frames: int
    height: int
    width: int
    time_factor: int = 1
    causal: bool = False
    token_grid: tuple[int, int, int] | None = None
    mask_rule: str = "area"
    mask_threshold: float = 0.5
    allow_empty_prompt: bool = False  # text_encoder.empty_prompt: null encodes it as ""
    colour_slots: int = 0  # data.colour_slots: 0 keeps prep's colours (see colour_slots_for)
    colour_seed: int = 0  # data.seed


@dataclass
class Clip:
    """One prepared clip (CPU, uint8 pixels), ready for the encoders."""

    clip_id: str
    frames: np.ndarray  # uint8 [T, H, W, 3]
    trajectory: np.ndarray  # uint8 [T, H, W, 3]
    prompt: str  # stage 1: c_motion; stage 2: caption
    caption: str
    c_motion: str
    local_prompts: list[str]
    local_ids: list[int]  # colour index of each local prompt (= the object's token id)
    token_ids: np.ndarray | None  # int64 [t, h, w] on the model's token grid (stage 2)


def decode_clip_bytes(data: bytes, clip_id: str, frames: int | None = None) -> np.ndarray:
    """The embedded mp4 -> ``uint8 [T, H, W, 3]``, decoded from memory: the first ``frames``
    frames only (all when ``None`` or when the clip is shorter)."""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        count = len(reader) if frames is None else min(frames, len(reader))
        batch = reader.get_batch(list(range(count)))
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    except Exception as exc:  # decord raises its own error types
        raise BadClipError(clip_id, f"clip_bytes do not decode: {exc}") from exc


def clip_frames(row: dict[str, Any], frames: int, height: int, width: int) -> np.ndarray:
    """The first ``frames`` frames of the clip at ``height x width``, ``uint8 [T, H, W, 3]``.

    Embedded ``clip_bytes`` are used when they have the target's aspect ratio (resampled if
    their size differs: same centre crop); otherwise, or without them, the source video is
    read at ``frame_indices``.
    """
    clip_id = row["clip_id"]
    data = row.get("clip_bytes")
    if data:
        video = decode_clip_bytes(data, clip_id, frames)
        h, w = video.shape[1:3]
        if h * width == w * height:  # same aspect: a resize of the embedded crop is exact
            if len(video) < frames:
                raise BadClipError(clip_id, f"clip_bytes hold {len(video)} frames, training "
                                            f"needs {frames}")
            return resize_center_crop(video[:frames], height, width)
    try:
        video = read_frames(row["source_uri"], list(row["frame_indices"])[:frames])
    except VideoReadError as exc:
        raise BadClipError(clip_id, f"cannot read frames: {exc}") from exc
    return resize_center_crop(video, height, width)


def _check_row(row: dict[str, Any], spec: ClipSpec) -> None:
    clip_id = row["clip_id"]
    text_field = "c_motion" if spec.stage == 1 else "caption"
    if not spec.allow_empty_prompt and not (row.get(text_field) or "").strip():
        raise BadClipError(clip_id, f"empty {text_field} (stage {spec.stage} conditions on it)")
    objects = row.get("masks") or []
    if not objects:
        raise BadClipError(clip_id, "no object masks: both stages need the trajectory "
                                    "(data prep should have rejected this row)")
    available = min([len(row.get("frame_indices") or [])] + [len(o["rle"]) for o in objects])
    if available < spec.frames:
        raise BadClipError(clip_id, f"{available} frames, training needs {spec.frames} "
                                    "(data.frames / the model's latent frames)")
    if spec.stage == 2:
        prompts = row.get("c_local") or []
        if not prompts:
            raise BadClipError(clip_id, "no local prompts (c_local): stage 2 needs one per "
                                        "object")
        empty = [p["name"] for p in prompts if not (p.get("prompt") or "").strip()]
        if empty:
            raise BadClipError(clip_id, f"empty local prompt for object(s) {empty}")


def colour_slots_for(clip_id: str, indices: Sequence[int], slots: int, seed: int = 0
                     ) -> dict[int, int]:
    """``{prep color_index: training color_index}`` for one clip's objects.

    Why: prep gives a clip's objects the colours 0, 1, 2, ... in order, so a model trained on
    clips of one or two objects never draws the third colour, and fails the object that gets
    it in a three-object clip (measured: 0.01 trajectory IoU, ``benchmarks/results/
    it_learns.md``). Colours are only identities (a local prompt is tied to its object's
    colour, whichever it is), so any injective relabelling is the same clip.

    ``slots`` 0 keeps the indices. Otherwise the objects get distinct colours drawn from the
    first ``max(slots, objects)`` entries of the colour table, from a generator seeded by
    ``seed`` and the clip id: the same clip gets the same colours on every worker, epoch,
    resume and in an encoded version.
    """
    indices = [int(i) for i in indices]
    if not slots:
        return {i: i for i in indices}
    pool = min(max(slots, len(indices)), NUM_COLOURS)
    digest = hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    drawn = rng.choice(pool, size=len(indices), replace=False)
    return {i: int(c) for i, c in zip(indices, drawn, strict=True)}


def prepare_clip(row: dict[str, Any], spec: ClipSpec) -> Clip:
    """Decode, render and check one row (CPU only). Raises :class:`BadClipError`."""
    _check_row(row, spec)
    clip_id = row["clip_id"]
    # Only the frames training uses are decoded from the RLE.
    objects = [{**o, "rle": list(o["rle"])[:spec.frames]} for o in row["masks"]]
    try:
        masks, indices = masks_from_rle(objects, spec.height, spec.width)
        slot = colour_slots_for(clip_id, indices, spec.colour_slots, spec.colour_seed)
        indices = [slot[i] for i in indices]
        trajectory = render_trajectory(masks, indices)
    except ValueError as exc:
        raise BadClipError(clip_id, f"bad masks: {exc}") from exc
    local = row.get("c_local") or []
    orphans = sorted({int(p["color_index"]) for p in local} - set(slot))
    if orphans:
        raise BadClipError(clip_id, f"local prompt(s) for color_index {orphans} but no object "
                                    "mask has that colour")
    frames = clip_frames(row, spec.frames, spec.height, spec.width)
    if frames.shape != trajectory.shape:
        raise BadClipError(clip_id, f"frames {frames.shape} and trajectory "
                                    f"{trajectory.shape} differ")
    token_ids = None
    if spec.stage == 2:
        if spec.token_grid is None:
            raise ValueError("ClipSpec.token_grid is required for stage 2")
        try:
            ids = trajectory_token_ids(masks, indices, spec.token_grid,
                                       time_factor=spec.time_factor, causal=spec.causal,
                                       rule=spec.mask_rule, threshold=spec.mask_threshold)
        except ValueError as exc:
            raise BadClipError(clip_id, f"token ids: {exc}") from exc
        token_ids = ids.numpy()
    return Clip(
        clip_id=clip_id, frames=frames, trajectory=trajectory,
        prompt=(row.get("c_motion") if spec.stage == 1 else row.get("caption")) or "",
        caption=row.get("caption") or "", c_motion=row.get("c_motion") or "",
        local_prompts=[p["prompt"] for p in local],
        local_ids=[slot[int(p["color_index"])] for p in local],
        token_ids=token_ids,
    )


__all__ = ["CACHE_BYTES", "COLUMNS", "BadClipError", "Clip", "ClipSpec", "RowReader",
           "clip_frames", "colour_slots_for", "decode_clip_bytes", "prepare_clip"]
