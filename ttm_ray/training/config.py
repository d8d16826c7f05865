"""``TrainConfig``: everything one TTM training run needs, validated before any worker starts.

One YAML file (``kind: train``) per run. The paper's four runs (DiT / U-Net x stage 1 / 2) live
under ``jobs/configs/train/``; their tiny CPU variants inherit them with ``base:`` and change
only sizes, encoders and scaling. Checks that need no cluster (batch arithmetic, the ZeRO
stage, the model config resolving) run at load time; checks that need the filesystem (the
dataset version) run in :func:`ttm_ray.training.trainer.preflight`, still on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ttm_ray.config import RunConfig, constrained
from ttm_ray.diffusion import DiffusionConfig
from ttm_ray.models import ModelConfig
from ttm_ray.training.data import EncodersConfig, TrainDataConfig


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up to a constant learning rate (the paper's recipe)."""

    lr: float = constrained(2e-5, gt=0, help="peak (constant) learning rate")
    warmup_steps: int = constrained(2000, ge=0, help="linear warm-up from 0 over these steps")
    max_steps: int = constrained(50_000, gt=0, help="optimizer steps of the whole run")
    weight_decay: float = constrained(0.0, ge=0, help="AdamW decoupled weight decay")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = constrained(1e-8, gt=0)
    grad_clip: float = constrained(1.0, ge=0, help="global grad-norm clip (0: off)")
    torch_adam: bool = constrained(
        True, help="torch.optim.AdamW instead of DeepSpeed's FusedAdam (no JIT build; on GPU "
                   "FusedAdam is a little faster once built)")

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two floats in [0, 1), got {list(self.betas)}")


@dataclass
class BatchConfig:
    """``micro_batch x grad_accum x scaling.num_workers`` must equal ``global_batch``."""

    global_batch: int = constrained(32, gt=0, help="samples per optimizer step, all workers")
    micro_batch: int = constrained(1, gt=0, help="samples per forward pass on one worker")
    grad_accum: int = constrained(1, gt=0, help="micro batches accumulated per step")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed knobs a run may change; :mod:`ttm_ray.training.deepspeed_config` turns
    them into DeepSpeed's own dict."""

    zero_stage: Literal[2, 3] = constrained(
        2, help="2: shard optimizer states + gradients; 3: also shard parameters")
    bf16: bool = constrained(True, help="bf16 weights/activations, fp32 master weights")
    overlap_comm: bool = constrained(True, help="overlap gradient reduction with backward")
    contiguous_gradients: bool = constrained(True, help="copy grads into one buffer")
    reduce_bucket_size: int = constrained(500_000_000, gt=0, help="elements per reduce")
    allgather_bucket_size: int = constrained(500_000_000, gt=0,
                                             help="elements per all-gather (ZeRO-2)")
    offload_optimizer: Literal["none", "cpu"] = constrained(
        "none", help="cpu: optimizer states in host memory (needs DeepSpeed's CPU Adam build)")


@dataclass
class ScalingConfig:
    """Where the workers run (turned into ``ray.train.ScalingConfig``)."""

    num_workers: int = constrained(2, gt=0, help="training workers (one per GPU on GPU)")
    use_gpu: bool = constrained(False, help="one GPU per worker; false: CPU + gloo")
    cpus_per_worker: float = constrained(1.0, gt=0, help="CPUs reserved per worker")
    custom_resources: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "extra Ray resources per worker, e.g. {train_gpu: 1} to pin the "
                          "training group's nodes"})
    accelerator_type: str | None = constrained(
        None, help="Ray accelerator type to schedule on, e.g. A100-80G; null: any")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = constrained(
        "PACK", help="how workers spread over nodes (PACK keeps a node's 8 GPUs together)")


@dataclass
class CheckpointConfig:
    every_steps: int = constrained(1000, gt=0, help="save + report a checkpoint every N steps")
    keep_last: int = constrained(3, gt=0, help="checkpoints kept in storage (oldest deleted)")
    storage_path: str | None = constrained(
        None, help="shared filesystem path or URI for checkpoints; null: <run.root>/train")
    export: bool = constrained(
        True, help="after the run, write consolidated safetensors + model config to "
                   "<run.root>/<run.name>/export")
    verify_export: bool = constrained(
        True, help="reload the export with build_model on the driver and compare it with the "
                   "engine's output on the probe batch (cheap for small models)")
    registered_model: str = constrained(
        "", help="MLflow Model Registry name the export is registered under as a new version "
                 "(tags: run id, dataset version, config hash); empty: ttm-<family>-stage<N>")

    def resolved_storage(self, run: RunConfig) -> str:
        """Absolute local path or URI (Ray needs one every node agrees on)."""
        path = self.storage_path or str(Path(run.root) / "train")
        return path if "://" in path else str(Path(path).resolve())


@dataclass
class LoggingConfig:
    log_every: int = constrained(10, gt=0, help="MLflow metrics every N steps")
    sample_every: int = constrained(
        1000, ge=0, help="sample the fixed validation clip every N steps (0: never)")
    sample_steps: int = constrained(25, ge=2, help="sampler steps for those previews")
    peak_tflops_per_worker: float | None = constrained(
        None, gt=0, help="accelerator peak for MFU (A100 bf16: 312); null: MFU logged as -1")


@dataclass
class FailureConfig:
    max_failures: int = constrained(
        3, ge=-1, help="worker-group restarts from the last checkpoint (-1: unlimited)")


@dataclass
class DebugConfig:
    """Fault-tolerance drills only (tests and rehearsals); both lists are empty in real runs."""

    fail_at_steps: list[int] = field(
        default_factory=list,
        metadata={"help": "raise once on rank 0 before each of these steps (fault-tolerance "
                          "drills); a marker file per step under <run.root>/<run.name> stops "
                          "the retry failing again"})
    pause_at_steps: list[int] = field(
        default_factory=list,
        metadata={"help": "drills that kill processes: rank 0 pauses once before each of these "
                          "steps for up to pause_seconds, after writing "
                          "<run.root>/<run.name>/paused_before_step_<N> (JSON: its pid, rank, "
                          "step), so a drill can SIGKILL a worker or the driver at a known "
                          "step; the marker stops a resumed run pausing there again"})
    pause_seconds: float = constrained(
        120.0, gt=0, help="longest pause at each debug.pause_at_steps step; then training "
                          "goes on (a drill that never kills still finishes)")

    def validate(self) -> None:
        for key in ("fail_at_steps", "pause_at_steps"):
            steps = getattr(self, key)
            if any(s <= 0 for s in steps):
                raise ValueError(f"{key} must be positive steps, got {steps}")


@dataclass
class TrainConfig:
    """``ttm-ray train``: one of the paper's four runs (or a tiny variant)."""

    kind: Literal["train"] = "train"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        from ttm_ray.training.deepspeed_config import check_batch

        check_batch(self.batch, self.scaling.num_workers)

    @property
    def out_dir(self) -> Path:
        """``<run.root>/<run.name>``: effective config, export, debug markers."""
        return self.run.out_dir

    @property
    def bad_rows_file(self) -> Path:
        """Written by the workers when too many rows are bad (``data.max_bad_fraction``)."""
        return self.out_dir / "bad_rows.json"
