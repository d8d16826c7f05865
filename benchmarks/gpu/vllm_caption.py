"""A 4-clip caption through both vLLM paths: our actor-stage engine (``engine.kind: vllm``) and
Ray Data LLM's processor (``engine.kind: ray_data_llm``), on the same rows.

    python benchmarks/gpu/vllm_caption.py [--model PATH] [--cpu-smoke]

The model is ``--model`` or ``$TTM_GPU_CHECK_VLM`` (a local VLM folder vLLM serves, e.g.
Qwen2.5-VL-3B); unset, a tiny random LLaVA is built from ``tests/data_prep/tiny_llm.py`` (its
answers are noise: the check is that the engines run and every row ends as a caption or a
``caption_failed`` reject, never an engine or stage error). Both engines share the GPU (a third
of its memory each, eager mode: no CUDA graph capture). Prints the rows, then one JSON line
(``{"check": "vllm_caption", ...}``).

Exit 3 (skipped) where vllm does not import or there is no CUDA device: the vLLM extra lives
only in GPU images (``pip install 'ttm-ray[gpu]'``: vLLM pins its own CUDA torch).
``--cpu-smoke``: builds the tiny model, the video and the rows (everything before the engines)
and checks ``CaptionConfig`` accepts both engine kinds, then exits as above when vLLM is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, finish, missing_module, skip

CHECK = "vllm_caption"
KINDS = ("vllm", "ray_data_llm")
CLIP_FRAMES = (12, 10, 8, 6)


def build_inputs(tmp: Path, model: str | None) -> tuple[str, list[dict]]:
    """The model folder (the tiny random LLaVA unless given) and four clip rows of one video."""
    sys.path.insert(0, str(REPO / "tests" / "data_prep"))  # the tests' tiny model/video builders
    from conftest import build_tiny_video
    from tiny_llm import build_tiny_vlm

    from data_prep.rows import new_row

    if not model:
        model = str(build_tiny_vlm(tmp / "tiny_vlm"))
    video = build_tiny_video(tmp / "clip.mp4")
    rows = [new_row(video_id="v", source_uri=str(video), clip_id=f"v:{n}",
                    frame_indices=list(range(n))) for n in CLIP_FRAMES]
    return model, rows


def caption_cfg(kind: str, model: str) -> Any:
    from data_prep.engines import EngineConfig
    from data_prep.stages.caption import CaptionConfig

    # Both engines share the GPU: each takes a third of it; eager mode skips graph capture.
    return CaptionConfig(engine=EngineConfig(
        kind=kind, model_path=model, max_new_tokens=24,
        engine_kwargs={"max_model_len": 2048, "gpu_memory_utilization": 0.3,
                       "enforce_eager": True}))


def summary_of(out: list[dict], expected: int, seconds: float) -> dict[str, Any]:
    reasons = sorted({r["reject_reason"] for r in out if r["status"] == "rejected"})
    return {"rows": len(out), "captioned": sum(r["status"] == "ok" for r in out),
            "reject_reasons": reasons, "seconds": round(seconds, 1),
            # A tiny random model may answer nothing usable (caption_failed); an engine or
            # stage error means the path itself is broken.
            "ok": len(out) == expected and set(reasons) <= {"caption_failed"}}


def run_kind(kind: str, model: str, rows: list[dict]) -> list[dict]:
    """Caption ``rows`` through one engine path; the rows it returns."""
    from data_prep.stages.caption import CaptionStage

    if kind == "vllm":
        return CaptionStage(caption_cfg(kind, model))(rows)
    import ray

    from data_prep.engines.ray_llm import caption_processor
    from data_prep.rows import to_table
    from ttm_ray.config.resources import StageResources

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    ds = ray.data.from_arrow(to_table(rows))
    ds = caption_processor(ds, caption_cfg(kind, model), StageResources(
        num_cpus=1, num_gpus=1, min_actors=1, max_actors=1, batch_size=4))
    return sorted(ds.take_all(), key=lambda r: r["clip_id"], reverse=True)


def print_rows(kind: str, out: list[dict]) -> None:
    for r in out:
        print(f"[{kind}] {r['clip_id']}: {r['status']} {r['reject_reason'] or ''} "
              f"caption={r['caption']!r} engine={r['caption_engine']}")
        if r["status"] == "rejected" and r["reject_reason"] != "caption_failed":
            print(f"[{kind}]   detail: {(r['reject_detail'] or '')[:600]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Details: the module docstring of this file.")
    parser.add_argument("--model", default=os.environ.get("TTM_GPU_CHECK_VLM"),
                        help="local VLM folder (default $TTM_GPU_CHECK_VLM, else a tiny "
                             "random LLaVA)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="build the inputs and configs only (no engine): checks this script")
    args = parser.parse_args(argv)

    no_vllm = missing_module("vllm")
    if no_vllm and not args.cpu_smoke:
        return skip(CHECK, no_vllm)
    why = missing_module("torch", "data_prep.stages.caption", "ray")
    if why:
        return skip(CHECK, why)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        return skip(CHECK, "no CUDA device (torch.cuda.is_available() is False)")
    with tempfile.TemporaryDirectory(prefix="gpu_check_vllm_") as tmp:
        return run(args, Path(tmp), no_vllm)


def run(args: argparse.Namespace, tmp: Path, no_vllm: str | None) -> int:
    model, rows = build_inputs(tmp, args.model)
    if args.cpu_smoke:
        for kind in KINDS:
            cfg = caption_cfg(kind, model)
            cfg.validate()
            cfg.engine.validate()
        print(f"inputs: {len(rows)} clip rows of {rows[0]['source_uri']}, model {model}; "
              f"caption configs for {', '.join(KINDS)} valid")
        if no_vllm:
            return skip(CHECK, f"{no_vllm}; --cpu-smoke built the inputs")

    results: dict[str, dict] = {}
    for kind in KINDS:
        start = time.perf_counter()
        try:
            out = run_kind(kind, model, rows)
            results[kind] = summary_of(out, len(rows), time.perf_counter() - start)
            print_rows(kind, out)
        except Exception as exc:  # report both paths, then fail
            results[kind] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()
    failed = [k for k, r in results.items() if not r["ok"]]
    summary = "; ".join(
        f"{k}: {r['captioned']}/{r['rows']} captioned in {r['seconds']} s"
        + ("" if r["ok"] else f" (rejects {r['reject_reasons']})") if "error" not in r
        else f"{k}: ERROR {r['error'][:200]}" for k, r in results.items())
    return finish(CHECK, not failed, summary, model=model, results=results)


if __name__ == "__main__":
    sys.exit(main())
