"""The lineage in MLflow without Ray: a published version logged by prep's real MLflow code, a
training run created by the trainer's real ``resolve_run``, an export registered like the
trainer does, an evaluation run logging what it scored; then ``ttm-ray lineage`` walks it.
The end-to-end version (real prep, training, export, evaluation) is
tests/training/test_lineage_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from ttm_ray import lineage as lin

REPO = Path(__file__).resolve().parents[1]


def publish_version(root: Path) -> object:
    from ttm_ray.dataset.versions import VersionWriter

    writer = VersionWriter(root)
    writer.write_table("data", pa.table({"clip_id": ["a", "b"]}))
    writer.add_file("card/README.md", b"# tiny\n")
    return writer.publish({"source": {"path": "corpus"}})


def prep_config(tmp_path: Path, db: str, root: Path) -> object:
    from data_prep.config import PrepConfig
    from ttm_ray.config import load_config

    return load_config(PrepConfig, REPO / "jobs/configs/prep/quickstart.yaml", [
        f"run.root={tmp_path}", f"run.mlflow_tracking_uri={db}",
        f"publish.dataset_root={root}", f"source.path={tmp_path / 'corpus.parquet'}"])


def train_config(tmp_path: Path, db: str, root: Path) -> object:
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig

    return load_config(TrainConfig, REPO / "jobs/configs/train/dit_stage1_tiny.yaml", [
        f"run.root={tmp_path}", f"run.mlflow_tracking_uri={db}",
        f"data.dataset_root={root}"])


def fake_export(folder: Path, run_id: str, version: str) -> Path:
    """The files of an export that registration reads (no weights: they are never copied)."""
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text("family: dit\n")
    (folder / "export.json").write_text(json.dumps({
        "run_name": "dit-stage1-tiny", "step": 4, "dataset_version": version,
        "mlflow_run_id": run_id, "config_hash": "abc", "code_version": "test"}))
    return folder


@pytest.fixture
def store(tmp_path: Path) -> dict:
    """prep run -> version -> training run -> registered export -> evaluation run."""
    import mlflow

    from data_prep.job import log_version_to_mlflow
    from ttm_ray.tracking import start_mlflow_run
    from ttm_ray.training.mlflow_logging import register_export, resolve_run

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "dataset"
    version = publish_version(root)
    prep_run = log_version_to_mlflow(prep_config(tmp_path, db, root), version, {"kept": 2})
    cfg = train_config(tmp_path, db, root)
    train_run = resolve_run(cfg, str(tmp_path / "train" / "run"), version.name)
    assert resolve_run(cfg, str(tmp_path / "train" / "run"), version.name) == train_run
    export = fake_export(tmp_path / "export", train_run, version.name)
    info = json.loads((export / "export.json").read_text())
    registered = register_export(cfg, train_run, str(export), info)
    # A rerun of the finished run exports the same step again: same model version.
    assert register_export(cfg, train_run, str(export), info) == registered
    with start_mlflow_run(db, "ttm-ray", "evaluate-test",
                          {"ttm.kind": "evaluate", "ttm.job": "evaluate"}) as run:
        scored = lin.log_scored_models({"stage1": export})
    mlflow.set_tracking_uri(None)  # leave the session's store as it was for later tests
    return {"db": db, "version": version, "prep": prep_run, "train": train_run,
            "registered": registered, "eval": run.info.run_id, "scored": scored,
            "root": root}


def test_each_link_is_an_mlflow_object(store: dict) -> None:
    client = lin.client_for(store["db"])
    version = store["version"]
    digest = lin.manifest_digest(version.manifest)

    prep = client.get_run(store["prep"])
    contexts = {d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
                for d in prep.inputs.dataset_inputs}
    assert contexts == {f"dataset@{version.name}": "output",
                        "raw-videos@corpus.parquet": "source"}
    assert prep.data.tags["ttm.job"] == "prep" and prep.data.tags["job"] == "prep"
    assert prep.data.tags["ttm.dataset_version"] == prep.data.tags["dataset_version"]
    assert prep.data.tags["ttm.config_hash"]

    train = client.get_run(store["train"])
    [ds] = train.inputs.dataset_inputs  # logged once, though resolve_run ran twice
    assert (ds.dataset.name, ds.dataset.digest) == (f"dataset@{version.name}", digest)
    assert json.loads(ds.dataset.source)["uri"] == version.uri
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    assert train.data.tags["ttm.job"] == "train" and train.data.tags["ttm.kind"] == "train"

    registered = store["registered"]
    assert registered["name"] == "ttm-dit-stage1" and registered["version"] == "1"
    mv = client.get_model_version("ttm-dit-stage1", "1")
    assert mv.run_id == store["train"] and lin.model_id_of(mv) == registered["model_id"]
    assert mv.tags["ttm.run_id"] == store["train"]
    assert mv.tags["ttm.dataset_version"] == version.name and mv.tags["ttm.config_hash"] == "abc"
    assert [m.model_id for m in train.outputs.model_outputs] == [registered["model_id"]]
    model = client.get_logged_model(registered["model_id"])
    assert model.source_run_id == store["train"] and model.status == "READY"
    assert [a.path for a in client.list_logged_model_artifacts(model.model_id)] == [
        "export.json", "model.yaml"]

    evaluation = client.get_run(store["eval"])
    assert [m.model_id for m in evaluation.inputs.model_inputs] == [registered["model_id"]]
    assert evaluation.data.tags["ttm.model_version.stage1"] == "ttm-dit-stage1/1"
    assert store["scored"] == {"stage1": "ttm-dit-stage1/1"}


@pytest.mark.parametrize("query", ["VERSION", "v0001", "ttm-dit-stage1", "ttm-dit-stage1/1",
                                   "models:/ttm-dit-stage1/1"])
def test_lineage_walks_from_a_version_or_a_model(store: dict, query: str) -> None:
    query = store["version"].name if query == "VERSION" else query
    [chain] = lin.lineage(lin.client_for(store["db"]), query)
    kinds = [s["kind"] for s in chain.steps]
    assert kinds == ["raw_videos", "prep", "dataset_version", "training", "model_version",
                     "evaluations"]
    steps = dict(zip(kinds, chain.steps, strict=True))
    assert steps["raw_videos"]["source"].endswith("corpus.parquet")
    assert steps["prep"]["run_id"] == store["prep"]
    assert steps["dataset_version"]["version"] == store["version"].name
    assert steps["training"]["run_id"] == store["train"]
    assert steps["model_version"]["version"] == "1"
    assert [r["run_id"] for r in steps["evaluations"]["runs"]] == [store["eval"]]


def test_cli_prints_the_chain_and_says_when_nothing_matches(store: dict, capsys,
                                                            tmp_path: Path) -> None:
    from jobs.cli import main

    assert main(["lineage", "ttm-dit-stage1/1", "--tracking-uri", store["db"]]) == 0
    text = capsys.readouterr().out
    for word in ("raw videos", "prep run", "dataset version", "training run",
                 "model version    ttm-dit-stage1/1", "evaluated by     evaluate-test"):
        assert word in text, text
    assert main(["lineage", store["version"].name, "--json", "--tracking-uri", store["db"]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chains"][0][-1]["runs"][0]["run_id"] == store["eval"]

    assert main(["lineage", "v0042", "--tracking-uri", store["db"]]) == 1
    assert "'v0042': no registered model" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    assert main(["lineage", "v0001", "--tracking-uri", missing]) == 1
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()


def test_an_unchanged_prep_rerun_gives_an_old_prep_run_its_lineage(tmp_path: Path) -> None:
    """Stores from before the lineage: the prep run has the old tags only. A rerun that
    publishes nothing adds the ``ttm.*`` tags and dataset inputs to that run (no new run)."""
    import mlflow

    from data_prep.job import ensure_version_in_mlflow
    from ttm_ray.tracking import start_mlflow_run

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "dataset"
    version = publish_version(root)
    cfg = prep_config(tmp_path, db, root)
    with start_mlflow_run(db, "ttm-ray", f"prep-{version.name}", {
            "job": "prep", "dataset_version": version.name,
            "dataset_root": str(cfg.dataset_root)}) as run:
        old = run.info.run_id
    mlflow.set_tracking_uri(None)
    assert ensure_version_in_mlflow(cfg, version, {}) == old
    assert ensure_version_in_mlflow(cfg, version, {}) == old  # idempotent
    client = lin.client_for(db)
    [found] = client.search_runs([client.get_experiment_by_name("ttm-ray").experiment_id])
    assert found.data.tags["ttm.job"] == "prep"
    assert found.data.tags["ttm.source"].endswith("corpus.parquet")
    assert len(found.inputs.dataset_inputs) == 2
    [chain] = lin.lineage(client, version.name)
    assert [s["kind"] for s in chain.steps] == ["raw_videos", "prep", "dataset_version"]
