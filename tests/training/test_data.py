"""Training data: the sampler's position arithmetic, and dataset rows -> encoded batches for both
families and stages, on the tiny dataset built by the real prep (``tiny_dataset``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ttm_ray.conditioning.autoencoders import AutoencoderConfig
from ttm_ray.conditioning.text_encoders import TextEncoderConfig
from ttm_ray.conditioning.trajectory import NUM_COLOURS, trajectory_to_object_ids
from ttm_ray.dataset.versions import DatasetVersion, VersionWriter, open_version, write_part
from ttm_ray.models import ModelConfig, build_model
from ttm_ray.training.clips import (
    COLUMNS,
    BadClipError,
    ClipSpec,
    RowReader,
    colour_slots_for,
    prepare_clip,
)
from ttm_ray.training.data import (
    BadRowsError,
    DataPosition,
    EncodersConfig,
    ShardedSampler,
    TrainDataConfig,
    TrainingData,
)


# ----------------------------------------------------------------------------- sampler
def all_rows_of_step(n: int, world: int, micro: int, accum: int, pos: DataPosition,
                     seed: int = 0) -> list[list[list[int]]]:
    """Every rank's micro batches at ``pos`` (from independent sampler instances)."""
    return [ShardedSampler(n, world, r, micro, accum, seed).next_micro_batches(pos)
            for r in range(world)]


def test_sampler_is_deterministic_and_seeded() -> None:
    a = ShardedSampler(40, 2, 1, 2, 2, seed=3)
    b = ShardedSampler(40, 2, 1, 2, 2, seed=3)
    pos = DataPosition(epoch=2, step=1)
    assert a.next_micro_batches(pos) == b.next_micro_batches(pos)
    assert a.next_micro_batches(DataPosition(0, 0)) == a.next_micro_batches(DataPosition(0, 0))
    other = ShardedSampler(40, 2, 1, 2, 2, seed=4)
    assert other.next_micro_batches(pos) != a.next_micro_batches(pos)
    plain = ShardedSampler(8, 2, 0, 1, 2, shuffle=False)
    assert plain.next_micro_batches(DataPosition()) == [[0], [2]]  # [accum, world, micro]


@pytest.mark.parametrize("n,world,micro,accum", [(48, 3, 2, 2), (50, 2, 3, 1), (7, 1, 1, 7)])
def test_epoch_has_no_repeats_and_ranks_are_disjoint_and_cover(n: int, world: int, micro: int,
                                                                accum: int) -> None:
    sampler = ShardedSampler(n, world, 0, micro, accum, seed=1)
    g = micro * accum * world
    seen: list[int] = []
    pos = DataPosition()
    for _ in range(sampler.steps_per_epoch):
        per_rank = all_rows_of_step(n, world, micro, accum, pos, seed=1)
        flat = [[i for mb in rank for i in mb] for rank in per_rank]
        assert all(len(r) == micro * accum for r in flat)
        step_rows = [i for r in flat for i in r]
        assert len(set(step_rows)) == g  # ranks disjoint, together one global batch
        assert sorted(step_rows) == sorted(sampler.global_indices(pos).ravel().tolist())
        seen += step_rows
        pos = sampler.advance(pos)
    assert len(seen) == len(set(seen)) == sampler.steps_per_epoch * g  # no repeat, none lost
    assert all(0 <= i < n for i in seen)
    if n % g == 0:
        assert sorted(seen) == list(range(n))
    assert pos == DataPosition(epoch=1, step=0)  # rolled over


def test_epochs_roll_over_with_a_new_permutation() -> None:
    s = ShardedSampler(12, 2, 0, 2, 1, seed=0)  # global batch 4, 3 steps per epoch
    assert s.normalize(DataPosition(0, 7)) == DataPosition(2, 1)
    assert s.next_micro_batches(DataPosition(0, 7)) == s.next_micro_batches(DataPosition(2, 1))
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    assert sorted(s.permutation(1)) == list(range(12))


def test_resume_from_a_saved_position_reads_the_next_unseen_batch() -> None:
    uninterrupted = ShardedSampler(30, 2, 1, 2, 2, seed=9)  # global 8, 3 steps per epoch
    pos, batches = DataPosition(), []
    for _ in range(7):
        batches.append(uninterrupted.next_micro_batches(pos))
        pos = uninterrupted.advance(pos)
    # "Crash" after 4 steps: the checkpoint holds the position, a fresh sampler continues.
    pos = DataPosition()
    for _ in range(4):
        pos = uninterrupted.advance(pos)
    saved = pos.state_dict()
    resumed = ShardedSampler(30, 2, 1, 2, 2, seed=9)
    pos = DataPosition.from_state(saved)
    assert pos == DataPosition(epoch=1, step=1)
    for want in batches[4:]:
        assert resumed.next_micro_batches(pos) == want
        pos = resumed.advance(pos)


def test_sampler_rejects_a_dataset_smaller_than_a_global_batch() -> None:
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        ShardedSampler(7, 2, 0, 2, 2)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        ShardedSampler(70, 2, 2, 2, 2)


# ----------------------------------------------------------------------------- batches
# Everything below reads the session's tiny dataset (built once by the real prep: ~40 s).
slow = pytest.mark.slow
PIXEL = AutoencoderConfig(kind="pixel", spatial_factor=4, temporal_factor=1)


@pytest.fixture(scope="module")
def encoders(tiny_encoders: dict[str, Path]):
    """Built once per module: ``(family, autoencoder kind) -> Encoders``."""
    cache: dict[tuple[str, str], object] = {}

    def get(family: str, ae: AutoencoderConfig = PIXEL):
        key = (family, ae.kind)
        if key not in cache:
            kind = "t5" if family == "dit" else "clip"
            text = TextEncoderConfig(kind=kind, path=str(tiny_encoders[
                "t5" if family == "dit" else "clip_text"]), max_length=16)
            cache[key] = EncodersConfig(ae, text).build("cpu")
        return cache[key]

    return get


def model_config(family: str, stage: int, c: int = 48, t: int = 4, hw: int = 8) -> ModelConfig:
    return ModelConfig(family=family, size=f"{family}-tiny", stage=stage, latent_channels=c,
                       num_frames=t, height=hw, width=hw)


def open_data(root: Path | str, family: str, stage: int, encoders, **data) -> TrainingData:
    return TrainingData(TrainDataConfig(dataset_root=str(root), **data), stage,
                        model_config(family, stage), encoders(family), "cpu")


@slow
@pytest.mark.parametrize("family", ["dit", "unet"])
@pytest.mark.parametrize("stage", [1, 2])
def test_batch_shapes_and_contents(tiny_dataset: Path, encoders, family: str,
                                   stage: int) -> None:
    data = open_data(tiny_dataset, family, stage, encoders)
    assert data.version == open_version(tiny_dataset).name and data.num_rows >= 8
    assert data.pixel_shape == (4, 32, 32)  # pixel AE 4x: the model's 4x8x8 latent grid
    x, cond = data.batch([0, 3], torch.Generator().manual_seed(0))
    enc = encoders(family)
    assert x.shape == (2, 48, 4, 8, 8) and x.dtype == torch.float32
    assert cond.visual.shape == (2, 97, 4, 8, 8)
    flag = cond.visual[:, 96]
    assert bool((flag[:, 0] == 1).all()) and bool((flag[:, 1:] == 0).all())
    assert cond.text.shape == (2, 16, 32) and cond.text_mask.dtype == torch.bool

    clips = data.clips([0, 3])
    target = clips[0].trajectory if stage == 1 else clips[0].frames
    pixels = (enc.autoencoder.decode(x[:1])[0].permute(1, 2, 3, 0) + 1) * 127.5
    np.testing.assert_allclose(pixels.numpy(), target.astype(np.float32), atol=1e-3)
    prompt = clips[0].c_motion if stage == 1 else clips[0].caption
    np.testing.assert_allclose(cond.text[0], enc.text.encode([prompt])[0][0], atol=1e-6)
    # E(x0) at latent frame 0, zero elsewhere (condition_frames: first, the default); stage 2
    # carries E(s) over all frames.
    first_latent = enc.autoencoder.encode(
        torch.from_numpy(np.stack([c.frames[:1] for c in clips])).permute(0, 4, 1, 2, 3)
        .float() / 127.5 - 1)
    np.testing.assert_allclose(cond.visual[:, :48, :1], first_latent, atol=1e-6)
    assert bool((cond.visual[:, :48, 1:] == 0).all())
    if stage == 1:
        assert cond.token_ids is None and cond.local_text is None
        assert bool((cond.visual[:, 48:96, 1:] == 0).all())
        # model.condition_frames: repeat (the DiT configs) copies both to every frame.
        repeat = TrainingData(TrainDataConfig(dataset_root=str(tiny_dataset)), stage,
                              dataclasses.replace(model_config(family, stage),
                                                  condition_frames="repeat"),
                              enc, "cpu")
        _, cond_repeat = repeat.batch([0, 3], torch.Generator().manual_seed(0))
        assert torch.equal(cond_repeat.visual[:, :, :1], cond.visual[:, :, :1])
        assert torch.equal(cond_repeat.visual[:, :96], cond.visual[:, :96, :1].expand(
            -1, -1, 4, -1, -1))
        assert torch.equal(cond_repeat.visual[:, 96], cond.visual[:, 96])  # flag: frame 0
        repeat.close()
    else:
        np.testing.assert_allclose(cond.visual[:, 48:96], enc.autoencoder.encode(
            torch.from_numpy(np.stack([c.trajectory for c in clips])).permute(0, 4, 1, 2, 3)
            .float() / 127.5 - 1), atol=1e-6)
        assert cond.local_text.shape[0] == 2 and cond.local_text.shape[2] == 32
        ids = set(cond.local_text_ids[0].unique().tolist())
        assert ids - {-1} == set(clips[0].local_ids)
    model = build_model(model_config(family, stage))
    if stage == 2:  # token ids on the model's own token grid (DiT: patchified; U-Net: latent)
        assert tuple(cond.token_ids.shape) == (2, *model.token_grid(4, 8, 8))
    t = torch.full((2,), 0.5) if family == "dit" else torch.full((2,), 500, dtype=torch.long)
    out = model(x, t, cond)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


@slow
@pytest.mark.parametrize("family", ["dit", "unet"])
def test_token_ids_follow_the_rendered_trajectory(tiny_dataset: Path, encoders,
                                                  family: str) -> None:
    """Every token given object k is mostly object k's colour in the trajectory video; a block
    showing a single object (or only background) gets exactly that id. Checked on every clip
    (not one row: row order follows content hashes, and a clip of one small object can
    rightly claim no token on the tiny grid)."""
    data = open_data(tiny_dataset, family, 2, encoders)
    with_tokens = 0
    for row in range(data.num_rows):
        clip = data.clips([row])[0]
        pixel_ids = trajectory_to_object_ids(clip.trajectory)  # [T, H, W] from the colours
        grid = clip.token_ids.shape
        ft, fh, fw = (s // g for s, g in zip(pixel_ids.shape, grid, strict=True))
        assert grid == ((4, 4, 4) if family == "dit" else (4, 8, 8))
        blocks = pixel_ids.reshape(grid[0], ft, grid[1], fh, grid[2], fw)
        blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(*grid, -1)
        for obj in set(np.unique(clip.token_ids).tolist()) - {-1}:
            share = (blocks[clip.token_ids == obj] == obj).mean(axis=-1)
            assert (share >= 0.5).all(), (row, obj, share.min())
        whole = (blocks == blocks[..., :1]).all(-1)  # blocks showing one object or background
        assert whole.any() and (clip.token_ids[whole] == blocks[whole][:, 0]).all(), row
        with_tokens += int((clip.token_ids >= 0).any())
    assert with_tokens > data.num_rows // 2, (with_tokens, data.num_rows)


@slow
def test_causal_video_vae_aligns_frames_and_token_grid(tiny_dataset: Path, encoders,
                                                       tiny_encoders: dict[str, Path]) -> None:
    vae = AutoencoderConfig(kind="video_vae", path=str(tiny_encoders["video_vae"]))
    mc = model_config("dit", 2, c=4, t=2, hw=8)  # Cosmos 8x8x8: 9 x 64 x 64 pixels
    data = TrainingData(TrainDataConfig(dataset_root=str(tiny_dataset)), 2, mc,
                        encoders("dit", vae), "cpu")
    assert data.pixel_shape == (9, 64, 64)
    x, cond = data.batch([2], torch.Generator())
    assert x.shape == (1, 4, 2, 8, 8) and cond.visual.shape == (1, 9, 2, 8, 8)
    assert tuple(cond.token_ids.shape) == (1, 2, 4, 4)
    # Latent frame 0 is pixel frame 0 alone: its token ids are the first frame's.
    clip = data.clips([2])[0]
    first = trajectory_to_object_ids(clip.trajectory[:1])  # [1, 64, 64]
    block = first[0].reshape(4, 16, 4, 16).transpose(0, 2, 1, 3).reshape(4, 4, -1)
    for obj in set(np.unique(clip.token_ids[0]).tolist()) - {-1}:
        assert ((block[clip.token_ids[0] == obj] == obj).mean(-1) >= 0.5).all()


@slow
def test_sizes_that_do_not_encode_to_the_model_grid_fail_clearly(tiny_dataset: Path,
                                                                  encoders) -> None:
    with pytest.raises(ValueError, match=r"encodes to a latent \[48, 4, 10, 10\].*\[48, 4, 8, 8\]"):
        open_data(tiny_dataset, "dit", 1, encoders, height=40, width=40)
    # Every row is too short: no replacement exists, and the error lists them all.
    every_row = r"(?s)(\d+) of \1 dataset rows .*9 frames, training needs 20"
    with pytest.raises(BadRowsError, match=every_row):
        TrainingData(TrainDataConfig(dataset_root=str(tiny_dataset)), 1,
                     model_config("dit", 1, t=20), encoders("dit"), "cpu").batch([0])


@slow
def test_prefetch_gives_the_same_batch_and_validation_is_fixed(tiny_dataset: Path,
                                                               encoders) -> None:
    data = open_data(tiny_dataset, "unet", 2, encoders, prefetch=2)
    data.prefetch([[4, 5], [6, 7]])
    x, cond = data.batch([4, 5])
    direct = open_data(tiny_dataset, "unet", 2, encoders, prefetch=0)
    y, cond2 = direct.batch([4, 5])
    assert torch.equal(x, y) and torch.equal(cond.token_ids, cond2.token_ids)
    assert torch.equal(cond.local_text, cond2.local_text)
    xv, _, raw = data.validation_sample()
    assert data.validation_sample()[0] is xv and xv.shape[0] == 1
    assert raw["clip_id"] == open_version(tiny_dataset).read("data").column("clip_id")[0].as_py()
    other = open_data(tiny_dataset, "unet", 2, encoders, validation_clip=raw["clip_id"])
    assert torch.equal(other.validation_sample()[0], xv)
    with pytest.raises(ValueError, match="validation_clip 'nope' is not in"):
        open_data(tiny_dataset, "unet", 2, encoders, validation_clip="nope").validation_sample()


@slow
def test_source_video_path_matches_the_embedded_clip(tiny_dataset: Path) -> None:
    row = open_version(tiny_dataset).read("data", columns=list(COLUMNS)).slice(0, 1)
    row = row.to_pylist()[0]
    spec = ClipSpec(stage=2, frames=8, height=32, width=32, token_grid=(4, 8, 8))
    embedded = prepare_clip(row, spec)
    source = prepare_clip({**row, "clip_bytes": None}, spec)
    assert np.array_equal(embedded.trajectory, source.trajectory)
    assert np.array_equal(embedded.token_ids, source.token_ids)
    # Both are the same crop of the same frames; the embedded one went through H.264 once.
    diff = np.abs(embedded.frames.astype(float) - source.frames.astype(float)).mean()
    assert diff < 8.0, diff
    with pytest.raises(BadClipError, match=f"clip '{row['clip_id']}': cannot read frames"):
        prepare_clip({**row, "clip_bytes": None, "source_uri": "/nowhere/x.mp4"}, spec)


@slow
def test_colour_slots_relabel_objects_consistently_and_reproducibly(tiny_dataset: Path) -> None:
    """data.colour_slots: every object keeps its pixels but may take another colour of the
    first N, drawn per clip from data.seed and the clip id; the trajectory, the token ids and
    the local prompts' ids all follow the same relabelling."""
    rows = open_version(tiny_dataset).read("data", columns=list(COLUMNS)).to_pylist()
    base = ClipSpec(stage=2, frames=8, height=32, width=32, token_grid=(4, 8, 8))
    relabelled = dataclasses.replace(base, colour_slots=4, colour_seed=3)
    seen: set[int] = set()
    for row in rows:
        plain, clip = prepare_clip(row, base), prepare_clip(row, relabelled)
        mapping = colour_slots_for(row["clip_id"], [o["color_index"] for o in row["masks"]], 4, 3)
        assert sorted(mapping) == sorted(plain.local_ids) or not plain.local_ids
        assert len(set(mapping.values())) == len(mapping) and max(mapping.values()) < 4
        assert clip.local_ids == [mapping[i] for i in plain.local_ids]
        lookup = np.full(NUM_COLOURS + 1, -1)  # index -1 (background) stays -1
        for old, new in mapping.items():
            lookup[old] = new
        assert np.array_equal(trajectory_to_object_ids(clip.trajectory),
                              lookup[trajectory_to_object_ids(plain.trajectory)])
        assert np.array_equal(clip.token_ids, lookup[plain.token_ids])
        assert np.array_equal(clip.frames, plain.frames)
        # the same clip gets the same colours on every call (workers, epochs, resumes)
        assert np.array_equal(prepare_clip(row, relabelled).trajectory, clip.trajectory)
        seen |= set(mapping.values())
    assert seen == {0, 1, 2, 3}, seen  # colours beyond the clips' object counts are drawn
    assert colour_slots_for("c", [0, 1], 0) == {0: 0, 1: 1}  # 0 keeps prep's colours
    # more objects than slots: the pool grows to the object count, colours stay distinct
    assert sorted(colour_slots_for("c", [0, 1, 2], 2).values()) == [0, 1, 2]
    orphan = {**rows[0], "c_local": [*rows[0]["c_local"], {"name": "x", "prompt": "x",
                                                           "color_index": 19}]}
    with pytest.raises(BadClipError, match=r"local prompt\(s\) for color_index \[19\]"):
        prepare_clip(orphan, relabelled)


def copy_version(version: DatasetVersion, root: str) -> DatasetVersion:
    """Republish ``version`` under ``root`` with the writer API workers use (write_part +
    add_entries per Parquet file, add_file for the card), under the same name."""
    writer = VersionWriter(root, name=version.name)
    for entry in version.manifest["files"]:
        if entry["table"] == "extra":
            writer.add_file(entry["path"], version.read_bytes(entry["path"]))
            continue
        with version.open_input_file(version.location(entry)) as src:
            rows = pq.read_table(src)
        writer.add_entries(entry["table"], [write_part(writer.staging_uri, entry["path"], rows)])
    return writer.publish(version.manifest["lineage"])


@slow
def test_an_s3_dataset_reads_the_same_rows_and_batches(tiny_dataset: Path, encoders,
                                                       s3_bucket: str) -> None:
    """``data.dataset_root: s3://...``: training reads the rows of a version on an object
    store (the S3 test server) exactly as from a local folder."""
    local = open_version(tiny_dataset)
    remote = copy_version(local, f"{s3_bucket}/tiny")
    remote.verify()
    assert remote.read_bytes("card/README.md") == local.read_bytes("card/README.md")
    here = open_data(tiny_dataset, "unet", 2, encoders)
    there = open_data(f"{s3_bucket}/tiny", "unet", 2, encoders)
    assert there.version == here.version and there.num_rows == here.num_rows
    everything = list(range(here.num_rows))[::-1]
    assert RowReader(remote).rows(everything) == RowReader(local).rows(everything)
    (x_here, c_here), (x_there, c_there) = here.batch([0, 3]), there.batch([0, 3])
    assert torch.equal(x_there, x_here) and torch.equal(c_there.visual, c_here.visual)
    assert torch.equal(c_there.token_ids, c_here.token_ids)


# ----------------------------------------------------------------------------- bad rows
@pytest.fixture(scope="module")
def bad_dataset(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version whose rows 0/1/2 lack masks / caption / c_motion (what a broken prep or a
    hand-edited shard could publish)."""
    table = open_version(tiny_dataset).read("data")
    rows = table.to_pylist()
    rows[0]["masks"] = []
    rows[1]["caption"] = "  "
    rows[2]["c_motion"] = ""
    root = tmp_path_factory.mktemp("bad_dataset")
    writer = VersionWriter(root)
    writer.write_table("data", pa.Table.from_pylist(rows, schema=table.schema))
    writer.publish({"note": "test: broken rows"})
    return root


@slow
@pytest.mark.parametrize("stage,row,reason", [
    (1, 0, "no object masks"), (2, 0, "no object masks"),
    (2, 1, "empty caption"), (1, 2, "empty c_motion"),
])
def test_bad_rows_are_skipped_replaced_and_counted(bad_dataset: Path, encoders, stage: int,
                                                   row: int, reason: str) -> None:
    """A bad row never fails the step: it is recorded with its clip id and reason, and the
    next good row takes its place (deterministically, so a resumed run sees the same batch)."""
    data = open_data(bad_dataset, "dit", stage, encoders)
    clip_id = open_version(bad_dataset).read("data").column("clip_id")[row].as_py()
    x, _ = data.batch([3, row])
    assert x.shape[0] == 2
    assert f"clip '{clip_id}': {reason}" in data.bad_rows[row]
    good = min(i for i in range(row + 1, data.num_rows) if i not in data.bad_rows)
    assert set(range(row, good)) <= set(data.bad_rows)  # every row skipped on the way
    same, _ = open_data(bad_dataset, "dit", stage, encoders).batch([3, good])
    torch.testing.assert_close(x, same)
    assert data.batch([3, 4])[0].shape[0] == 2  # the worker is still usable


@slow
def test_empty_caption_allowed_when_the_encoder_maps_it_to_null(bad_dataset: Path,
                                                                encoders) -> None:
    text = encoders("dit").text
    text.empty_prompt = "null"  # text_encoder.empty_prompt: null
    try:
        _, cond = open_data(bad_dataset, "dit", 2, encoders).batch([1])
        np.testing.assert_allclose(cond.text, text.null(1)[0], atol=1e-6)
    finally:
        text.empty_prompt = "error"
