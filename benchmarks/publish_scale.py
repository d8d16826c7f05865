"""How publish, refilter and an incremental publish grow with the work store's row count.

For each ``--rows N``: a synthetic work store of N realistic rows (RLE masks of 16 frames x 3
objects at 256x256, captions, motion and object prompts, scores; 5% rejects) written by the
real :class:`~data_prep.writer.PartWriter` in 500-row parts, then, each in one measuring
process on a local Ray (2 CPUs):

1. publish it (``data_prep.publish.publish_work_store``),
2. refilter it with a stricter omega,
3. append 10% new rows as a second run and publish again incrementally (with the refilter's
   thresholds, as a user who adopted them would).

Prints driver peak RSS (the measuring process's ``ru_maxrss``; the work store is generated in
child processes, so it is not counted), seconds and bytes written per step. The baseline is
the smallest N run by the same command: ``rss_ratio`` is each N's peak over the smallest N's.
The last line is JSON: ``{"rows": {"<N>": {"driver_peak_rss_mb", "publish_s", "refilter_s",
"incremental_s", "first_bytes", "incremental_bytes", "incremental_bytes_ratio"}}, ...}``.

    python benchmarks/publish_scale.py --rows 20000 --rows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART_ROWS = 500
FRAMES, OBJECTS, SIZE = 16, 3, 256


def _template(n: int, seed: int) -> list[dict]:
    """``n`` distinct realistic rows (masks are moving ellipses, RLE-encoded)."""
    import numpy as np

    from data_prep.rows import new_row, reject
    from ttm_ray.dataset.rle import encode_mask

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    rows = []
    for i in range(n):
        masks, scores, local = [], [], []
        for o in range(OBJECTS):
            cy, cx = rng.uniform(40, SIZE - 40, 2)
            ry, rx = rng.uniform(10, 40, 2)
            vy, vx = rng.uniform(-3, 3, 2)
            rle = []
            for f in range(FRAMES):
                m = ((yy - cy - vy * f) / ry) ** 2 + ((xx - cx - vx * f) / rx) ** 2 <= 1
                rle.append(encode_mask(m))
            name = f"object {o}"
            masks.append({"name": name, "color_index": o, "rle": rle})
            scores.append({"name": name, "persistence": float(rng.uniform(0.8, 1)),
                           "centroid_motion": float(rng.uniform(0, 0.05)),
                           "motion_iou_gap": float(rng.uniform(0, 1)),
                           "track_confidence": None})
            local.append({"name": name, "prompt": f"the {name} moves slowly to the left "
                                                  "across the frame while turning"})
        row = new_row(
            video_id="v", source_uri="s3://corpus/v.mp4", clip_id="c", clip_index=0,
            start_frame=0, end_frame=FRAMES * 3, frame_indices=list(range(0, FRAMES * 3, 3)),
            clip_fps=8.0, num_frames=FRAMES, src_fps=24.0, src_num_frames=300,
            src_height=720, src_width=1280, src_bytes=5_000_000, video_clips=4,
            caption="A person walks a dog along a beach at sunset while waves roll in. " * 2,
            c_motion="The dog runs ahead, then turns back toward the person.",
            c_local=local, masks=masks, mask_source="sam2", object_scores=scores,
            score_temporal_min=float(rng.uniform(0.9, 1.0)),
            score_temporal_mean=float(rng.uniform(0.95, 1.0)), attempts=1,
            caption_model="llama-3.2-11b-vision", prompts_model="llama-3.1-8b")
        rows.append(reject(row, "segment", "segmentation_failed", "no mask")
                    if i % 20 == 0 else row)
    return rows


def generate(work: Path, rows: int, start: int, seed: int) -> None:
    """Append ``rows`` rows (ids from ``start``) to the work store as one run."""
    import pyarrow as pa

    from data_prep.rows import to_table
    from data_prep.writer import PartWriter

    template = to_table(_template(PART_ROWS, seed))
    writer = PartWriter(work, flush_rows=PART_ROWS, flush_seconds=3600)
    for offset in range(start, start + rows, PART_ROWS):
        n = min(PART_ROWS, start + rows - offset)
        ids = [f"vid{(offset + i) // 4:08d}" for i in range(n)]
        table = template.slice(0, n)
        for name, values in (("video_id", ids),
                             ("clip_id", [f"{v}-c{(offset + i) % 4}" for i, v in
                                          enumerate(ids)]),
                             ("source_uri", [f"s3://corpus/{v}.mp4" for v in ids])):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array(values, pa.string()))
        writer.add(table)
    writer.close()


def _generate_child(work: Path, rows: int, start: int, seed: int) -> None:
    subprocess.run([sys.executable, __file__, "--generate", str(work), "--count", str(rows),
                    "--start", str(start), "--seed", str(seed)], check=True, cwd=ROOT)


def measure(work: Path, root: Path, rows: int) -> dict:
    """The three steps in this process; returns its numbers (run as a child per N)."""
    import ray

    from data_prep.filtering import FilterConfig
    from data_prep.publish import publish_work_store, refilter_version

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    t = time.perf_counter()
    first = publish_work_store(work, root, FilterConfig(omega=0.9), {"bench": rows})
    publish_s = time.perf_counter() - t
    t = time.perf_counter()
    strict = FilterConfig(omega=0.95)
    refiltered = refilter_version(root, strict, {"bench": rows})
    refilter_s = time.perf_counter() - t
    _generate_child(work, rows // 10, rows, seed=1)
    t = time.perf_counter()
    incremental = publish_work_store(work, root, strict, {"bench": rows})
    incremental_s = time.perf_counter() - t
    ray.shutdown()
    assert incremental.stats.kept + incremental.stats.rejected == rows + rows // 10
    return {"driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024, 1),
            "publish_s": round(publish_s, 2), "refilter_s": round(refilter_s, 2),
            "incremental_s": round(incremental_s, 2),
            "first_bytes": first.written_bytes, "refilter_bytes": refiltered.written_bytes,
            "incremental_bytes": incremental.written_bytes,
            "incremental_bytes_ratio": round(incremental.written_bytes
                                             / first.written_bytes, 4),
            "kept": incremental.stats.kept,
            "reused_groups": incremental.reused_groups, "new_groups": incremental.new_groups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="work-store rows (repeat)")
    parser.add_argument("--dir", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.generate:
        generate(args.generate, args.count, args.start, args.seed)
        return 0
    if args.measure:
        result = measure(args.measure / "work", args.measure / "dataset", args.count)
        print(json.dumps(result))
        return 0
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in sorted(args.rows or [20_000]):
            base = Path(tmp) / f"n{n}"
            t = time.perf_counter()
            _generate_child(base / "work", n, 0, seed=0)
            print(f"[publish_scale] {n} rows generated in {time.perf_counter() - t:.1f}s",
                  file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--measure", str(base), "--count",
                                  str(n)], check=True, cwd=ROOT, capture_output=True,
                                 text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
            results[str(n)] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[str(n)]
            print(f"[publish_scale] rows={n:>7}  driver peak RSS {r['driver_peak_rss_mb']:>7} "
                  f"MB  publish {r['publish_s']:>6}s  refilter {r['refilter_s']:>6}s  "
                  f"incremental {r['incremental_s']:>6}s  bytes first {r['first_bytes']} "
                  f"incremental {r['incremental_bytes']} "
                  f"(ratio {r['incremental_bytes_ratio']})", flush=True)
    smallest = results[min(results, key=int)]["driver_peak_rss_mb"]
    for r in results.values():
        r["rss_ratio"] = round(r["driver_peak_rss_mb"] / smallest, 3)
    print(json.dumps({"rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
