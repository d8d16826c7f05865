"""Failures mid-run, each compared with the uninterrupted run of the same seed (test_trainer's
ZeRO-2 dit_stage2_tiny), step by step and bit for bit: every value logged at every step,
including the steps run twice, equals the uninterrupted run's (``==`` on the floats MLflow
stored), and so do the final weights' outputs. That holds only if weights, optimizer, lr
schedule, data position and every rank's RNG come back exactly.

* Killed processes: rank 0's process is SIGKILLed (Ray Train restarts the worker group from
  the last checkpoint), then the driver's process group (the run is resubmitted under the
  same name and resumes from its last checkpoint). ``debug.pause_at_steps`` holds rank 0
  before a step so the kill lands at a known point.
* Raised failures: rank 0 raises (``debug.fail_at_steps``); the second failure outlasts
  ``failure.max_failures`` and ends the run, which is then resubmitted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from train_runs import metric_history, tiny_config, train_interrupted, train_killed, train_tiny

from ttm_ray.training.checkpoint import Probe
from ttm_ray.training.config import TrainConfig

pytestmark = pytest.mark.slow

RUN = "dit_stage2_tiny"
BASE = ("deepspeed.zero_stage=2",)  # the uninterrupted run is test_trainer's
FAILING = (*BASE, "debug.fail_at_steps=[7, 11]", "failure.max_failures=1")
#: Checkpoints every 4 steps: rank 0 is killed before step 6 (resumes at 4), the driver
#: before step 10 (the resubmission resumes at 8).
KILLED = (*BASE, "debug.pause_at_steps=[6, 10]", "failure.max_failures=1")
CURVES = ("loss", "grad_norm", "lr")


def assert_same_curves(ref: tuple[TrainConfig, dict[str, Any]],
                       run: tuple[TrainConfig, dict[str, Any]], steps: range,
                       repeated: list[int]) -> None:
    """Every value logged at each of ``steps`` (twice at ``repeated``: before and after a
    resume) equals the uninterrupted run's, exactly."""
    for key in CURVES:
        expected = metric_history(ref[0], ref[1]["mlflow_run_id"], key)
        got = metric_history(run[0], run[1]["mlflow_run_id"], key)
        assert sorted(got) == sorted(expected), key
        assert [s for s in steps if len(got[s]) > 1] == repeated, (key, got)
        for step in steps:
            assert got[step] == expected[step] * len(got[step]), (key, step, got[step],
                                                                  expected[step])


def assert_same_final_weights(ref: dict[str, Any], run: dict[str, Any]) -> None:
    """The last checkpoints' engine outputs on the probe batch are the same tensor."""
    a = Probe.load(Path(ref["checkpoint"]) / "probe.safetensors").out
    b = Probe.load(Path(run["checkpoint"]) / "probe.safetensors").out
    assert torch.equal(a, b), (a - b).abs().max().item()


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path,
              tiny_encoders: dict[str, Path]) -> tuple[TrainConfig, dict[str, Any]]:
    return train_tiny(RUN, tmp_path_factory, tiny_dataset, tiny_encoders, *BASE)


@pytest.fixture(scope="module")
def killed(ray_local, tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path,
           tiny_encoders: dict[str, Path]) -> tuple[TrainConfig, dict[str, Any]]:
    return train_killed(RUN, tmp_path_factory, tiny_dataset, tiny_encoders, *KILLED)


def test_sigkilled_worker_restarts_from_its_checkpoint_bit_for_bit(reference, killed) -> None:
    cfg, run = killed
    assert cfg.checkpoint.every_steps == 4 and cfg.optim.max_steps == 12
    first = json.loads((cfg.out_dir / "paused_before_step_6").read_text())
    assert first == {"pid": run["killed_worker"], "rank": 0, "step": 6}
    # A new process carried on: the group restarted from step 4 (step 5 ran twice) and
    # trained to the driver's kill before step 10 with the same values as the reference.
    assert run["restarted_worker"] != run["killed_worker"]
    assert_same_curves(reference, killed, range(1, 9), repeated=[5])


def test_sigkilled_driver_resubmitted_resumes_bit_for_bit(reference, killed) -> None:
    cfg, run = killed
    second = json.loads((cfg.out_dir / "paused_before_step_10").read_text())
    assert second == {"pid": run["restarted_worker"], "rank": 0, "step": 10}
    # The resubmission (same run name, same MLflow run) resumed at 8, so only step 9 ran
    # twice after the driver's death; the whole curve and the final weights are the
    # reference's.
    assert Path(run["checkpoint"]).name == "step_00000012"
    assert run["dataset_version"] == reference[1]["dataset_version"]
    assert_same_curves(reference, killed, range(1, 13), repeated=[5, 9])
    assert_same_final_weights(reference[1], run)


def test_raised_failures_restart_and_resubmission_resume_bit_for_bit(
        reference, ray_local, tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path,
        tiny_encoders: dict[str, Path]) -> None:
    cfg, run, first_error = train_interrupted(RUN, tmp_path_factory, tiny_dataset,
                                              tiny_encoders, *FAILING)
    assert "injected failure before step 11" in first_error  # the second failure ended it
    for step in (7, 11):
        assert (cfg.out_dir / f"injected_failure_step_{step}").is_file()
    assert Path(run["checkpoint"]).name == "step_00000012"
    assert run["dataset_version"] == reference[1]["dataset_version"]
    # Steps between a checkpoint and a failure ran twice (before and after the resume).
    assert_same_curves(reference, (cfg, run), range(1, 13), repeated=[5, 6, 9, 10])
    assert_same_final_weights(reference[1], run)


def test_too_many_bad_rows_stop_the_run_with_the_list_not_a_crash_loop(
        ray_local, tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path,
        tiny_encoders: dict[str, Path]) -> None:
    """Rows that cannot be trained on (no masks, empty c_motion) are skipped and counted by
    every worker; past ``data.max_bad_fraction`` all ranks stop at the same step (no worker
    raises, so Ray Train does not restart the group over the same rows) and the job fails
    with the list."""
    import pyarrow as pa

    from ttm_ray.dataset.versions import VersionWriter, open_version
    from ttm_ray.training.trainer import BadRowsStop, train

    table = open_version(tiny_dataset).read("data")
    rows = table.to_pylist()
    rows[0]["masks"] = []
    rows[2]["c_motion"] = ""
    root = tmp_path_factory.mktemp("bad_rows_run")
    writer = VersionWriter(root / "dataset")
    writer.write_table("data", pa.Table.from_pylist(rows, schema=table.schema))
    writer.publish({"note": "test: broken rows"})
    cfg = tiny_config("dit_stage1_tiny", root, root / "dataset", tiny_encoders,
                      "data.max_bad_fraction=0.0", "failure.max_failures=3")
    with pytest.raises(BadRowsStop) as err:
        train(cfg)
    text = str(err.value)
    assert f"clip '{rows[0]['clip_id']}': no object masks" in text \
        or f"clip '{rows[2]['clip_id']}': empty c_motion" in text, text
    assert "data.max_bad_fraction" in text and str(cfg.bad_rows_file) in text
    report = json.loads(cfg.bad_rows_file.read_text())
    assert report["bad_rows"] and report["step"] < cfg.optim.max_steps
    assert not (Path(cfg.checkpoint.resolved_storage(cfg.run)) / cfg.run.name
                / f"step_{cfg.optim.max_steps:08d}").exists()  # stopped, never finished
