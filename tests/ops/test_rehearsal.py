"""The production rehearsal: the shipped production configs, changed only by the declared
overlays under jobs/configs/rehearsal/, end to end through `ray job submit` on a fake
multi-node autoscaling cluster that starts with no worker nodes (`ttm-ray rehearse`).

The allow-list tests are fast; ``test_rehearse_end_to_end`` is the slow one (12-20 minutes
on 2 cores, measured) and also carries the checks the single-node job-submit test used to make (the
dataset version, the rebuild's record, the MLflow runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ttm_ray.ops.overlay import changed_keys, overlay_problems, shipped_base

REPO = Path(__file__).resolve().parents[2]
REHEARSAL = REPO / "jobs" / "configs" / "rehearsal"
OVERLAYS = sorted(p for p in REHEARSAL.glob("*.yaml") if not p.name.startswith("_"))


def test_every_job_has_an_overlay_and_every_overlay_a_job() -> None:
    from jobs.rehearse import JOBS

    assert {j.overlay for j in JOBS} == {p.name for p in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_changes_only_what_the_allow_list_allows(overlay: Path) -> None:
    base = shipped_base(overlay)
    assert base.parent.parent == REPO / "jobs" / "configs" and base.parent.name != "rehearsal"
    assert overlay_problems(overlay) == []
    changed = changed_keys(overlay)
    # What a rehearsal must never change, whatever the allow-list says.
    for key in changed:
        assert not key.startswith(("filter.", "clip.num_frames", "clip.resolutions",
                                   "clip.fps", "model.num_frames", "model.height",
                                   "model.width", "diffusion.", "deepspeed.zero_stage",
                                   "model.activation_checkpointing")), key
        assert "custom_resources" not in key and "accelerator_type" not in key, key


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_loads_as_its_job_config(overlay: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from data_prep.config import PrepConfig
    from jobs.inference_config import EvaluateConfig, GenerateConfig
    from ttm_ray.config import load_config
    from ttm_ray.config.loader import load_merged
    from ttm_ray.training.config import TrainConfig

    monkeypatch.setenv("TTM_REHEARSAL_ROOT", str(tmp_path))
    kind = load_merged(overlay)["kind"]
    cls = {"prep": PrepConfig, "train": TrainConfig, "generate": GenerateConfig,
           "evaluate": EvaluateConfig}[kind]
    cfg = load_config(cls, overlay)
    assert cfg.run.root == f"{tmp_path}/runs"


@pytest.mark.parametrize("key, value", [
    ("clip.num_frames", "8"), ("filter.omega", "0.5"),
    ("resources.caption.custom_resources", "{}"),
    ("data.dataset_root", "${TTM_REHEARSAL_ROOT}/runs/sav-prep/dataset"),
    ("scaling.accelerator_type", "null"), ("model.num_frames", "4"),
    ("run.root", "/elsewhere"),
])
def test_the_check_refuses_changes_outside_the_allow_list(key: str, value: str,
                                                          tmp_path: Path) -> None:
    """A copy of a shipped overlay plus one forbidden change is refused, naming the key."""
    target = REHEARSAL / ("prep_dit.yaml" if key.startswith(("clip", "filter", "resources"))
                          else "dit_stage1.yaml")
    nested = "\n".join(f"{'  ' * i}{part}:" for i, part in enumerate(key.split(".")))
    overlay = tmp_path / target.name
    overlay.write_text(f"base: [{shipped_base(target)}, {target}]\n{nested} {value}\n")
    problems = "\n".join(overlay_problems(overlay))
    assert f": {key}:" in problems, problems


def test_mlflow_server_logs_over_http_and_stops_by_its_group(tmp_path: Path) -> None:
    """The rehearsal's server: healthy on 127.0.0.1, runs and artifacts logged through it
    (proxied mlflow-artifacts:/ URIs, files under its own folder), then gone with its
    workers when the block ends."""
    import socket

    from mlflow.tracking import MlflowClient

    from jobs.rehearse import MlflowServer

    (tmp_path / "note.txt").write_text("hello")
    with MlflowServer(tmp_path / "mlflow") as server:
        assert server.uri.startswith("http://127.0.0.1:")
        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.create_experiment("ttm-ray")
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "loss", 0.5, step=1)
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        client.set_terminated(run.info.run_id)
        assert client.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        pid, port = server.proc.pid, int(server.uri.rsplit(":", 1)[1])
    assert list((tmp_path / "mlflow" / "artifacts").rglob("note.txt"))
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group is gone, uvicorn workers included
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    # What the server wrote, read without it: the backend is its own SQLite file.
    offline = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert offline.get_run(run.info.run_id).data.metrics == {"loss": 0.5}


@pytest.mark.slow
def test_rehearse_end_to_end(tmp_path: Path) -> None:
    """`ttm-ray rehearse` exits 0; its last line is the JSON summary with every job
    SUCCEEDED and worker nodes of at least two types launched from zero."""
    from mlflow.tracking import MlflowClient

    from ttm_ray.dataset.versions import latest_version, open_version

    root = tmp_path / "rehearsal"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    run = subprocess.run([sys.executable, "-m", "jobs.rehearse", "--root", str(root)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    tail = f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert run.returncode == 0, tail
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded", tail
    from jobs.rehearse import JOBS

    assert list(summary["jobs"]) == [j.name for j in JOBS]
    assert all(j["status"] == "SUCCEEDED" for j in summary["jobs"].values()), summary
    launched = summary["nodes_launched"]
    assert len([t for t, n in launched.items() if n > 0]) >= 2, launched
    assert {"gpu_infer", "train_a100", "cpu_workers"} <= set(launched), launched
    # Drivers that hold data ran on a CPU worker node, the training drivers on the head.
    drivers = summary["drivers"]
    assert drivers["prep-unet"] == drivers["evaluate"] == "cpu_workers", drivers
    assert drivers["train-dit-stage1"] == "head", drivers

    runs = root / "runs"
    unet_data, dit_data = runs / "sav-prep" / "dataset", runs / "sav-prep-dit" / "dataset"
    clip = open_version(dit_data).manifest["lineage"]["clip"]
    assert clip["num_frames"] == 121 and clip["resolutions"][0]["height"] == 256
    assert open_version(unet_data).manifest["lineage"]["clip"]["num_frames"] == 16
    # The rebuild found nothing new: same version, its record written, the lock released.
    last = json.loads((unet_data / "rebuilds" / "last.json").read_text())
    assert last["status"] == "succeeded" and not (unet_data / "rebuild.lock").exists()
    assert last["dataset_version"] == latest_version(unet_data)
    for name in ("dit-stage1", "dit-stage2", "unet-stage1", "unet-stage2"):
        assert (runs / name / "export" / "model.safetensors").is_file(), name
    # Logged through the rehearsal's own `mlflow server` (whatever MLFLOW_TRACKING_URI the
    # test session has), which is stopped now: read its backend file. Runs created over HTTP
    # have proxied artifact URIs, and no driver fell back to a SQLite file under run.root.
    assert summary["mlflow"].startswith("http://127.0.0.1:"), summary["mlflow"]
    assert summary["mlflow_backend"] == f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    assert not (runs / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=summary["mlflow_backend"])
    experiment = client.get_experiment_by_name("ttm-ray")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment
    found = client.search_runs([experiment.experiment_id])
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in found)
    assert list((root / "mlflow" / "artifacts").rglob("*")), "no artifact went through it"
    kinds = [r.data.tags.get("ttm.kind") for r in found]
    assert "rebuild" in kinds, kinds
    trained = [r for r in found if r.data.metrics.get("loss") is not None]
    assert len(trained) >= 4 and all(r.info.status == "FINISHED" for r in trained)
    assert any(r.data.tags.get("dataset_version") == latest_version(dit_data) for r in found)
    generated = list((runs / "generate").rglob("video.mp4"))
    assert generated, "batch generation wrote no video"
    assert list((runs / "eval-sav128").rglob("*.md")), "evaluation wrote no report"
    # Issue 16 in production shape: evaluation scored on Ray actors (the job's JSON summary,
    # last line of its log), and one lineage through the server: training runs read a
    # dataset input, exports are registered, the evaluate run has the scored models as inputs.
    evaluate_log = (root / "logs" / "evaluate.log").read_text().splitlines()
    evaluated = json.loads(next(line for line in reversed(evaluate_log)
                                if line.startswith("{")))
    assert evaluated["score_engine"] == "ray", evaluated
    for r in trained:
        contexts = [t.value for i in client.get_run(r.info.run_id).inputs.dataset_inputs
                    for t in i.tags if t.key == "mlflow.data.context"]
        assert "training" in contexts, (r.info.run_name, contexts)
    registered = {m.name for m in client.search_model_versions()}
    assert {"ttm-dit-stage1", "ttm-dit-stage2"} <= registered, registered
    (eval_run,) = [r for r in found if r.data.tags.get("ttm.kind") == "evaluate"]
    scored = client.get_run(eval_run.info.run_id).inputs.model_inputs
    assert {client.get_logged_model(m.model_id).name for m in scored} == {
        "ttm-dit-stage1", "ttm-dit-stage2"}
