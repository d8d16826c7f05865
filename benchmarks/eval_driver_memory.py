"""Evaluate-job driver memory against benchmark size: scoring on Ray actors vs in the driver.

    .venv/bin/python benchmarks/eval_driver_memory.py [--sizes 10 40] [--frames 48]
        [--paths ray local old]

Builds, in a temp dir: a generated corpus (``data_prep.synthetic``) and its benchmark
manifest, stand-in generated outputs for every item (the item's sampled reference clip,
downscaled, with the ``generation.json`` evaluation reads: scoring is under test, not
generation), an export folder holding only ``export.json`` (the clip length, ``--frames``,
that evaluation samples references at: it sets how much a decoded reference weighs; corpus
frames are at most 320x240) and the quickstart's tiny metric backbones (CLIP, X-CLIP, R3D-18;
Lucas-Kanade flow). Then for each size N it runs ``ttm-ray evaluate --skip-generation`` with
jobs/configs/evaluate/quickstart.yaml on the first N items in a fresh subprocess and reads
the driver's peak RSS there (``getrusage(RUSAGE_SELF)`` at exit: the driver process alone,
not Ray's raylet or actors).

Paths (``--paths``):

* ``ray``: the job as shipped (``evaluation.score.engine: ray``): decode + scoring on one CPU
  actor, the driver streams back per-item values and FVD features.
* ``local``: ``evaluation.score.engine: local``: the same chunks scored in the driver, one
  chunk in memory at a time.
* ``old``: the driver path before this change (every item's reference video decoded into a
  list in the driver, then ``Evaluator.evaluate``), patched in for comparison.

The headline is the ratio peak(40) / peak(10) per path (target for ``ray``: <= 1.3), with
the growth in MiB per item beside it. Ends
with one JSON line (``{"benchmark": "eval_driver_memory", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "evaluate" / "quickstart.yaml"
VARIANT = "generated_manual"
FPS = 8.0

# Run inside the subprocess: the job's main, then the driver's own peak RSS (KiB on Linux).
_CHILD = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
if {old!r}:
    from pathlib import Path
    import ttm_ray.evaluation.benchmark as B

    def old_evaluate_variants(evaluator, items, out_dir, variants, frames, fps, **_):
        # The pre-change driver path: list(eval_items(...)) holds every decoded reference.
        results, missing = {{}}, {{}}
        for v in variants:
            gone = []
            scored = list(B.eval_items(items, Path(out_dir) / v, frames, fps, gone))
            missing[v] = gone
            if scored:
                results[v] = evaluator.evaluate(scored)
        return results, missing

    B.evaluate_variants = old_evaluate_variants
from jobs.evaluate import main
code = main({argv!r})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"driver_peak_rss_kib": peak, "exit": code}}), file=sys.stderr)
sys.exit(code)
"""


def build_inputs(root: Path, n_max: int, frames: int) -> dict[str, Path]:
    """Corpus, manifest, stand-in outputs, a shape-only export and tiny backbones."""
    import numpy as np

    from data_prep.synthetic import generate_corpus, write_benchmark_manifest
    from ttm_ray.dataset.video import resize_center_crop, write_video
    from ttm_ray.evaluation import tiny
    from ttm_ray.inference.items import load_items, load_pixels

    # Long enough that every reference has `frames` samples at FPS.
    corpus = generate_corpus(root / "corpus", n_max, seed=11,
                             min_seconds=(frames + 1) / FPS)
    manifest = write_benchmark_manifest(corpus, root / "manifest_all.jsonl")
    items = load_items(str(manifest))
    gen = root / "generated"
    for item in items:
        folder = gen / VARIANT / item.item_id
        folder.mkdir(parents=True, exist_ok=True)
        ref = load_pixels(item, frames, FPS).reference
        h, w = ref.shape[1:3]
        clip = resize_center_crop(ref, h // 4 * 2, w // 4 * 2)[::-1]  # reversed: not a copy
        write_video(folder / "video.mp4", np.ascontiguousarray(clip), FPS)
        (folder / "generation.json").write_text(json.dumps({"objects": [1]}))
    export = root / "export"
    export.mkdir(exist_ok=True)
    (export / "export.json").write_text(json.dumps({"pixel_shape": [frames, 64, 64]}))
    models = root / "models"
    return {"manifest": manifest, "generated": gen, "export": export,
            "clip": tiny.build_tiny_clip(models / "clip"),
            "xclip": tiny.build_tiny_xclip(models / "xclip"),
            "fvd": tiny.build_tiny_fvd_weights(models / "fvd")}


def run_one(inputs: dict[str, Path], root: Path, n: int, path: str) -> dict:
    """One evaluate run on the first ``n`` items in a subprocess; its driver peak RSS."""
    lines = inputs["manifest"].read_text().splitlines()[:n]
    manifest = root / f"manifest_{n}.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = root / f"eval_{path}_{n}"
    # The stand-in outputs are the job's "already generated" items.
    (out / VARIANT).mkdir(parents=True, exist_ok=True)
    for line in lines:
        item_id = json.loads(line)["id"]
        target = out / VARIANT / item_id
        if not target.exists():
            target.symlink_to(inputs["generated"] / VARIANT / item_id)
    argv = ["--config", str(CONFIG), "--no-progress", "--skip-generation",
            "--set", f"manifest={manifest}", "--set", f"out_dir={out}",
            "--set", f"run.mlflow_tracking_uri=sqlite:///{root / f'mlflow_{path}_{n}.db'}",
            "--set", f"generation.stage1.export={inputs['export']}",
            "--set", f"generation.stage2.export={inputs['export']}",
            "--set", f"batch.variants=[{VARIANT}]", "--set", f"batch.fps={FPS}",
            "--set", "engine=ray",
            "--set", f"evaluation.score.engine={'ray' if path == 'ray' else 'local'}",
            "--set", f"evaluation.clip.path={inputs['clip']}",
            "--set", f"evaluation.viclip.path={inputs['xclip']}",
            "--set", f"evaluation.fvd.weights={inputs['fvd']}",
            "--set", "run.num_cpus=2"]
    code = _CHILD.format(repo=str(REPO), old=path == "old", argv=argv)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{path} n={n} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak = next(json.loads(line) for line in reversed(proc.stderr.splitlines())
                if line.startswith('{"driver_peak_rss_kib"'))["driver_peak_rss_kib"]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    progress = [ln for ln in proc.stderr.splitlines() if "items scored" in ln]
    import csv

    with (Path(summary["report"]) / f"{VARIANT}_per_video.csv").open() as f:
        per_video = {row.pop("video_id"): row for row in csv.DictReader(f)}
    return {"path": path, "items": n, "driver_peak_rss_mib": round(peak / 1024, 1),
            "wall_s": round(wall, 1), "scored": summary["scored"].get(VARIANT),
            "rejected": summary.get("rejected", {}).get(VARIANT, 0),
            "fvd": summary["all"][VARIANT]["fvd"], "progress_lines": len(progress),
            "all": summary["all"][VARIANT], "per_video": per_video}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10, 40], metavar=("SMALL",
                                                                               "LARGE"))
    parser.add_argument("--paths", nargs="+", default=["ray", "old"],
                        choices=["ray", "local", "old"])
    parser.add_argument("--frames", type=int, default=48,
                        help="reference frames per item (the export's clip length)")
    parser.add_argument("--keep", help="work dir to keep (default: a temp dir, removed)")
    args = parser.parse_args()
    small, large = args.sizes
    with tempfile.TemporaryDirectory(prefix="eval_mem_") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"building {large} items under {root} ...", file=sys.stderr)
        inputs = build_inputs(root, large, args.frames)
        runs: list[dict] = []
        for path in args.paths:
            for n in (small, large):
                r = run_one(inputs, root, n, path)
                print(f"{path:>5} n={n:>3}: driver peak RSS {r['driver_peak_rss_mib']:8.1f} MiB"
                      f"  ({r['wall_s']} s, scored {r['scored']}, rejected {r['rejected']}, "
                      f"progress lines {r['progress_lines']})", file=sys.stderr)
                runs.append(r)
    ratios, slopes = {}, {}
    for path in args.paths:
        a, b = (next(r for r in runs if r["path"] == path and r["items"] == n)
                for n in (small, large))
        ratios[path] = round(b["driver_peak_rss_mib"] / a["driver_peak_rss_mib"], 3)
        slopes[path] = round((b["driver_peak_rss_mib"] - a["driver_peak_rss_mib"])
                             / (large - small), 2)
        print(f"{path:>5}: peak({large}) / peak({small}) = {ratios[path]:.3f}; "
              f"{slopes[path]:+.2f} MiB per item", file=sys.stderr)
    same = {}
    if "ray" in args.paths and len(args.paths) > 1:
        for path in args.paths:
            if path == "ray":
                continue
            for n in (small, large):
                a, b = (next(r for r in runs if r["path"] == p and r["items"] == n)["all"]
                        for p in ("ray", path))
                same[f"ray_vs_{path}_{n}"] = {
                    m: (None if a[m] is None else abs(a[m] - b[m]) / max(abs(b[m]), 1e-12))
                    for m in a}
                pa, pb = (next(r for r in runs if r["path"] == p and r["items"] == n)
                          ["per_video"] for p in ("ray", path))
                assert pa.keys() == pb.keys(), (path, n)
                metrics = [m for m in next(iter(pa.values())) if m != "subset"]
                same[f"ray_vs_{path}_{n}_per_item_max_abs"] = {
                    m: max(abs(float(pa[k][m]) - float(pb[k][m])) for k in pa
                           if pa[k][m] and pb[k][m]) for m in metrics}
    print(json.dumps({"benchmark": "eval_driver_memory", "sizes": [small, large],
                      "reference_frames": args.frames,
                      "ratio_large_over_small": ratios, "target_ray": 1.3,
                      "mib_per_item": slopes,
                      "relative_difference": same,
                      "runs": [{k: v for k, v in r.items() if k not in ("all", "per_video")}
                               for r in runs]}))


if __name__ == "__main__":
    main()
