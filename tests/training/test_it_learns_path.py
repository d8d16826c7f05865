"""It learns, in CI: ``benchmarks/it_learns.py`` for the DiT, as a subprocess with its own local
Ray (synth both splits -> ``ttm-ray prep`` -> three ``ttm-ray train`` runs on Ray Train +
DeepSpeed -> guided sampling of every held-out clip -> scores).

What it asserts (issue 15, item 3):

* **Stage 2 learns the paper's Fig. 6 effect.** The quick run's data (700 training clips, 21
  held-out) and stage-2 runs shortened to :data:`STAGE2_STEPS`; measured at that setting
  (``benchmarks/results/it_learns.md``): binding 0.704 with masked attention, 0.407 without,
  rotated local prompts followed 0.889, over 27 objects. The thresholds sit about 0.15 below
  each (:data:`MIN_BINDING`, :data:`MIN_BINDING_GAIN`, :data:`MIN_SWAP`): a few of the 27
  objects may flip on another CPU's float rounding, a model that ignores its local prompts
  scores about 0.5 and 0 gain.
* **Stage 1's path and ground truth**, not learning: stage 1 trains :data:`STAGE1_STEPS`
  steps here because at CPU step counts the DiT does not beat the static baseline yet (the
  gap is in the results file). The static baseline it reports must equal the one computed
  here from the generator's own masks, and the object counts must be right.
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
TRAIN, HELDOUT = 700, 21  # the quick run's clips
STAGE1_STEPS, STAGE2_STEPS = 2, 200
MIN_BINDING, MIN_BINDING_GAIN, MIN_SWAP = 0.55, 0.15, 0.7

pytestmark = pytest.mark.slow


def test_it_learns_dit_stage2_binds_and_the_path_scores_right(tmp_path: Path) -> None:
    record = tmp_path / "it_learns.md"
    out = subprocess.run(
        [sys.executable, "benchmarks/it_learns.py", "--quick", "--root", str(tmp_path / "work"),
         "--train-clips", str(TRAIN), "--heldout-clips", str(HELDOUT),
         "--stage1-steps", str(STAGE1_STEPS), "--stage2-steps", str(STAGE2_STEPS),
         "--record", str(record)],
        # A hang guard, not a time limit: 6.5 min alone, but in CI it shares 2 cores with
        # the production rehearsal and once ran past 20 min (2026-12-07).
        cwd=REPO, capture_output=True, text=True, timeout=2700)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"dit"}
    stage1, stage2 = result["dit"]["stage1"], result["dit"]["stage2"]

    # Stage 2: each object takes its own local prompt's colour with the masked layers, and
    # clearly less often without them; rotating the prompts rotates the colours.
    assert stage2["binding_masked"] >= MIN_BINDING, stage2
    assert stage2["binding_masked"] - stage2["binding_unmasked"] >= MIN_BINDING_GAIN, stage2
    assert stage2["swap_follows"] >= MIN_SWAP, stage2

    # Stage 1: the ground truth the scores are computed against.
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
    text = record.read_text()
    assert "| dit |" in text and f'"stage2_steps": {STAGE2_STEPS}' in text
