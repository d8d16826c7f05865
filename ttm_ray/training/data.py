"""Training data: which rows a step reads (sampler + data position) and how they become tensors.

Three parts, one job each:

* :class:`ShardedSampler` + :class:`DataPosition`: a deterministic permutation per epoch from
  ``(seed, epoch)`` (row groups in random order, rows shuffled within windows of
  ``data.shuffle_groups`` groups, so reads hit the row-group cache), cut into global steps
  and then into each rank's micro batches. The
  position (epoch, step) is all a checkpoint needs to continue with the next unseen batch,
  mid-epoch (Ray Data cannot resume mid-epoch, so training keeps its own position).
* :class:`TrainingData`: rows of a published dataset version -> ``(x_data, ModelConditioning)``.
  Decoding and rendering are CPU work per clip (:mod:`ttm_ray.training.clips`, on a small
  thread pool, optionally ahead of time with :meth:`TrainingData.prefetch`); encoding runs on
  the worker's device.

Targets: stage 1 (image-to-motion) learns E(trajectory video s), stage 2 (motion-to-video)
E(video x). The conditions are assembled by :meth:`Encoders.conditions`
(:mod:`ttm_ray.conditioning.encoders`), the same call two-stage inference makes.

Sizes come from the model config: pixel frames/size = ``autoencoder.pixel_shape`` of the
model's latent grid, unless ``data.frames/height/width`` say otherwise (then they must encode
to exactly the model's latent grid).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.conditioning.encoders import (
    Encoders,
    EncodersConfig,
    LocalTextConfig,
    to_model_video,
)
from ttm_ray.conditioning.trajectory import NUM_COLOURS
from ttm_ray.config import constrained
from ttm_ray.dataset.versions import open_version
from ttm_ray.models.config import ModelConfig
from ttm_ray.models.registry import token_grid
from ttm_ray.training.clips import (
    BadClipError,
    Clip,
    ClipSpec,
    RowReader,
    prepare_clip,
    validation_index,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config
@dataclass
class TrainDataConfig:
    """Section ``data:`` of a train config: which dataset version and how it is read."""

    dataset_root: str = constrained(
        "runs/quickstart/prep/dataset", nonempty=True,
        help="dataset root (holds versions/ and latest) written by `ttm-ray prep`: a path "
             "or a URI (s3://bucket/prefix)")
    version: str = constrained(
        "latest", nonempty=True,
        help="published version name, or latest (resolved once per run on the driver)")
    frames: int | None = constrained(
        None, gt=0, help="PIXEL frames per clip; null: what the model's latent frames decode to")
    height: int | None = constrained(None, gt=0, help="pixel height; null: from the model")
    width: int | None = constrained(None, gt=0, help="pixel width; null: from the model")
    shuffle: bool = constrained(True, help="a new permutation of the rows every epoch")
    shuffle_groups: int = constrained(
        16, gt=0,
        help="shuffle = row groups in random order, rows shuffled within windows of this many "
             "consecutive groups: bigger is closer to a global shuffle but needs more of the "
             "row-group cache (row_group_cache is raised to at least this); 16 groups of 64 "
             "rows mix ~1000 rows at a time")
    seed: int = constrained(0, ge=0, help="seed of the per-epoch permutations")
    prefetch: int = constrained(
        2, ge=0, help="micro batches decoded ahead on CPU threads (0: decode on demand)")
    decode_threads: int = constrained(2, gt=0, help="CPU threads decoding/rendering clips")
    mask_rule: Literal["area", "box"] = constrained(
        "area", help="masks -> token ids: area (>= threshold of a token) | box (the paper's)")
    mask_threshold: float = constrained(0.5, gt=0, le=1, help="coverage that claims a token")
    colour_slots: int = constrained(
        0, ge=0, le=NUM_COLOURS,
        help="0: object k keeps prep's colour k; N: each clip's objects get distinct colours "
             "drawn from the first N of the colour table (seeded by data.seed and the clip "
             "id), so a model trained on clips of few objects has drawn the colours that "
             "clips with more objects give their later objects")
    local_tokens_per_object: int | None = constrained(
        None, gt=0, help="cap on each local prompt's tokens; null: the text encoder's length")
    local_tokens: int | None = constrained(
        None, gt=0, help="fixed M (local tokens per sample, padded); null: the batch's longest")
    validation_clip: str | None = constrained(
        None, help="clip_id of the fixed validation clip (MLflow samples); null: row 0")
    row_group_cache: int = constrained(
        64, gt=0, help="Parquet row groups kept in memory per worker (LRU, also capped at "
                       "1 GiB): at least shuffle_groups, so a shuffle window is read once")
    max_bad_fraction: float = constrained(
        0.01, ge=0, le=1,
        help="rows that cannot become a sample (undecodable video, bad masks, empty prompt) "
             "are skipped, replaced by the next good row and counted; more than this fraction "
             "of the dataset's rows stops the run with the list (<run>/bad_rows.json)")
    encoded: str | None = constrained(
        None, help="root of an encoded version written by `ttm-ray encode` (the stored "
                   "autoencoder latents and text embeddings of dataset_root's clips); set: "
                   "training reads it and never builds the frozen encoders (preflight checks "
                   "that its encoders: and clip geometry are this run's); null: encode on "
                   "the fly")
    encoded_version: str = constrained(
        "latest", nonempty=True, help="version of data.encoded (latest: resolved once per run)")


# ----------------------------------------------------------------------------- position
@dataclass
class DataPosition:
    """Where the data stream is: ``step`` optimizer steps taken in ``epoch``. Saved in every
    checkpoint; resuming from it reads the next unseen batch."""

    epoch: int = 0
    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "step": int(self.step)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DataPosition:
        return cls(epoch=int(state["epoch"]), step=int(state["step"]))


def window_shuffle(group_rows: np.ndarray, window: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """All rows, ordered as: row groups in a random order, then rows shuffled within each run
    of ``window`` consecutive groups of that order.

    Why: a reader caching row groups reads each group about once per epoch (a window's groups
    fit the cache), while rows still mix across ``window`` random groups (files were written
    in pipeline order, so neighbouring rows are alike and a group alone mixes poorly).
    """
    group_rows = np.asarray(group_rows, dtype=np.int64)
    order = rng.permutation(len(group_rows))
    starts = np.concatenate([[0], np.cumsum(group_rows)[:-1]])
    lengths = group_rows[order]
    ends = np.cumsum(lengths)
    # Each group's rows, consecutive, groups in `order`.
    rows = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(starts[order] - ends + lengths,
                                                                 lengths)
    for first in range(0, len(order), window):
        lo = int(ends[first - 1]) if first else 0
        rng.shuffle(rows[lo:int(ends[min(first + window, len(order)) - 1])])  # in place
    return rows


class ShardedSampler:
    """Deterministic rows for every (rank, global step): no state besides the position.

    Epoch ``e`` uses ``permutation(seed, e)`` of all rows (identity without shuffle): with
    ``group_rows`` (the rows of each Parquet row group, in file order) the
    :func:`window_shuffle` of the groups in windows of ``shuffle_groups``, without it a
    global permutation (every read a cache miss; kept for callers without groups). Cut into
    ``steps_per_epoch = num_rows // global_batch`` global batches (the ``num_rows %
    global_batch`` rows at the end of a permutation wait for a later epoch, where the
    permutation differs). Global batch ``s`` is laid out ``[grad_accum, world_size,
    micro_batch]``: rank ``r``'s ``k``-th micro batch is ``[k, r, :]``. So inside an epoch no
    row repeats, ranks are disjoint and together cover the global batch, and a position always
    gives the same indices, whatever happened before it.
    """

    def __init__(self, num_rows: int, world_size: int, rank: int, micro_batch: int,
                 grad_accum: int, seed: int = 0, shuffle: bool = True,
                 group_rows: Sequence[int] | None = None, shuffle_groups: int = 16) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if micro_batch < 1 or grad_accum < 1:
            raise ValueError(f"micro_batch {micro_batch} and grad_accum {grad_accum} must be "
                             ">= 1")
        self.num_rows, self.world_size, self.rank = int(num_rows), int(world_size), int(rank)
        self.micro_batch, self.grad_accum = int(micro_batch), int(grad_accum)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.group_rows = None if group_rows is None else np.asarray(group_rows, np.int64)
        if self.group_rows is not None and int(self.group_rows.sum()) != self.num_rows:
            raise ValueError(f"group_rows add up to {int(self.group_rows.sum())} rows, not "
                             f"{self.num_rows}")
        if shuffle_groups < 1:
            raise ValueError(f"shuffle_groups must be >= 1, got {shuffle_groups}")
        self.shuffle_groups = int(shuffle_groups)
        self.global_batch = self.micro_batch * self.grad_accum * self.world_size
        if self.num_rows < self.global_batch:
            raise ValueError(f"the dataset has {self.num_rows} rows, fewer than one global "
                             f"batch of {self.global_batch} (micro_batch x grad_accum x "
                             "workers): use a bigger dataset or a smaller batch")
        self.steps_per_epoch = self.num_rows // self.global_batch
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch`` (cached for the current epoch)."""
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, int(epoch)])
            if self.shuffle and self.group_rows is not None:
                order = window_shuffle(self.group_rows, self.shuffle_groups, rng)
            elif self.shuffle:
                order = rng.permutation(self.num_rows)
            else:
                order = np.arange(self.num_rows)
            self._perm = (int(epoch), order)
        return self._perm[1]

    def normalize(self, position: DataPosition) -> DataPosition:
        """The same position with ``step < steps_per_epoch`` (epochs rolled over)."""
        if position.epoch < 0 or position.step < 0:
            raise ValueError(f"invalid data position {position}")
        epoch = position.epoch + position.step // self.steps_per_epoch
        return DataPosition(epoch, position.step % self.steps_per_epoch)

    def advance(self, position: DataPosition) -> DataPosition:
        """The position after one more optimizer step."""
        pos = self.normalize(position)
        return self.normalize(DataPosition(pos.epoch, pos.step + 1))

    def global_indices(self, position: DataPosition) -> np.ndarray:
        """All ranks' rows of this step, ``[grad_accum, world_size, micro_batch]``."""
        pos = self.normalize(position)
        start = pos.step * self.global_batch
        block = self.permutation(pos.epoch)[start:start + self.global_batch]
        return block.reshape(self.grad_accum, self.world_size, self.micro_batch)

    def next_micro_batches(self, position: DataPosition) -> list[list[int]]:
        """This rank's ``grad_accum`` micro batches (row indices) of the step at ``position``."""
        return [[int(i) for i in micro] for micro in self.global_indices(position)[:, self.rank]]


def cache_groups(cfg: TrainDataConfig) -> int:
    """``data.row_group_cache``, raised to a whole shuffle window (``data.shuffle_groups``)
    when shuffling: a smaller cache would read a window's groups again and again."""
    if cfg.shuffle and cfg.row_group_cache < cfg.shuffle_groups:
        log.warning("data.row_group_cache %d < data.shuffle_groups %d: caching %d row groups "
                    "so a shuffle window fits", cfg.row_group_cache, cfg.shuffle_groups,
                    cfg.shuffle_groups)
        return cfg.shuffle_groups
    return cfg.row_group_cache


def build_sampler(cfg: TrainDataConfig, data: TrainingData, world_size: int, rank: int,
                  micro_batch: int, grad_accum: int) -> ShardedSampler:
    """The sampler of a run over ``data``'s row groups (what the loop and benchmarks use)."""
    return ShardedSampler(data.num_rows, world_size, rank, micro_batch, grad_accum, cfg.seed,
                          cfg.shuffle, group_rows=data.group_rows,
                          shuffle_groups=cfg.shuffle_groups)


# ----------------------------------------------------------------------------- the data
#: Rows tried after a bad one before giving up on the batch (a run of this many bad rows is
#: far past any sane max_bad_fraction: the dataset or the reader is broken).
MAX_REPLACEMENT_TRIES = 64


def clip_spec(stage: int, model_cfg: ModelConfig, cfg: TrainDataConfig, ae: Any,
              allow_empty_prompt: bool = False) -> ClipSpec:
    """The :class:`ClipSpec` of ``stage`` for ``model_cfg`` through autoencoder ``ae``: pixel
    size from the model's latent grid unless ``cfg.frames/height/width`` say otherwise,
    checked both ways. Shared by training and the encoded-latent cache (``ttm-ray encode``)
    so both prepare the same pixels."""
    m = model_cfg
    if ae.latent_channels != m.latent_channels:
        raise ValueError(f"the autoencoder gives {ae.latent_channels} latent channels but "
                         f"model.latent_channels is {m.latent_channels}")
    _, frames, height, width = ae.pixel_shape(m.num_frames, m.height, m.width)
    frames = cfg.frames or frames
    height, width = cfg.height or height, cfg.width or width
    latent = ae.latent_shape(frames, height, width)
    want = (m.latent_channels, m.num_frames, m.height, m.width)
    if latent != want:
        raise ValueError(f"data {frames}x{height}x{width} (frames x height x width) encodes "
                         f"to a latent {list(latent)}, the model takes {list(want)} "
                         "[C, T, H, W]: fix data.frames/height/width or the model's grid")
    grid = token_grid(m)
    return ClipSpec(stage=stage, frames=frames, height=height, width=width,
                    time_factor=ae.factors[0], causal=ae.causal,
                    token_grid=grid if stage == 2 else None,
                    mask_rule=cfg.mask_rule, mask_threshold=cfg.mask_threshold,
                    allow_empty_prompt=allow_empty_prompt, colour_slots=cfg.colour_slots,
                    colour_seed=cfg.seed)


# Geometry keys an encoded version may lack, and the value their absence means.
GEOMETRY_DEFAULTS: dict[str, Any] = {"colour_slots": 0, "colour_seed": 0}


def encoded_geometry(model_cfg: ModelConfig, cfg: TrainDataConfig,
                     pixel_shape: Sequence[int], stage: int | None = None) -> dict[str, Any]:
    """What an encoded version's rows depend on besides the encoders: the pixel clip, the
    latent and token grids, the mask rule and the local-token cap. ``stage=1`` leaves out
    what only stage 2 reads (token grid, mask rule, local tokens): a stage-1 run can read a
    version encoded for either family."""
    m = model_cfg
    geo: dict[str, Any] = {
        "pixel_shape": [int(v) for v in pixel_shape],
        "latent_shape": [m.latent_channels, m.num_frames, m.height, m.width],
        "token_grid": list(token_grid(m)), "mask_rule": cfg.mask_rule,
        "mask_threshold": float(cfg.mask_threshold),
        "local_tokens_per_object": cfg.local_tokens_per_object,
    }
    if cfg.colour_slots:
        # The relabelled colours are in the stored trajectory latents of both stages. Only
        # recorded when used, so versions encoded before the option (and their encoding
        # hash) still match runs that keep prep's colours (GEOMETRY_DEFAULTS).
        geo.update(colour_slots=cfg.colour_slots, colour_seed=cfg.seed)
    if stage == 1:
        for key in ("token_grid", "mask_rule", "mask_threshold", "local_tokens_per_object"):
            geo.pop(key)
    return geo


class BadRowsError(RuntimeError):
    """Too many rows of the dataset cannot become samples; lists them."""

    def __init__(self, bad_rows: dict[int, str], num_rows: int) -> None:
        self.bad_rows = dict(bad_rows)
        shown = "\n".join(f"  row {i}: {r}" for i, r in sorted(bad_rows.items())[:20])
        more = f"\n  ... and {len(bad_rows) - 20} more" if len(bad_rows) > 20 else ""
        super().__init__(f"{len(bad_rows)} of {num_rows} dataset rows cannot be trained on "
                         f"(data.max_bad_fraction):\n{shown}{more}")


def _prepare_or_bad(row: dict[str, Any], spec: ClipSpec) -> Clip | BadClipError:
    """:func:`prepare_clip` with a bad row returned as data (errors as data: the caller
    counts and replaces it instead of failing the step)."""
    try:
        return prepare_clip(row, spec)
    except BadClipError as exc:
        return exc


class TrainingData:
    """Rows of one dataset version -> encoded training batches, on one worker.

    ``batch(indices)`` is the loop's only call; the permutation lives in
    :class:`ShardedSampler`. Nothing here draws random numbers (the VAE posterior is its mode
    unless the autoencoder config says ``sample``), so decoding ahead (:meth:`prefetch`)
    cannot change what a step sees.
    """

    def __init__(self, cfg: TrainDataConfig, stage: int, model_cfg: ModelConfig,
                 encoders: Encoders, device: torch.device | str) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.cfg, self.stage, self.model_cfg = cfg, int(stage), model_cfg
        self.encoders, self.device = encoders, torch.device(device)
        version = open_version(cfg.dataset_root, cfg.version)
        self.version = version.name
        self._rows = RowReader(version, cache_groups=cache_groups(cfg))
        self.num_rows = self._rows.num_rows
        #: rows per row group in file order: the sampler's shuffle windows (ShardedSampler)
        self.group_rows = self._rows.group_rows
        self.spec = self._clip_spec()
        self._pool = ThreadPoolExecutor(max_workers=cfg.decode_threads,
                                        thread_name_prefix="ttm-data")
        self._ahead: OrderedDict[tuple[int, ...], list[Future[Clip | BadClipError]]] = \
            OrderedDict()
        #: rows that could not become a sample on this worker: row index -> reason
        self.bad_rows: dict[int, str] = {}
        self._lock = threading.Lock()
        self._validation: tuple[torch.Tensor, ModelConditioning, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ shapes
    def _clip_spec(self) -> ClipSpec:
        """Pixel size from the model's latent grid (or the config), checked both ways."""
        return clip_spec(self.stage, self.model_cfg, self.cfg, self.encoders.autoencoder,
                         allow_empty_prompt=self.encoders.text.empty_prompt == "null")

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of the clips fed to the autoencoder."""
        return self.spec.frames, self.spec.height, self.spec.width

    # ------------------------------------------------------------------ CPU half
    def _submit(self, indices: Sequence[int]) -> list[Future[Clip | BadClipError]]:
        rows = self._rows.rows(indices)
        return [self._pool.submit(_prepare_or_bad, row, self.spec) for row in rows]

    def prefetch(self, batches: Sequence[Sequence[int]]) -> None:
        """Start decoding these micro batches (row indices) on the CPU threads; ``batch``
        picks them up. At most ``data.prefetch`` batches are held ahead."""
        if self.cfg.prefetch == 0:
            return
        with self._lock:
            for indices in batches:
                key = tuple(int(i) for i in indices)
                if key not in self._ahead:
                    self._ahead[key] = self._submit(key)
                while len(self._ahead) > self.cfg.prefetch:
                    for f in self._ahead.popitem(last=False)[1]:
                        f.cancel()

    def clips(self, indices: Sequence[int]) -> list[Clip]:
        """Decoded clips of ``indices`` (CPU). A bad row is recorded in :attr:`bad_rows` and
        replaced by the next good row after it (deterministic, so a resumed run sees the same
        batch); the loop decides when too many are bad."""
        key = tuple(int(i) for i in indices)
        with self._lock:
            futures = self._ahead.pop(key, None)
        if futures is None:
            futures = self._submit(key)
        out = []
        for index, future in zip(key, futures, strict=True):
            clip = future.result()
            if isinstance(clip, BadClipError):
                clip = self._replacement(index, clip)
            out.append(clip)
        return out

    def _replacement(self, index: int, error: BadClipError) -> Clip:
        """Record ``index`` as bad and decode the rows after it until one is good."""
        self.bad_rows[index] = str(error)
        for step in range(1, min(self.num_rows, MAX_REPLACEMENT_TRIES + 1)):
            candidate = (index + step) % self.num_rows
            if candidate in self.bad_rows:
                continue
            clip = _prepare_or_bad(self._rows.rows([candidate])[0], self.spec)
            if not isinstance(clip, BadClipError):
                return clip
            self.bad_rows[candidate] = str(clip)
        raise BadRowsError(self.bad_rows, self.num_rows)

    # ------------------------------------------------------------------ device half
    def batch(self, indices: Sequence[int], generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, ModelConditioning]:
        """``(x_data [B, C, T, H, W], cond)`` for rows ``indices``, float32 on the device.

        ``generator`` is the loop's per-rank generator; batch preparation is deterministic
        and draws nothing from it today (kept so augmentations stay reproducible).
        """
        del generator
        return self.encode(self.clips(indices))

    @torch.no_grad()
    def encode(self, clips: Sequence[Clip]) -> tuple[torch.Tensor, ModelConditioning]:
        """Encode prepared clips on the worker's device (see the module docstring)."""
        ae = self.encoders.autoencoder
        video = to_model_video([c.frames for c in clips], self.device)
        trajectory = to_model_video([c.trajectory for c in clips], self.device)
        b = len(clips)
        # One autoencoder call per shape: the first frames of both videos, then the videos.
        x0, s0 = ae.encode_image(torch.cat([video[:, :, :1], trajectory[:, :, :1]])
                                 ).float().split(b)
        if self.stage == 1:
            x_data, s = ae.encode(trajectory).float(), s0
        else:
            x_data, s = ae.encode(torch.cat([video, trajectory])).float().split(b)
        token_ids = (torch.from_numpy(np.stack([c.token_ids for c in clips]))
                     if self.stage == 2 else None)
        cond = self.encoders.conditions(
            self.stage, self.model_cfg.num_frames, x0, s, [c.prompt for c in clips],
            local_prompts=[c.local_prompts for c in clips],
            local_ids=[c.local_ids for c in clips], token_ids=token_ids,
            local=LocalTextConfig(self.cfg.local_tokens_per_object, self.cfg.local_tokens),
            names=[f"clip {c.clip_id!r}" for c in clips],
            frames=self.model_cfg.condition_frames)
        return x_data, cond

    # ------------------------------------------------------------------ validation
    def validation_index(self) -> int:
        return validation_index(self._rows, self.cfg.validation_clip,
                                f"dataset version {self.version}")

    def validation_sample(self) -> tuple[torch.Tensor, ModelConditioning, dict[str, Any]]:
        """The fixed validation clip (batch of 1), computed once: ``(x_data, cond, raw)`` with
        ``raw`` = clip_id, prompts and the uint8 frames / trajectory (for previews)."""
        if self._validation is None:
            clip = self.clips([self.validation_index()])[0]
            x, cond = self.encode([clip])
            raw = {"clip_id": clip.clip_id, "caption": clip.caption, "c_motion": clip.c_motion,
                   "local_prompts": clip.local_prompts, "local_ids": clip.local_ids,
                   "frames": clip.frames, "trajectory": clip.trajectory, "stage": self.stage}
            self._validation = (x, cond, raw)
        return self._validation

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "GEOMETRY_DEFAULTS",
    "BadClipError",
    "BadRowsError",
    "DataPosition",
    "Encoders",
    "EncodersConfig",
    "ShardedSampler",
    "TrainDataConfig",
    "TrainingData",
    "build_sampler",
    "cache_groups",
    "clip_spec",
    "encoded_geometry",
    "window_shuffle",
]
