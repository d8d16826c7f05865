#!/usr/bin/env bash
# GPU checks that cannot run in the CPU test env: run on a CUDA machine with the gpu extra
# installed (pip install 'ttm-ray[gpu]'); this script installs nothing.
#
# Section "vllm caption": a 4-clip caption through both vLLM paths, our actor-stage engine
# (engine.kind: vllm) and Ray Data LLM's processor (engine.kind: ray_data_llm), on the same
# rows. The model is TTM_GPU_CHECK_VLM (a local VLM folder vLLM serves, e.g. Qwen2.5-VL-3B);
# unset, a tiny random LLaVA is built from tests/data_prep/tiny_llm.py (its answers are
# noise: the check is that the engines run and every row ends as a caption or a
# caption_failed reject, never an engine or stage error). Prints the rows, then one JSON line.
#
#   bash benchmarks/gpu_check.sh            # exit 0: both paths ran; 1: a path failed;
#                                           # 2: no GPU / no vllm here (nothing was run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or failing): run on a GPU node" >&2
  exit 2
fi
if ! "$PY" -c "import torch, vllm; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  echo "gpu_check: vllm is not importable or torch sees no CUDA device with $PY:" \
       "install the gpu extra (pip install 'ttm-ray[gpu]')" >&2
  exit 2
fi

# ------------------------------------------------------------------------- vllm caption
"$PY" - <<'EOF'
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "tests/data_prep")  # the tiny model and video builders of the tests

import ray

from data_prep.engines import EngineConfig
from data_prep.engines.ray_llm import caption_processor
from data_prep.rows import new_row, to_table
from data_prep.stages.caption import CaptionConfig, CaptionStage
from ttm_ray.config.resources import StageResources

tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
model = os.environ.get("TTM_GPU_CHECK_VLM")
if not model:
    from tiny_llm import build_tiny_vlm

    model = str(build_tiny_vlm(tmp / "tiny_vlm"))
from conftest import build_tiny_video  # noqa: E402

video = build_tiny_video(tmp / "clip.mp4")
rows = [new_row(video_id="v", source_uri=str(video), clip_id=f"v:{n}",
                frame_indices=list(range(n))) for n in (12, 10, 8, 6)]


def caption_cfg(kind: str) -> CaptionConfig:
    # Both engines share the GPU: each takes a third of it; eager mode skips graph capture.
    return CaptionConfig(engine=EngineConfig(
        kind=kind, model_path=model, max_new_tokens=24,
        engine_kwargs={"max_model_len": 2048, "gpu_memory_utilization": 0.3,
                       "enforce_eager": True}))


def summary(out: list[dict], seconds: float) -> dict:
    reasons = sorted({r["reject_reason"] for r in out if r["status"] == "rejected"})
    return {"rows": len(out), "captioned": sum(r["status"] == "ok" for r in out),
            "reject_reasons": reasons, "seconds": round(seconds, 1),
            # A tiny random model may answer nothing usable (caption_failed); an engine or
            # stage error means the path itself is broken.
            "ok": len(out) == len(rows) and set(reasons) <= {"caption_failed"}}


results: dict[str, dict] = {}
failures: list[str] = []
for kind in ("vllm", "ray_data_llm"):
    start = time.perf_counter()
    try:
        if kind == "vllm":
            out = CaptionStage(caption_cfg(kind))(rows)
        else:
            ray.init(ignore_reinit_error=True, include_dashboard=False)
            ds = ray.data.from_arrow(to_table(rows))
            ds = caption_processor(ds, caption_cfg(kind), StageResources(
                num_cpus=1, num_gpus=1, min_actors=1, max_actors=1, batch_size=4))
            out = sorted(ds.take_all(), key=lambda r: r["clip_id"], reverse=True)
        results[kind] = summary(out, time.perf_counter() - start)
        for r in out:
            print(f"[{kind}] {r['clip_id']}: {r['status']} {r['reject_reason'] or ''} "
                  f"caption={r['caption']!r} engine={r['caption_engine']}")
            if r["status"] == "rejected" and r["reject_reason"] != "caption_failed":
                print(f"[{kind}]   detail: {(r['reject_detail'] or '')[:600]}")
    except Exception as exc:  # report both paths, then fail
        results[kind] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    if not results[kind]["ok"]:
        failures.append(kind)

print(json.dumps({"check": "vllm_caption", "model": model, "results": results,
                  "ok": not failures}))
sys.exit(1 if failures else 0)
EOF
