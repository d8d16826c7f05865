"""MLflow for training: one run per run name, continued across failures and resubmissions.

* The driver finds or creates the MLflow run before any worker starts
  (:func:`resolve_run`) and keeps its id in ``<storage>/<run>/mlflow_run_id``; a resubmission
  of the same run name (or a Ray Train restart) therefore logs into the same run.
* Inside the worker loop, ``ray.air.integrations.mlflow.setup_mlflow`` (Ray Train V2 has no
  MLflow logger callback) attaches rank 0 to that run through ``MLFLOW_RUN_ID``; every other
  rank gets a no-op module, so call sites need no rank checks.
* Params: the whole effective config, flattened. Tags (``ttm_ray.lineage``'s vocabulary):
  job, dataset version and root, config and code versions. The dataset (or encoded) version
  the run reads is its MLflow dataset input (context ``training``); the export is registered
  as a model version (:func:`register_export`).
  Metrics: loss, lr, grad norm, samples/s, tokens/s, step time, MFU, peak memory. Every M
  steps a GIF of the fixed validation clip next to a sample from the current weights.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ttm_ray.config import config_hash
from ttm_ray.tracking import code_version, ensure_experiment, flatten

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from ttm_ray.training.config import TrainConfig

RUN_ID_FILE = "mlflow_run_id"


# ---------------------------------------------------------------------------- driver side
def resolve_run(cfg: TrainConfig, run_storage: str, dataset_version: str,
                encoded: str | None = None) -> str:
    """The MLflow run id of this training run: the one recorded in storage, else a new run
    tagged with the dataset and code versions (recorded for the next submission); a run on
    an encoded version (``data.encoded``) is tagged ``ttm.encoded_version`` =
    ``<encoded root>@<version>`` too. Either way the version is logged as the run's dataset
    input (once: a resumed run already has it)."""
    import pyarrow.fs as pafs

    from ttm_ray import lineage as lin

    fs, root = pafs.FileSystem.from_uri(run_storage)
    path = f"{root}/{RUN_ID_FILE}"
    uri = cfg.run.resolved_mlflow_uri()
    client = lin.client_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            run_id = f.read().decode().strip()
        have = client.get_run(run_id).data.tags  # fails loudly if the store lost the run
        # A run created before the ttm.* vocabulary gets the tags it lacks; present ones stay
        # (they describe the run's first submission).
        for key, value in run_tags(cfg, dataset_version, encoded).items():
            if key not in have:
                client.set_tag(run_id, key, value)
    else:
        experiment_id = ensure_experiment(uri, cfg.run.mlflow_experiment)
        run_id = client.create_run(experiment_id, run_name=cfg.run.name,
                                   tags=run_tags(cfg, dataset_version, encoded)).info.run_id
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(run_id.encode())
    log_dataset_input(cfg, client, run_id, dataset_version)
    return run_id


def run_tags(cfg: TrainConfig, dataset_version: str, encoded: str | None) -> dict[str, str]:
    from ttm_ray import lineage as lin

    return lin.job_tags("train", dataset_version=dataset_version,
                        dataset_root=cfg.data.encoded or cfg.data.dataset_root,
                        config_hash=config_hash(cfg), code_version=code_version(),
                        model=f"{cfg.model.size} stage {cfg.model.stage}",
                        encoded_version=encoded)


def log_dataset_input(cfg: TrainConfig, client: MlflowClient, run_id: str,
                      dataset_version: str) -> None:
    """The version the run reads (the encoded one with ``data.encoded``) as its MLflow
    dataset input, context ``training``."""
    from ttm_ray import lineage as lin
    from ttm_ray.dataset.versions import open_version

    version = open_version(cfg.data.encoded or cfg.data.dataset_root, dataset_version)
    lin.log_datasets(client, run_id, [(lin.version_dataset(version), lin.CONTEXT_TRAINING)])


def register_export(cfg: TrainConfig, run_id: str, export_dir: str,
                    info: dict[str, Any]) -> dict[str, Any]:
    """Register the run's export in the Model Registry (``checkpoint.registered_model``, by
    default ``ttm-<family>-stage<N>``); returns name, version, model id and ``models:/`` URI."""
    from ttm_ray import lineage as lin

    name = cfg.checkpoint.registered_model or lin.default_model_name(cfg.model.family,
                                                                     cfg.model.stage)
    registered = lin.register_export(cfg.run.resolved_mlflow_uri(), run_id, export_dir, name,
                                     info)
    return registered.as_dict()


# ---------------------------------------------------------------------------- worker side
class Tracker:
    """Rank 0's MLflow handle (a no-op on other ranks) plus the throughput bookkeeping."""

    def __init__(self, cfg: TrainConfig, run_id: str, log_params: bool,
                 tokens_per_sample: int, flops_per_sample: int) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        os.environ["MLFLOW_RUN_ID"] = run_id  # setup_mlflow's start_run resumes this run
        self.mlflow = setup_mlflow(tracking_uri=cfg.run.mlflow_tracking_uri,
                                   experiment_name=cfg.run.mlflow_experiment,
                                   # the name, else setup_mlflow renames the run after the
                                   # experiment when it resumes it
                                   run_name=cfg.run.name,
                                   create_experiment_if_not_exists=True)
        if log_params:
            params = list(flatten(cfg).items())
            for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
                self.mlflow.log_params(dict(params[i:i + 100]))
        self.cfg = cfg
        self.tokens_per_sample = tokens_per_sample
        self.flops_per_sample = flops_per_sample  # forward FLOPs; <= 0 when unknown
        self._since = time.perf_counter()
        self._steps = 0

    def tick(self) -> None:
        """Count one optimizer step towards the next throughput average."""
        self._steps += 1

    def throughput(self) -> dict[str, float]:
        """Averages since the last call: step time, samples/s, tokens/s, MFU, peak memory.
        Wall-clock per step, so checkpoints and previews in the interval count against it."""
        now = time.perf_counter()
        step_time = (now - self._since) / max(self._steps, 1)
        self._since, self._steps = now, 0
        samples = self.cfg.batch.global_batch / step_time
        peak = self.cfg.logging.peak_tflops_per_worker
        # Training ~ 3x the forward FLOPs (forward + backward's two matmuls per forward one).
        mfu = (3 * self.flops_per_sample * samples
               / (peak * 1e12 * self.cfg.scaling.num_workers)
               if peak and self.flops_per_sample > 0 else -1.0)
        return {"step_time_s": step_time, "samples_per_s": samples,
                "tokens_per_s": samples * self.tokens_per_sample, "mfu": mfu,
                "peak_mem_gb": peak_memory_gb()}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def end(self) -> None:
        self.mlflow.end_run()

    def log_video(self, step: int, frames: torch.Tensor, fps: int = 8) -> None:
        """``frames [T, H, W, 3]`` uint8 as ``samples/step_XXXXXXXX.gif``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{step:08d}.gif"
            write_gif(frames, path, fps)
            self.mlflow.log_artifact(str(path), artifact_path="samples")


def peak_memory_gb() -> float:
    """Peak accelerator memory of this process (GPU), else its peak RSS (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes vs KiB


def model_cost(cfg: TrainConfig, model: torch.nn.Module) -> tuple[int, int]:
    """``(tokens, forward FLOPs)`` per sample for the throughput metrics (FLOPs -1 when the
    FLOP count is unavailable: MFU is then logged as -1, never guessed)."""
    m = cfg.model
    grid = getattr(model, "token_grid", None)
    t, h, w = grid(m.num_frames, m.height, m.width) if grid else (m.num_frames, m.height,
                                                                   m.width)
    try:
        from ttm_ray.models.flops import forward_flops

        flops = int(forward_flops(m, batch=1))
    except Exception:  # optional module / a size it cannot count: MFU becomes -1
        flops = -1
    return t * h * w, flops


# ---------------------------------------------------------------------------- previews
def preview_frames(reference: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Two decoded videos ``[3, T, H, W]`` in [-1, 1] side by side -> ``[T, H, 2W, 3]`` uint8
    (left: the validation clip's target, right: the model's sample)."""
    both = torch.cat([reference, sample], dim=-1).float().clamp(-1, 1)
    return ((both + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()


def write_gif(frames: torch.Tensor, path: Path, fps: int = 8) -> None:
    from PIL import Image

    images = [Image.fromarray(f.numpy()) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps),
                   loop=0)
