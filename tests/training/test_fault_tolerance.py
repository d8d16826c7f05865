"""Worker failures mid-run. The first injected failure is absorbed by Ray Train (the worker
group restarts from the last checkpoint, ``failure.max_failures: 1``); the second one ends the
run, which is then resubmitted under the same run name and resumes from its last checkpoint.
The loss curve of the whole thing equals that of an uninterrupted run with the same seed,
step by step, which holds only if weights, optimizer, lr schedule, data position and every
rank's RNG come back exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from train_runs import metric_history, tiny_config, train_interrupted, train_tiny

from ttm_ray.training.checkpoint import Probe

pytestmark = pytest.mark.slow

RUN = "dit_stage2_tiny"
BASE = ("deepspeed.zero_stage=2",)  # the uninterrupted run is test_trainer's
FAILING = (*BASE, "debug.fail_at_steps=[7, 11]", "failure.max_failures=1")


def test_restart_and_resubmission_resume_exactly(
        ray_local, tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path,
        tiny_encoders: dict[str, Path]) -> None:
    ref_cfg, ref = train_tiny(RUN, tmp_path_factory, tiny_dataset, tiny_encoders, *BASE)
    cfg, run, first_error = train_interrupted(RUN, tmp_path_factory, tiny_dataset,
                                              tiny_encoders, *FAILING)
    assert cfg.checkpoint.every_steps == 4 and cfg.optim.max_steps == 12
    assert "injected failure before step 11" in first_error  # the second failure ended it
    for step in (7, 11):
        assert (cfg.out_dir / f"injected_failure_step_{step}").is_file()
    assert Path(run["checkpoint"]).name == "step_00000012"
    assert run["dataset_version"] == ref["dataset_version"]

    expected = metric_history(ref_cfg, ref["mlflow_run_id"])
    got = metric_history(cfg, run["mlflow_run_id"])  # one MLflow run across all attempts
    assert sorted(got) == sorted(expected)
    # Steps between a checkpoint and a failure ran twice (before and after the resume),
    # nothing else did; every value of every step equals the uninterrupted run's.
    assert [s for s, values in got.items() if len(values) > 1] == [5, 6, 9, 10]
    for step, values in got.items():
        for value in values:
            assert math.isclose(value, expected[step][0], rel_tol=1e-5, abs_tol=1e-7), \
                (step, values, expected[step])
    # The final weights agree too: same engine output on the probe batch.
    a = Probe.load(Path(ref["checkpoint"]) / "probe.safetensors").out
    b = Probe.load(Path(run["checkpoint"]) / "probe.safetensors").out
    assert (a - b).abs().max().item() <= 1e-5


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
