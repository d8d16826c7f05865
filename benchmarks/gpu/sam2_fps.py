"""SAM2.1 video propagation frames/s (hiera-tiny and hiera-large, random weights, 1024 px),
against the A100 figures of SAM2's README.

    python benchmarks/gpu/sam2_fps.py [--models tiny large] [--resolution 1024] [--frames 64]
        [--runs 2] [--vos-optimized] [--no-stage] [--cpu-smoke]

The predictor is built as data prep builds it: ``data_prep.stages.segment.build_predictor``
(hydra config from the sam2 package, ``allow_random_weights``: no checkpoint, so nothing is
downloaded; speed does not depend on the weights' values). Frames: ``--frames`` random
540 x 960 frames, resized and normalised once with ``preprocess_frames``.

Two numbers per model:

* **propagate FPS**: SAM2's own benchmark method (``sam2/benchmark.py``): one object prompted
  on frame 0 (a box), then ``propagate_in_video`` over all frames timed, bf16 autocast under
  ``inference_mode``; frames / seconds, averaged over ``--runs`` runs after one warm-up run
  (``--warmup-runs``; the state is reused between runs, as there);
* **stage FPS**: ``data_prep.stages.segment.track_objects`` on the same frames, one box: what
  the segment stage pays per frame (preprocessing, state set-up, RLE encoding of the masks at
  540 x 960 included).

README figures (SAM2.1 table, speed "measured on an A100 with torch 2.5.1, cuda 12.4"):
the current README (Dec 2024) gives FPS with the whole model compiled
(``vos_optimized=True``): tiny 91.2, small 84.8, base+ 64.1, large 39.5; the Sep 2024 README
gave the uncompiled ones: tiny 47.2, small 43.3, base+ 34.8, large 24.2. This check runs
uncompiled (as the segment stage does), so the eager figure is the like-for-like baseline;
``--vos-optimized`` builds with ``vos_optimized=True`` (compiles for minutes: outside the
8-minute budget of ``gpu_check.sh``) for the compiled comparison.
``--cpu-smoke``: hiera-tiny at 256 px, 3 frames, one run (no warm-up), fp32 on the CPU: checks
this script.
Output: a table, then one JSON line (``{"check": "sam2_fps", ...}``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, finish, missing_module, skip, synchronize, table

CHECK = "sam2_fps"
CONFIGS = {"tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
           "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
           "base+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
           "large": "configs/sam2.1/sam2.1_hiera_l.yaml"}
#: SAM2 README, SAM 2.1 checkpoints table, A100, torch 2.5.1: with vos_optimized=True
#: (README of 2024-12, facebookresearch/sam2 2b90b9f) and uncompiled (README of 2024-09).
README_FPS_COMPILED = {"tiny": 91.2, "small": 84.8, "base+": 64.1, "large": 39.5}
README_FPS_EAGER = {"tiny": 47.2, "small": 43.3, "base+": 34.8, "large": 24.2}
SOURCE_HW = (540, 960)  # the source frames' size (SAM2's demo videos are 540p)


def build(name: str, resolution: int, device: Any, vos_optimized: bool) -> Any:
    """The video predictor, random weights; data prep's builder unless ``vos_optimized``."""
    from data_prep.stages.segment import SegmentConfig, build_predictor

    cfg = SegmentConfig(sam2_config=CONFIGS[name], allow_random_weights=True,
                        image_size=resolution, device=str(device))
    if not vos_optimized:
        return build_predictor(cfg)
    from sam2.build_sam import build_sam2_video_predictor

    side = resolution // 16  # as build_predictor: memory attention on the stride-16 map
    overrides = [f"++model.image_size={resolution}",
                 f"++model.memory_attention.layer.self_attention.feat_sizes=[{side},{side}]",
                 f"++model.memory_attention.layer.cross_attention.feat_sizes=[{side},{side}]"]
    predictor = build_sam2_video_predictor(CONFIGS[name], ckpt_path=None, device=device,
                                           hydra_overrides_extra=overrides,
                                           vos_optimized=True)
    predictor.fill_hole_area = 0  # no sam2._C extension in our installs
    return predictor


def measure(name: str, args: argparse.Namespace, device: Any, frames: Any) -> dict[str, Any]:
    import contextlib

    import torch

    from data_prep.stages.segment import init_state_from_frames, preprocess_frames, track_objects

    start = time.perf_counter()
    predictor = build(name, args.resolution, device, args.vos_optimized)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in predictor.parameters())
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else contextlib.nullcontext())
    h, w = frames.shape[1:3]
    box = [w * 0.3, h * 0.3, w * 0.6, h * 0.7]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode(), autocast:
        images = preprocess_frames(frames, predictor.image_size, device)
        state = init_state_from_frames(predictor, images, h, w)
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, box=box)
        for run in range(args.runs + args.warmup_runs):
            synchronize(device)
            start = time.perf_counter()
            count = sum(1 for _ in predictor.propagate_in_video(state))
            synchronize(device)
            if run >= args.warmup_runs:
                times.append(time.perf_counter() - start)
        predictor.reset_state(state)
        del state, images
    result: dict[str, Any] = {
        "model": f"sam2.1_hiera_{name}", "params": params, "build_s": build_s,
        "frames": count, "propagate_fps": count * len(times) / sum(times),
        "readme_eager_fps": README_FPS_EAGER[name],
        "readme_compiled_fps": README_FPS_COMPILED[name]}
    if not args.no_stage:
        synchronize(device)
        start = time.perf_counter()
        tracks = track_objects(predictor, lambda s, e: frames[s:e], len(frames), [box],
                               window=len(frames), autocast_dtype=dtype)
        synchronize(device)
        result["stage_fps"] = len(tracks.rles[0]) / (time.perf_counter() - start)
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del predictor
    return result


def format_rows(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], "ERROR: " + r["error"][:150]] + [""] * 7)
            continue
        stage = f"{r['stage_fps']:.1f}" if "stage_fps" in r else "-"
        fps = r["propagate_fps"]
        rows.append([r["model"], f"{r['params'] / 1e6:.1f}M", f"{fps:.1f}",
                     f"{r['readme_eager_fps']}", f"{fps / r['readme_eager_fps']:.2f}",
                     f"{r['readme_compiled_fps']}", f"{fps / r['readme_compiled_fps']:.2f}", stage,
                     f"{r['peak_gib']:.1f}" if "peak_gib" in r else "n/a"])
    mode = "vos_optimized (compiled)" if args.vos_optimized else "eager"
    return (f"{args.frames} frames at {args.resolution} px, {mode}, random weights\n"
            + table(["model", "params", "propagate FPS", "README A100 eager", "ratio",
                     "README A100 compiled", "ratio", "stage FPS", "peak GiB"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Details: the module docstring of this file.")
    parser.add_argument("--models", nargs="+", choices=tuple(CONFIGS), default=None,
                        help="default tiny large (tiny with --cpu-smoke)")
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 (256 smoke)")
    parser.add_argument("--frames", type=int, default=None, help="default 64 (4 smoke)")
    parser.add_argument("--runs", type=int, default=2, help="timed propagations")
    parser.add_argument("--warmup-runs", type=int, default=1, help="untimed ones first")
    parser.add_argument("--vos-optimized", action="store_true",
                        help="compile the whole model as SAM2's README figures do (minutes)")
    parser.add_argument("--no-stage", action="store_true", help="skip the track_objects timing")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="hiera-tiny, 256 px, 3 frames on the CPU: checks this script")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.models = args.models or (["tiny"] if smoke else ["tiny", "large"])
    args.resolution = args.resolution or (256 if smoke else 1024)
    args.frames = args.frames or (3 if smoke else 64)
    if smoke:
        args.runs, args.warmup_runs = 1, 0
    why = missing_module("torch", "numpy", "sam2", "hydra", "data_prep.stages.segment")
    if why:
        return skip(CHECK, why)
    import numpy as np
    import torch

    if not smoke and not torch.cuda.is_available():
        return skip(CHECK, "no CUDA device (torch.cuda.is_available() is False); "
                           "--cpu-smoke runs the tiny CPU version")
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, *SOURCE_HW, 3), np.uint8)
    print(f"sam2 fps on {device_name(device)}, torch {torch.__version__}", flush=True)
    results = []
    for name in args.models:
        try:
            results.append(measure(name, args, device, frames))
            r = results[-1]
            print(f"  {r['model']}: {r['propagate_fps']:.1f} FPS", flush=True)
        except Exception as exc:  # report it, go on with the other models
            results.append({"model": f"sam2.1_hiera_{name}",
                            "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(f"  {name}: FAILED {results[-1]['error'][:300]}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_rows(results, args))
    ok = all("error" not in r for r in results)
    summary = "; ".join(
        f"{r['model'].removeprefix('sam2.1_hiera_')}: "
        + (f"{r['propagate_fps']:.1f} FPS ({r['propagate_fps'] / r['readme_eager_fps']:.2f}x "
           f"README A100 eager, {r['propagate_fps'] / r['readme_compiled_fps']:.2f}x compiled)"
           if "error" not in r else "FAILED")
        for r in results) + f" at {args.resolution} px"
    return finish(CHECK, ok, summary, device=device_name(device), resolution=args.resolution,
                  frames=args.frames, vos_optimized=args.vos_optimized, results=results)


if __name__ == "__main__":
    sys.exit(main())
