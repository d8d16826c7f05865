"""MLflow helpers every job uses: flattened config params, code version, tracking URI."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from ttm_ray.config import to_dict

MAX_PARAM_CHARS = 500  # MLflow's param value limit is 6000; keep the UI readable


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (lists and mappings of leaves stay one value)."""
    if hasattr(data, "__dataclass_fields__"):
        data = to_dict(data)
    out: dict[str, str] = {}
    if isinstance(data, dict) and data:
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix.rstrip(".")] = str(data)[:MAX_PARAM_CHARS]
    return out


def code_version() -> str:
    """The git commit of the code (``+dirty`` when modified), or the package version."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        status = ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"ttm-ray=={version('ttm-ray')}"
        except PackageNotFoundError:
            return "unknown"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a ``sqlite:///`` store
    (``<db folder>/mlartifacts``), else the server's / store's own default (None).

    Without this MLflow puts the artifacts of a sqlite store under ``./mlruns`` of whatever
    the working directory happens to be (a repo checkout, a Ray worker's session folder).
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = Path(tracking_uri[len(prefix):])
    return (db.resolve().parent / "mlartifacts").as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of experiment ``name`` in the store, created (artifacts beside a sqlite store)
    when missing. Safe when two jobs race to create it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    except MlflowException:  # another job created it between our two calls
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_mlflow_run(tracking_uri: str, experiment: str, run_name: str,
                     tags: dict[str, str] | None = None):
    """Point MLflow at ``tracking_uri`` and start a run (the caller ends it)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    mlflow.set_experiment(experiment_id=experiment_id)
    return mlflow.start_run(run_name=run_name, tags=tags or {})


def log_params(params: dict[str, str]) -> None:
    import mlflow

    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i:i + 100]))
