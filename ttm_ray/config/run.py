"""Settings every job shares: where it writes, which Ray cluster, which MLflow store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ttm_ray.config.schema import constrained


@dataclass
class RunConfig:
    name: str = constrained("default", nonempty=True, help="run name; outputs go to root/name")
    root: str = constrained("runs", nonempty=True, help="folder (or URI) for all run outputs")
    ray_address: str | None = constrained(
        None, help="Ray cluster to join ('auto', 'ray://host:10001'); null: $RAY_ADDRESS or local"
    )
    num_cpus: int | None = constrained(
        None, gt=0, help="CPUs for a local Ray started by the job (null: all)"
    )
    mlflow_tracking_uri: str | None = constrained(
        None, help="MLflow tracking URI; null: $MLFLOW_TRACKING_URI or sqlite under root"
    )
    mlflow_experiment: str = constrained("ttm-ray", nonempty=True)
    seed: int = constrained(0, ge=0)
    capacity_timeout_s: float = constrained(
        900.0, ge=0,
        help="on an autoscaling cluster, how long the job waits for the nodes it asked for "
             "before failing (names the node type that never came); a fixed cluster fails "
             "at once")

    @property
    def out_dir(self) -> Path:
        return Path(self.root) / self.name

    def resolved_ray_address(self) -> str | None:
        """Explicit config wins, then ``RAY_ADDRESS``; ``None`` means start a local Ray."""
        return self.ray_address or os.environ.get("RAY_ADDRESS") or None

    def resolved_mlflow_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(Path(self.root) / 'mlflow.db').resolve()}"
