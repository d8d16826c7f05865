"""It learns, in CI: ``benchmarks/it_learns.py`` for the DiT, as a subprocess with its own local
Ray (synth both splits -> ``ttm-ray prep`` -> three ``ttm-ray train`` runs on Ray Train +
DeepSpeed -> guided sampling of every held-out clip -> scores).

What it asserts (issue 15, item 3), on the quick run exactly as ``--quick`` runs it (700
training clips, 21 held-out; stage 1 :data:`STAGE1_STEPS` steps, stage 2 :data:`STAGE2_STEPS`),
whose figures are recorded in ``benchmarks/results/it_learns.md``:

* **Stage 2 learns the paper's Fig. 6 effect.** Measured: binding 0.889 with masked
  attention, 0.37 without, rotated local prompts followed 0.963, over 27 objects (at 200
  steps: 1.0 / 0.407 / 1.0). The thresholds (:data:`MIN_BINDING`, :data:`MIN_BINDING_GAIN`,
  :data:`MIN_SWAP`) sit 0.1 or more below: a few of the 27 objects flip between runs; a
  model that ignores its local prompts scores about 0.5 and no gain.
* **Stage 1 beats the static baseline on held-out clips.** Measured: IoU 0.515 against the
  static baseline's 0.469 (the issue's check; the same figure in two runs, stage 1 is
  deterministic here). :data:`MIN_STAGE1_IOU` sits about 0.1 below the measured value.
* **The motion prompt steers stage 1.** Direction accuracy measured 0.472 (17 of 36
  objects); the static baseline (every object "stays") scores 0.222 and the ground truth
  1.0. :data:`MIN_DIRECTION` (12 of 36) sits 5 objects below the measured value and 4 above
  the static baseline.
* **Three-object clips (never seen in training) get their third object right.** Its IoU was
  0.01 before the benchmark drew training colours from 3 slots (``data.colour_slots``), and
  0.61-0.67 after (3 objects); :data:`MIN_THIRD_OBJECT_IOU` sits about half-way.
* **The scores' ground truth**: the static baseline it reports equals the one computed here
  from the generator's own masks, and the object counts are right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.synthetic_task import MOTIONS, make_clip, render_clip
from ttm_ray.evaluation.learning import direction_accuracy, static_trajectory, trajectory_iou
from ttm_ray.inference.generate import fit_masks

REPO = Path(__file__).resolve().parents[2]
TRAIN, HELDOUT = 700, 21  # the quick run's clips
STAGE1_STEPS, STAGE2_STEPS = 700, 150  # the quick run's (QUICK in the benchmark)
MIN_BINDING, MIN_BINDING_GAIN, MIN_SWAP = 0.75, 0.4, 0.85
MIN_STAGE1_IOU = 0.4
MIN_DIRECTION = 0.33
MIN_THIRD_OBJECT_IOU = 0.3

pytestmark = pytest.mark.slow


def test_it_learns_dit_quick_run(tmp_path: Path) -> None:
    record = tmp_path / "it_learns.md"
    out = subprocess.run(
        [sys.executable, "benchmarks/it_learns.py", "--quick", "--root", str(tmp_path / "work"),
         "--record", str(record)],
        # A hang guard, not a time limit: ~9 min alone, but in CI it shares 2 cores with the
        # production rehearsal (the shorter stage-1 version once ran past 20 min there).
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

    # Stage 1: on held-out clips it places the objects better than leaving them where they
    # are (the static baseline), which needs the motion prompt.
    assert stage1["heldout_iou"] >= MIN_STAGE1_IOU, stage1
    assert stage1["heldout_iou"] > stage1["static_iou"], stage1
    # Every motion is scored, and the third object of a clip (a count never trained on, so
    # a colour prep never gave a training object) is placed, not lost.
    assert set(stage1["iou_by_motion"]) == set(MOTIONS), stage1
    assert len(stage1["iou_by_object"]) == 3, stage1
    assert stage1["iou_by_object"][2] >= MIN_THIRD_OBJECT_IOU, stage1

    # The ground truth the scores are computed against.
    clips = [make_clip(0, i, "heldout") for i in range(HELDOUT)]
    static, static_direction, truth_direction, objects = [], [], [], 0
    for clip in clips:
        _, ids = render_clip(clip)
        k = len(clip.objects)
        masks = ids[[0, 2, 4, 6]][None] == np.arange(1, k + 1)[:, None, None, None]
        truth = fit_masks(masks, 4, 32, 32)
        static += trajectory_iou(static_trajectory(truth), truth)
        min_shift = 0.15 * 32  # the benchmark's: 15% of the trajectory's width
        static_direction += direction_accuracy(static_trajectory(truth), [clip.motion] * k,
                                               min_shift)
        truth_direction += direction_accuracy(truth, [clip.motion] * k, min_shift)
        objects += k
    assert stage1["objects"] == objects
    assert stage1["static_iou"] == round(float(np.mean(static)), 3)
    # The motion prompt steers it: the direction is right clearly more often than for the
    # static baseline (which gets only the "stay" objects), on a metric the truth passes.
    assert all(truth_direction)
    assert stage1["direction_acc"] >= MIN_DIRECTION > np.mean(static_direction), stage1
    assert 0.0 <= stage1["heldout_iou"] <= 1.0 and 0.0 <= stage1["direction_acc"] <= 1.0
    assert stage2["objects"] == sum(len(c.objects) for c in clips if len(c.objects) > 1)
    text = record.read_text()
    assert "| dit |" in text and f'"stage1_steps": {STAGE1_STEPS}' in text
    assert f'"stage2_steps": {STAGE2_STEPS}' in text and f'"train_clips": {TRAIN}' in text


@pytest.mark.parametrize("overlay, message", [
    ("nonsense", "expected KEY=VALUE"), ("model.bogus=1", "does not load"),
    ("optim.lr=abc", "does not load")])
def test_a_bad_set_overlay_stops_before_any_work(overlay: str, message: str,
                                                 tmp_path: Path) -> None:
    """``--set`` is checked against every train config the run loads, before synth, prep or
    Ray start: the error names the overlay and nothing is written."""
    out = subprocess.run(
        [sys.executable, "benchmarks/it_learns.py", "--quick", "--root", str(tmp_path / "w"),
         "--set", overlay], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert message in out.stderr and overlay.split("=")[0] in out.stderr
    assert not (tmp_path / "w").exists()
