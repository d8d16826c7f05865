"""Training's shard reader: shuffled samples per second, old layout vs the one built for random
access (issue 14).

One synthetic dataset version of ``rows`` realistic shard rows (SHARD_SCHEMA: RLE masks of
16 frames x 3 objects at 256x256, captions, motion and local prompts, scores; the rows of
``publish_scale``'s template converted by publish's ``row_to_shard``, tiled as Arrow slices
with unique clip ids), written twice in 10,000-row files:

* **old**: one row group per file (pyarrow's default, what publish wrote before), read through
  :class:`~ttm_ray.training.clips.RowReader` with its old 4-group cache in the old global
  permutation of all rows;
* **new**: publish's row groups (``publish.row_group_rows`` / ``row_group_bytes``), read with
  the default ``data.row_group_cache`` in the sampler's order (row groups shuffled, rows
  shuffled within windows of ``data.shuffle_groups`` groups).

Both time the first ``samples`` rows of epoch 0's order, ``reader.row(i)`` one at a time as
:class:`~ttm_ray.training.data.TrainingData` does, in this process. ``new_layout_global`` is
the new layout in the old global order (what the layout alone gives). Each timed read stops
after ``max_seconds`` (then the rate is over the samples read). The last line printed
is the result as JSON:
``{"old_samples_per_s", "new_samples_per_s", "reader_speedup", "rows", "row_group_rows", ...}``.

    python benchmarks/train_data_reader.py [--rows 50000] [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # the repo (ttm_ray, data_prep) and publish_scale
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from data_prep.publish import ROW_GROUP_BYTES, ROW_GROUP_ROWS, row_to_shard  # noqa: E402
from ttm_ray.dataset.schema import SHARD_SCHEMA  # noqa: E402
from ttm_ray.dataset.versions import DatasetVersion, VersionWriter, write_part  # noqa: E402
from ttm_ray.training.clips import RowReader  # noqa: E402
from ttm_ray.training.data import ShardedSampler, TrainDataConfig  # noqa: E402

FILE_ROWS = 10_000  # publish.rows_per_file's default
OLD_CACHE_GROUPS = 4  # data.row_group_cache's default before issue 14
TEMPLATE_ROWS = 64


def shard_table(rows: int, seed: int = 0) -> pa.Table:
    """``rows`` realistic shard rows: a few distinct templates tiled, unique clip ids."""
    from publish_scale import _template  # the realistic pipeline rows publish_scale writes

    kept = [row_to_shard(r) for r in _template(TEMPLATE_ROWS, seed) if r["status"] == "ok"]
    template = pa.Table.from_pylist(kept, schema=SHARD_SCHEMA)
    table = pa.concat_tables([template] * -(-rows // template.num_rows)).slice(0, rows)
    ids = pa.array([f"clip-{i:08d}" for i in range(rows)])
    return table.set_column(table.schema.get_field_index("clip_id"), "clip_id", ids)


def write_version(root: Path, table: pa.Table, row_group_rows: int | None,
                  row_group_bytes: int | None) -> DatasetVersion:
    """``table`` as a version of FILE_ROWS-row files with the given row groups."""
    writer = VersionWriter(root)
    for k, offset in enumerate(range(0, table.num_rows, FILE_ROWS)):
        entry = write_part(writer.staging_uri, f"data/part-{k:05d}.parquet",
                           table.slice(offset, FILE_ROWS), row_group_rows, row_group_bytes)
        writer.add_entries("data", [entry])
    return writer.publish({"note": "benchmarks/train_data_reader.py"})


def timed_read(version: DatasetVersion, order: Sequence[int], cache_groups: int,
               max_seconds: float) -> dict[str, float]:
    """Read ``order`` row by row through a fresh reader: samples/s and groups read. Stops
    after ``max_seconds`` (the old layout can take minutes; its miss rate is steady once the
    cache is warm, so the rate over the samples read stands for the rest)."""
    reader = RowReader(version, cache_groups=cache_groups)
    start, read = time.perf_counter(), 0
    for index in order:
        reader.row(int(index))
        read += 1
        if time.perf_counter() - start > max_seconds:
            break
    seconds = time.perf_counter() - start
    return {"samples_per_s": read / seconds, "seconds": seconds, "samples_read": read,
            "groups_read": reader.groups_read, "row_groups": len(reader.group_rows)}


def epoch_order(rows: int, group_rows: Sequence[int] | None, cfg: TrainDataConfig
                ) -> np.ndarray:
    """Epoch 0's row order as training draws it (one rank, batch 1)."""
    return ShardedSampler(rows, 1, 0, 1, 1, seed=cfg.seed, shuffle=True,
                          group_rows=group_rows,
                          shuffle_groups=cfg.shuffle_groups).permutation(0)


def measure_reader(rows: int = 50_000, samples: int = 2_000, workdir: Path | None = None,
                   max_seconds: float = 60.0) -> dict[str, Any]:
    """Shuffled-read throughput of the old and new shard layouts (see the module docstring).
    ``workdir``: where the two versions are written (a temporary folder when ``None``);
    ``max_seconds``: time cap of each timed read (see :func:`timed_read`)."""
    samples = min(samples, rows)
    cfg = TrainDataConfig()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        table = shard_table(rows)
        old = write_version(Path(tmp) / "old", table, None, None)
        new = write_version(Path(tmp) / "new", table, ROW_GROUP_ROWS, ROW_GROUP_BYTES)
        global_order = epoch_order(rows, None, cfg)[:samples]
        new_groups = RowReader(new).group_rows
        old_run = timed_read(old, global_order, OLD_CACHE_GROUPS, max_seconds)
        new_run = timed_read(new, epoch_order(rows, new_groups, cfg)[:samples],
                             cfg.row_group_cache, max_seconds)
        layout_only = timed_read(new, global_order, cfg.row_group_cache, max_seconds)
    return {
        "old_samples_per_s": round(old_run["samples_per_s"], 1),
        "new_samples_per_s": round(new_run["samples_per_s"], 1),
        "reader_speedup": round(new_run["samples_per_s"] / old_run["samples_per_s"], 2),
        "new_layout_global_order_samples_per_s": round(layout_only["samples_per_s"], 1),
        "rows": rows, "samples": samples, "file_rows": FILE_ROWS,
        "row_group_rows": ROW_GROUP_ROWS, "row_group_bytes": ROW_GROUP_BYTES,
        "shuffle_groups": cfg.shuffle_groups, "row_group_cache": cfg.row_group_cache,
        "old_row_group_cache": OLD_CACHE_GROUPS,
        "old_samples_read": old_run["samples_read"], "new_samples_read": new_run["samples_read"],
        "old_groups_read": old_run["groups_read"], "new_groups_read": new_run["groups_read"],
        "old_row_groups": old_run["row_groups"], "new_row_groups": new_run["row_groups"],
        "bytes_per_row": round(table.nbytes / rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=2_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    print(json.dumps(measure_reader(args.rows, args.samples, args.workdir, args.max_seconds)))


if __name__ == "__main__":
    main()
