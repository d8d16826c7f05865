"""The item writer: atomic folders, and nothing left behind by a writer that was killed."""

from __future__ import annotations

import json

import numpy as np

from ttm_ray.inference.generate import GenerationOutput
from ttm_ray.inference.outputs import is_done, item_dir, read_record, write_outputs


def _output(item_id: str) -> GenerationOutput:
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    return GenerationOutput(item_id=item_id, video=video, trajectory=video.copy(),
                            masks=np.zeros((1, 4, 16, 16), bool), image=video[0],
                            stage1_ran=True, seconds={}, record={"item_id": item_id})


def test_a_killed_writers_temp_folder_is_removed_by_the_next_write_of_that_item(tmp_path):
    # What SIGKILL mid-item leaves: a half-written temporary folder, no generation.json.
    stale = tmp_path / ".clip_a.tmp-deadbeef"
    stale.mkdir()
    (stale / "video.mp4").write_bytes(b"half")
    other = tmp_path / ".clip_b.tmp-0badf00d"  # another item's: not this write's to remove
    other.mkdir()

    folder = write_outputs(tmp_path, _output("clip_a"), fps=8.0)

    assert folder == item_dir(tmp_path, "clip_a") and is_done(tmp_path, "clip_a")
    assert not stale.exists()
    assert other.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "first_frame.png", "generation.json", "overlay.mp4", "trajectory.mp4", "video.mp4"]
    assert read_record(tmp_path, "clip_a")["item_id"] == "clip_a"


def test_a_rewrite_replaces_the_folder_whole(tmp_path):
    write_outputs(tmp_path, _output("clip_a"), fps=8.0, extra={"run": 1})
    write_outputs(tmp_path, _output("clip_a"), fps=8.0, extra={"run": 2})
    assert json.loads((item_dir(tmp_path, "clip_a") / "generation.json").read_text())["run"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["clip_a"]
