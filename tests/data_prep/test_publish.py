"""Shard rows: every local prompt keeps the colour of its own object's mask."""

from __future__ import annotations

from data_prep.publish import row_to_shard
from data_prep.rows import new_row


def _masks(*names: str) -> list[dict]:
    rle = [{"size": [2, 2], "counts": "4"}]
    return [{"name": n, "color_index": i, "rle": rle} for i, n in enumerate(names)]


def test_dropped_object_prompt_never_takes_another_objects_colour() -> None:
    # "dog" was named by the LLM but got no box: masks hold cat -> 0 and ball -> 1.
    row = new_row(clip_id="c", video_id="v", source_uri="v.mp4",
                  c_local=[{"name": "cat", "prompt": "a cat"}, {"name": "dog", "prompt": "a dog"},
                           {"name": "ball", "prompt": "a ball"}],
                  masks=_masks("cat", "ball"))
    shard = row_to_shard(row)
    assert shard["c_local"] == [{"name": "cat", "prompt": "a cat", "color_index": 0},
                                {"name": "ball", "prompt": "a ball", "color_index": 1}]


def test_caption_only_rows_keep_prompt_order() -> None:
    row = new_row(clip_id="c", video_id="v", source_uri="v.mp4",
                  c_local=[{"name": "cat", "prompt": "a cat"}, {"name": "dog", "prompt": "a dog"}],
                  masks=[])
    assert [o["color_index"] for o in row_to_shard(row)["c_local"]] == [0, 1]
