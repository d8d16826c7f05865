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


def start_mlflow_run(tracking_uri: str, experiment: str, run_name: str,
                     tags: dict[str, str] | None = None):
    """Point MLflow at ``tracking_uri`` and start a run (the caller ends it)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name, tags=tags or {})


def log_params(params: dict[str, str]) -> None:
    import mlflow

    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i:i + 100]))
