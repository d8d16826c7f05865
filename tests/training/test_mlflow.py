"""MLflow after a tiny run: MlflowClient finds the run with the whole config as params, the
dataset and code versions as tags, the training metrics and the sample GIF; after a Ray Train
restart and a resubmission it is still the same, single run."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runs import train_interrupted

pytestmark = pytest.mark.slow

METRICS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_time_s", "mfu",
           "peak_mem_gb")


def test_run_has_params_tags_metrics_and_sample_and_survives_a_resume(
        ray_local, tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path,
        tiny_encoders: dict[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    # The fault-tolerance test's run: restarted once by Ray Train, then resubmitted.
    cfg, summary, _ = train_interrupted(
        "dit_stage2_tiny", tmp_path_factory, tiny_dataset, tiny_encoders,
        "deepspeed.zero_stage=2", "debug.fail_at_steps=[7, 11]", "failure.max_failures=1")
    client = MlflowClient(tracking_uri=cfg.run.resolved_mlflow_uri())
    experiment = client.get_experiment_by_name(cfg.run.mlflow_experiment)
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"attributes.run_name = '{cfg.run.name}'")
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # one run, resumed
    run = runs[0]
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["model.size"] == "dit-tiny" and params["model.stage"] == "2"
    assert params["deepspeed.zero_stage"] == "2" and float(params["optim.lr"]) == 1e-3
    assert params["debug.fail_at_steps"] == "[7, 11]"
    tags = run.data.tags
    assert tags["ttm.dataset_version"] == summary["dataset_version"]
    assert tags["ttm.code_version"]

    for key in METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert {m.step for m in history} == set(range(1, cfg.optim.max_steps + 1)), key
    assert run.data.metrics["mfu"] == -1.0  # no peak FLOPs configured on CPU: never guessed
    assert run.data.metrics["samples_per_s"] > 0 and run.data.metrics["peak_mem_gb"] > 0

    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == [f"samples/step_{cfg.optim.max_steps:08d}.gif"]
    gif = Path(client.download_artifacts(run.info.run_id, samples[0],
                                         str(tmp_path_factory.mktemp("gif"))))
    from PIL import Image

    with Image.open(gif) as im:
        # target | sample side by side, one frame per pixel frame of the clip
        assert im.n_frames == cfg.model.num_frames and im.size == (2 * 32, 32)
