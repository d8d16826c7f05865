"""The motion learning task (``ttm-ray synth --task motion``): splits, labels, prompts, and
masks that the SA-V reader reads back exactly."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep.parsing import parse_motion_prompt, validate_object_prompts
from data_prep.synthetic import OBJECT_COLORS
from data_prep.synthetic_task import (
    CELL,
    MOTIONS,
    NUM_FRAMES,
    START_COLORS,
    TARGET_COLORS,
    generate_task,
    heldout_cell,
    heldout_combo,
    make_clip,
    render_clip,
)
from ttm_ray.dataset.sav_format import read_sav_annotation

SEED = 3
N = 42  # 6 clips of each of the 7 motions


def _clips(split: str) -> list:
    return [make_clip(SEED, i, split) for i in range(N)]


def test_splits_hold_out_positions_combinations_and_counts() -> None:
    train, heldout = _clips("train"), _clips("heldout")
    assert [c.motion for c in train] == [MOTIONS[i % len(MOTIONS)] for i in range(N)]
    for clip in train:
        assert 1 <= len(clip.objects) <= 2
        for o in clip.objects:
            assert not heldout_cell(*o.centre)
            assert not heldout_combo(o.shape, o.start_color)
            assert not heldout_combo(o.shape, o.target_color)
    for clip in heldout:
        assert all(heldout_cell(*o.centre) for o in clip.objects)
        assert any(heldout_combo(o.shape, o.start_color) or heldout_combo(o.shape, o.target_color)
                   for o in clip.objects)
    assert {len(c.objects) for c in heldout} == {1, 2, 3}
    # Every object of a clip has its own shape, start colour and target colour.
    for clip in train + heldout:
        for attr in ("shape", "start_color", "target_color"):
            values = [getattr(o, attr) for o in clip.objects]
            assert len(set(values)) == len(values)
    assert CELL > 0 and make_clip(SEED, 5, "train") == train[5]  # a pure function


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_objects_do_what_the_motion_prompt_says_and_turn_their_own_colour(split: str) -> None:
    for clip in _clips(split)[:21]:
        frames, ids = render_clip(clip)
        assert frames.shape == (NUM_FRAMES, 64, 64, 3) and ids.max() == len(clip.objects)
        for k, o in enumerate(clip.objects):
            first, last = ids[0] == k + 1, ids[-1] == k + 1
            dx, dy = _centroid(last) - _centroid(first)
            growth = last.sum() / first.sum()
            expected = {"left": dx < -15, "right": dx > 15, "up": dy < -15, "down": dy > 15,
                        "grow": growth > 2.0, "shrink": growth < 0.4,
                        "stay": abs(dx) + abs(dy) < 0.5 and growth == 1.0}
            assert expected[clip.motion], (clip.video_id, clip.motion, dx, dy, growth)
            np.testing.assert_array_equal(frames[0][first][0], OBJECT_COLORS[o.start_color])
            np.testing.assert_array_equal(frames[-1][last][0], OBJECT_COLORS[o.target_color])
            assert (frames[-1][last] == frames[-1][last][0]).all()  # flat colours


def test_only_the_local_prompts_bind_a_colour_to_an_object() -> None:
    for clip in _clips("heldout"):
        motion = clip.motion_prompt()
        assert parse_motion_prompt(motion) == motion
        words = set(re.findall(r"[a-z]+", motion.lower()))
        assert not words & set(TARGET_COLORS)  # stage 1's prompt says nothing of colours
        prompts = clip.object_prompts
        assert [p.name for p in validate_object_prompts(
            [(p["name"], p["prompt"]) for p in prompts])] == [o.name for o in clip.objects]
        for k, o in enumerate(clip.objects):
            own = set(re.findall(r"[a-z]+", prompts[k]["prompt"].lower()))
            assert o.target_color in own and o.name.split()[1] in own
            assert not own & (set(TARGET_COLORS) - {o.target_color})
        if len(clip.objects) > 1:
            caption = clip.caption
            for o in clip.objects:  # names every change, pairs none with an object
                assert f"one turns {o.target_color}" in caption.lower()
                assert not re.search(rf"{o.shape}[^.]*turns", caption), caption
    # Swapping a motion word is what the evaluation's prompt swap does.
    clip = make_clip(SEED, 0, "train")
    assert "left" in clip.motion_prompt() and "right" in clip.motion_prompt("right")


def test_generate_task_writes_a_corpus_the_reader_agrees_with(tmp_path: Path) -> None:
    manifest = generate_task(tmp_path / "a", 7, "heldout", seed=SEED)
    rows = pq.read_table(manifest).to_pylist()
    labels = [json.loads(line) for line in (tmp_path / "a" / "task.jsonl").read_text().splitlines()]
    assert [r["video_id"] for r in rows] == [lab["video_id"] for lab in labels]
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        clip = make_clip(SEED, i, "heldout")
        assert lab["motion"] == clip.motion == MOTIONS[i]
        assert lab["target_colors"] == [o.target_color for o in clip.objects]
        assert row["motion_prompt"] == clip.motion_prompt() and row["caption"] == clip.caption
        _, ids = render_clip(clip)
        ann = read_sav_annotation(manifest.parent / row["annotation"])
        assert ann.num_objects == len(clip.objects) == row["num_objects"]
        want = ids[:, None] == np.arange(1, ann.num_objects + 1)[None, :, None, None]
        np.testing.assert_array_equal(ann.all_masks(), want)
    # Same seed, same bytes.
    generate_task(tmp_path / "b", 7, "heldout", seed=SEED)
    for name in ("manifest.parquet", "task.jsonl", f"videos/{rows[3]['video_id']}.mp4"):
        assert (hashlib.sha256((tmp_path / "a" / name).read_bytes()).digest()
                == hashlib.sha256((tmp_path / "b" / name).read_bytes()).digest()), name
    assert set(START_COLORS).isdisjoint(TARGET_COLORS)


def test_synth_cli_task_motion(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.synth import main

    assert main(["--out", str(tmp_path / "t"), "--task", "motion", "--videos", "3",
                 "--split", "heldout"]) == 0
    assert len((tmp_path / "t" / "task.jsonl").read_text().splitlines()) == 3
    assert main(["--out", str(tmp_path / "u"), "--task", "motion", "--videos", "3",
                 "--corrupt", "1"]) != 0
    assert "the motion task has no broken inputs" in capsys.readouterr().out
    # A split without the motion task would be ignored: refused instead.
    assert main(["--out", str(tmp_path / "v"), "--videos", "3", "--split", "heldout"]) != 0
    assert "applies to task=motion only" in capsys.readouterr().out
    assert not (tmp_path / "v").exists()
