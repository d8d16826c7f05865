"""The lineage in a real sqlite MLflow store after the real jobs (issue 16, item 4): the tiny
dataset's version logged by prep's MLflow code, the DiT pair trained and exported by
``train``, the pair evaluated by ``jobs.evaluate``. Then: every training run has a dataset
input, every export is a registered model version, the evaluation run lists the versions it
scored, and ``ttm-ray lineage`` prints the chain. (The quickstart makes the same store under
runs/quickstart; tests/test_lineage.py covers the walk's cases without Ray.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_runs import train_tiny

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def log_prep_run(db: str, dataset_root: Path, tmp_path: Path) -> str:
    """The tiny dataset was published untracked (the session fixture): log its prep run."""
    from data_prep.config import PrepConfig
    from data_prep.job import log_version_to_mlflow
    from ttm_ray.config import load_config
    from ttm_ray.dataset.versions import open_version

    cfg = load_config(PrepConfig, REPO / "jobs/configs/prep/quickstart.yaml", [
        f"run.root={tmp_path}", f"run.mlflow_tracking_uri={db}",
        f"publish.dataset_root={dataset_root}",
        f"source.path={dataset_root.parent / 'corpus' / 'manifest.parquet'}"])
    return log_version_to_mlflow(cfg, open_version(dataset_root), {"kept": 1})


def evaluate_pair(db: str, exports: dict[int, str], tmp_path: Path) -> dict:
    """``jobs.evaluate`` on one generated corpus video, one setting, tiny backbones."""
    from data_prep.synthetic import generate_corpus, write_benchmark_manifest
    from jobs.evaluate import evaluate
    from jobs.inference_config import EvaluateConfig
    from ttm_ray.config import load_config
    from ttm_ray.evaluation.tiny import build_tiny_clip, build_tiny_fvd_weights, build_tiny_xclip

    models = tmp_path / "models"
    bench = write_benchmark_manifest(generate_corpus(tmp_path / "corpus", 1, seed=3),
                                     tmp_path / "bench.jsonl")
    cfg = load_config(EvaluateConfig, REPO / "jobs/configs/evaluate/quickstart.yaml", [
        f"manifest={bench}", f"out_dir={tmp_path / 'eval'}", f"run.root={tmp_path}",
        f"run.mlflow_tracking_uri={db}", "engine=local",
        f"generation.stage1.export={exports[1]}", f"generation.stage2.export={exports[2]}",
        "generation.stage1.steps=2", "generation.stage2.steps=2", "batch.variants=[gt_manual]",
        f"evaluation.clip.path={build_tiny_clip(models / 'clip')}",
        f"evaluation.viclip.path={build_tiny_xclip(models / 'xclip')}",
        f"evaluation.fvd.weights={build_tiny_fvd_weights(models / 'fvd')}"])
    return evaluate(cfg, progress=False)


def test_prep_train_export_evaluate_form_one_lineage(
        ray_local, tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path,
        tiny_encoders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from jobs.cli import main as cli
    from ttm_ray import lineage as lin

    trained = {stage: train_tiny(f"dit_stage{stage}_tiny", tmp_path_factory, tiny_dataset,
                                 tiny_encoders) for stage in (1, 2)}
    cfg = trained[1][0]
    db = cfg.run.resolved_mlflow_uri()
    tmp = tmp_path_factory.mktemp("lineage")
    prep_run = log_prep_run(db, tiny_dataset, tmp)
    client = lin.client_for(db)

    for stage, (_, summary) in trained.items():
        # 1. the training run's dataset input is the version it trained on
        run = client.get_run(summary["mlflow_run_id"])
        [ds] = run.inputs.dataset_inputs
        assert ds.dataset.name.endswith(f"@{summary['dataset_version']}")
        assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
        # 2. the export is a registered model version of the run
        registered = summary["registered_model"]
        assert registered["name"] == f"ttm-dit-stage{stage}", summary
        mv = client.get_model_version(registered["name"], registered["version"])
        assert mv.run_id == summary["mlflow_run_id"]
        assert mv.source == Path(summary["export"]).resolve().as_uri()
        assert mv.tags["ttm.dataset_version"] == summary["dataset_version"]
        assert mv.tags["ttm.config_hash"] and mv.tags["ttm.run_id"] == mv.run_id

    evaluation = evaluate_pair(db, {s: r[1]["export"] for s, r in trained.items()}, tmp)
    # 3. the evaluation run lists the model versions it scored
    run = client.get_run(evaluation["mlflow_run_id"])
    ids = {trained[s][1]["registered_model"]["model_id"] for s in (1, 2)}
    assert {m.model_id for m in run.inputs.model_inputs} == ids
    for stage in (1, 2):
        registered = trained[stage][1]["registered_model"]
        assert run.data.tags[f"ttm.model_version.stage{stage}"] == \
            f"{registered['name']}/{registered['version']}"

    # 4. `ttm-ray lineage` prints the chain from the raw videos to the evaluation
    registered = trained[2][1]["registered_model"]
    capsys.readouterr()
    assert cli(["lineage", f"{registered['name']}/{registered['version']}",
                "--tracking-uri", db, "--json"]) == 0
    [chain] = json.loads(capsys.readouterr().out)["chains"]
    kinds = [s["kind"] for s in chain]
    assert kinds == ["raw_videos", "prep", "dataset_version", "training", "model_version",
                     "evaluations"], chain
    assert chain[1]["run_id"] == prep_run
    assert chain[3]["run_id"] == trained[2][1]["mlflow_run_id"]
    assert evaluation["mlflow_run_id"] in [r["run_id"] for r in chain[-1]["runs"]]
    assert cli(["lineage", trained[1][1]["dataset_version"], "--tracking-uri", db]) == 0
    text = capsys.readouterr().out
    assert "ttm-dit-stage1/" in text and "ttm-dit-stage2/" in text and "evaluated by" in text
