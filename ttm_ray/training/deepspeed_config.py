"""DeepSpeed's config dict, generated from the typed :class:`TrainConfig` (never hand-written).

Keeping the dict derived means a run's YAML is the single source of truth: the batch
arithmetic is checked once here, and the ZeRO/bf16/clipping settings cannot drift from what
MLflow records as the run's params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttm_ray.training.config import BatchConfig, TrainConfig

# DeepSpeed prints a line every N steps; the loop logs its own metrics to MLflow.
_QUIET_STEPS = 1_000_000_000


def check_batch(batch: BatchConfig, num_workers: int) -> None:
    """``micro_batch x grad_accum x num_workers == global_batch``, else a ValueError that
    says which numbers would fit (DeepSpeed's own assertion fires only inside a worker)."""
    per_step = batch.micro_batch * batch.grad_accum * num_workers
    if per_step == batch.global_batch:
        return
    hint = ""
    if batch.global_batch % (batch.micro_batch * num_workers) == 0:
        accum = batch.global_batch // (batch.micro_batch * num_workers)
        hint = f"; with micro_batch {batch.micro_batch}, grad_accum {accum} would fit"
    raise ValueError(
        f"batch.global_batch {batch.global_batch} != batch.micro_batch {batch.micro_batch} x "
        f"batch.grad_accum {batch.grad_accum} x scaling.num_workers {num_workers} "
        f"(= {per_step}){hint}")


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The dict for ``deepspeed.initialize(config=...)``.

    The learning-rate schedule is not in here: the loop passes a ``LambdaLR`` (linear warm-up
    then constant), because DeepSpeed's ``WarmupLR`` spends its first step at lr 0 and cannot
    express ``warmup_steps: 0``.
    """
    check_batch(cfg.batch, cfg.scaling.num_workers)
    ds = cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 2:
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    optim = cfg.optim
    return {
        "train_batch_size": cfg.batch.global_batch,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch,
        "gradient_accumulation_steps": cfg.batch.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": optim.torch_adam,
            },
        },
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    """``step -> lr multiplier``: linear from 1/warmup to 1 over ``warmup_steps``, then 1.

    Step 0 already trains at ``lr / warmup`` (not 0), so no optimizer step is wasted.
    """
    def factor(step: int) -> float:
        return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)

    return factor
