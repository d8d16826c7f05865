"""The it-learns benchmark's path runs end to end: ``benchmarks/it_learns.py`` with a few steps
(synth both splits -> ``ttm-ray prep`` -> three ``ttm-ray train`` runs on Ray Train +
DeepSpeed -> guided sampling of every held-out clip -> scores), as a subprocess with its own
local Ray.

This is not the learning test issue 15 asks for: at the step counts CI can afford the tiny
models do not learn the task yet (see benchmarks/results/it_learns.md). What it proves is that
the path the benchmark measures works, and that its ground truth is right: the static
baseline it reports equals the one computed here from the generator's own masks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.synthetic_task import make_clip, render_clip
from ttm_ray.evaluation.learning import static_trajectory, trajectory_iou
from ttm_ray.inference.generate import fit_masks

REPO = Path(__file__).resolve().parents[2]
HELDOUT = 7

pytestmark = pytest.mark.slow


def test_it_learns_benchmark_runs_the_real_path(tmp_path: Path) -> None:
    record = tmp_path / "it_learns.md"
    out = subprocess.run(
        [sys.executable, "benchmarks/it_learns.py", "--families", "dit", "--root",
         str(tmp_path / "work"), "--train-clips", "16", "--heldout-clips", str(HELDOUT),
         "--stage1-steps", "2", "--stage2-steps", "2", "--sample-steps", "2",
         "--global-batch", "4", "--record", str(record)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"dit"}
    stage1, stage2 = result["dit"]["stage1"], result["dit"]["stage2"]

    clips = [make_clip(0, i, "heldout") for i in range(HELDOUT)]
    static, objects = [], 0
    for clip in clips:
        _, ids = render_clip(clip)
        k = len(clip.objects)
        masks = ids[[0, 2, 4, 6]][None] == np.arange(1, k + 1)[:, None, None, None]
        truth = fit_masks(masks, 4, 32, 32)
        static += trajectory_iou(static_trajectory(truth), truth)
        objects += k
    assert stage1["objects"] == objects
    assert stage1["static_iou"] == round(float(np.mean(static)), 3)
    assert 0.0 <= stage1["heldout_iou"] <= 1.0 and 0.0 <= stage1["direction_acc"] <= 1.0
    assert stage2["objects"] == sum(len(c.objects) for c in clips if len(c.objects) > 1)
    for key in ("binding_masked", "binding_unmasked", "swap_follows"):
        assert 0.0 <= stage2[key] <= 1.0
    text = record.read_text()
    assert "| dit |" in text and '"stage1_steps": 2' in text
