"""The Ray Train worker loop: build, restore, then step / log / checkpoint until max_steps.

Runs once per worker (``TorchTrainer(train_worker)``). Everything that decides *what* is
trained comes from the config and the driver's ``job`` record; this file only wires the
pieces together, torchtitan style, so the whole loop reads top to bottom in ``train_worker``.

Exact resume rests on three things restored from the checkpoint: DeepSpeed's state (weights,
optimizer, lr schedule), the data position (which rows the next step reads) and each rank's
generator (which noise, t and condition dropout it draws). Nothing random in the loop uses
any other source.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.config import from_dict
from ttm_ray.diffusion import ModelFn
from ttm_ray.training.checkpoint import (
    Probe,
    TrainState,
    rank_seed,
    restore,
    save_and_report,
    seed_everything,
)
from ttm_ray.training.config import TrainConfig
from ttm_ray.training.data import ShardedSampler, TrainingData, build_sampler
from ttm_ray.training.deepspeed_config import deepspeed_config, warmup_factor
from ttm_ray.training.encoded_data import EncodedTrainingData
from ttm_ray.training.mlflow_logging import Tracker, model_cost, preview_frames
from ttm_ray.training.model_init import build_train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What the driver resolved once for the whole run (the same on every attempt)."""

    dataset_version: str
    mlflow_run_id: str
    config_hash: str


class InjectedFailure(RuntimeError):
    """``debug.fail_at_steps``: a deliberate worker failure for fault-tolerance drills."""


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entrypoint: ``config = {"train": <TrainConfig dict>, "job": <Job dict>}``."""
    import deepspeed
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainConfig, config["train"])
    job = Job(**config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    # Model and engine: identical initial weights on every rank, then DeepSpeed shards them.
    seed_everything(cfg.run.seed)
    ds_config = deepspeed_config(cfg)
    model = build_train_model(cfg, ds_config, device)  # ZeRO-3: partitioned as it is built
    tokens_per_sample, flops_per_sample = model_cost(cfg, model)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_factor(cfg.optim.warmup_steps)))

    # Data and the frozen encoders, on this worker's device. With data.encoded the encoder
    # outputs are read from the encoded version (job.dataset_version names it) and the
    # encoders are never built: the null prompt for dropout comes with the version.
    if cfg.data.encoded:
        encoders = None
        data = EncodedTrainingData(replace(cfg.data, encoded_version=job.dataset_version),
                                   cfg.model.stage, cfg.model, device)
        null_text = data.null_text(1)
    else:
        encoders = cfg.encoders.build(device)
        data = TrainingData(replace(cfg.data, version=job.dataset_version), cfg.model.stage,
                            cfg.model, encoders, device)
        null_text = encoders.null_text(1)
    sampler = build_sampler(cfg.data, data, world, rank, cfg.batch.micro_batch,
                            cfg.batch.grad_accum)
    objective = cfg.diffusion.build()
    guidance = cfg.diffusion.guidance.build(*null_text)

    # Fresh start or resume (a restart after a failure, or a resubmitted run name).
    state = TrainState.fresh(cfg.run.seed, rank)
    seed_everything(rank_seed(cfg.run.seed, rank))  # per-rank global RNGs from here on
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, saved = restore(engine, folder, cfg.run.seed, rank, world)
        if saved["dataset_version"] != job.dataset_version:
            raise RuntimeError(f"checkpoint trained on dataset {saved['dataset_version']}, this "
                               f"attempt resolved {job.dataset_version}")
        log.info("rank %d resumed at step %d (%s)", rank, state.step, state.position)
    tracker = Tracker(cfg, job.mlflow_run_id, log_params=checkpoint is None,
                      tokens_per_sample=tokens_per_sample, flops_per_sample=flops_per_sample)
    meta = {"dataset_version": job.dataset_version, "config_hash": job.config_hash,
            "mlflow_run_id": job.mlflow_run_id, "world_size": world,
            # what a clip of this model is in pixels (inference reads it from the export)
            "pixel_shape": list(data.pixel_shape)}
    model_fn = engine_fn(engine)
    max_steps = cfg.optim.max_steps

    while state.step < max_steps:
        maybe_pause(cfg, state.step + 1, rank)
        maybe_fail(cfg, state.step + 1, rank)
        lr = engine.get_lr()[0]  # the rate this step trains with (the schedule moves after)
        loss = train_step(engine, model_fn, data, sampler, objective, guidance, state)
        state.step += 1
        state.position = sampler.advance(state.position)
        tracker.tick()
        bad_rows = count_over_ranks(len(data.bad_rows), device)
        if bad_rows > cfg.data.max_bad_fraction * data.num_rows:
            # Every rank sees the same count, so all stop together (no crash loop: a retry
            # would read the same rows); the driver turns the file into the job's error.
            write_bad_rows(cfg, data, rank, world, state.step)
            break
        last = state.step == max_steps
        metrics = {"step": state.step, "bad_rows": bad_rows}
        if state.step % cfg.logging.log_every == 0 or last:
            metrics.update(loss=mean_over_ranks(loss), lr=lr,
                           grad_norm=grad_norm(engine), **tracker.throughput())
            tracker.log(state.step, metrics)
        if cfg.logging.sample_every and (state.step % cfg.logging.sample_every == 0 or last):
            preview(engine, model_fn, cfg, data, encoders, guidance, tracker, state.step)
        if state.step % cfg.checkpoint.every_steps == 0 or last:
            # The last checkpoint carries a probe: the export is checked against it.
            probe = record_probe(engine, model_fn, objective, data, cfg.run.seed) if last \
                else None
            save_and_report(engine, state, meta, metrics, probe)
    tracker.end()
    data.close()


def train_step(engine: Any, model_fn: ModelFn, data: TrainingData, sampler: ShardedSampler,
               objective: Any, guidance: Any, state: TrainState) -> torch.Tensor:
    """One optimizer step over this rank's ``grad_accum`` micro batches; returns the mean loss.

    ``engine.step()`` after every micro batch is DeepSpeed's contract: it only updates the
    weights (and the lr schedule) at the accumulation boundary.
    """
    losses = []
    for k, indices in enumerate(sampler.next_micro_batches(state.position)):
        x, cond = data.batch(indices, state.generator)
        if k == 0:  # decode the next step's clips on the data threads while this one computes
            data.prefetch(sampler.next_micro_batches(sampler.advance(state.position)))
        cond = guidance.drop(cond, state.generator)
        loss = objective.loss(model_fn, x, cond, state.generator)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def engine_fn(engine: Any) -> ModelFn:
    """The engine as a ``ModelFn``: inputs cast to its weights' dtype (bf16 under
    ``deepspeed.bf16``), output back to float32 so the loss and samplers run in fp32."""
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    def call(x_t: torch.Tensor, t: torch.Tensor, cond: ModelConditioning) -> torch.Tensor:
        return engine(x_t.to(dtype), t, cond.to(x_t.device, dtype)).float()

    return call


def mean_over_ranks(value: torch.Tensor) -> float:
    """The global mean of a per-rank scalar (collective: every rank calls it)."""
    import torch.distributed as dist

    total = value.detach().float().clone()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def count_over_ranks(count: int, device: torch.device) -> int:
    """The sum of a per-rank count (collective: every rank calls it every step)."""
    import torch.distributed as dist

    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def write_bad_rows(cfg: TrainConfig, data: TrainingData, rank: int, world: int,
                   step: int) -> None:
    """Gather every rank's bad rows; rank 0 writes ``<run>/bad_rows.json`` (collective)."""
    import torch.distributed as dist

    gathered: list[dict[int, str] | None] = [None] * world
    dist.all_gather_object(gathered, data.bad_rows)
    if rank != 0:
        return
    rows = {i: r for part in gathered for i, r in (part or {}).items()}
    path = cfg.bad_rows_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "step": step, "dataset_version": data.version, "num_rows": data.num_rows,
        "max_bad_fraction": cfg.data.max_bad_fraction,
        "bad_rows": [{"row": i, "error": r} for i, r in sorted(rows.items())]}, indent=2))


def grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return -1.0 if norm is None else float(norm)


def maybe_fail(cfg: TrainConfig, step: int, rank: int) -> None:
    """Raise once on rank 0 before each ``debug.fail_at_steps``; the marker makes the retry
    pass."""
    if step not in cfg.debug.fail_at_steps or rank != 0:
        return
    marker = Path(cfg.run.root) / cfg.run.name / f"injected_failure_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    raise InjectedFailure(f"debug.fail_at_steps: injected failure before step {step} ({marker})")


def maybe_pause(cfg: TrainConfig, step: int, rank: int) -> None:
    """Pause rank 0 once before each ``debug.pause_at_steps`` step for a drill to kill a
    process at a known point: the marker names this process and is written before the wait,
    and its existence makes a resumed run go straight through. Steps up to ``step - 1`` are
    done (logged, and checkpointed where due) on every rank; the others wait for rank 0 in
    this step's first collective."""
    if step not in cfg.debug.pause_at_steps or rank != 0:
        return
    marker = cfg.out_dir / f"paused_before_step_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")  # renamed into place: a reader never sees half a file
    tmp.write_text(json.dumps({"pid": os.getpid(), "rank": rank, "step": step}))
    tmp.rename(marker)
    log.warning("debug.pause_at_steps: rank 0 (pid %d) pauses before step %d for up to %.0f s",
                os.getpid(), step, cfg.debug.pause_seconds)
    time.sleep(cfg.debug.pause_seconds)


def record_probe(engine: Any, model_fn: ModelFn, objective: Any, data: TrainingData,
                 seed: int) -> Probe:
    """One model call of the objective's loss on the validation clip, recorded in eval mode.

    Going through ``objective.loss`` gives inputs in the objective's own conventions (noisy
    latent, t range) without knowing which objective it is. All ranks run it (ZeRO-3 gathers
    parameters collectively); rank 0 writes it.
    """
    x, cond, _ = data.validation_sample()
    calls: list[Probe] = []

    def recording(x_t: torch.Tensor, t: torch.Tensor, c: ModelConditioning) -> torch.Tensor:
        out = model_fn(x_t, t, c)
        calls.append(Probe(x_t, t, c, out))
        return out

    engine.eval()
    with torch.no_grad():
        objective.loss(recording, x, cond, torch.Generator().manual_seed(seed))
    engine.train()
    return calls[0]


def preview(engine: Any, model_fn: ModelFn, cfg: TrainConfig, data: TrainingData,
            encoders: Any, guidance: Any, tracker: Tracker, step: int) -> None:
    """Sample the fixed validation clip with the current weights; rank 0 logs a GIF of the
    target next to the sample. A fixed generator keeps the loop's own RNG untouched."""
    x, cond, _ = data.validation_sample()
    sampler = cfg.diffusion.with_sampling(cfg.logging.sample_steps).build()
    engine.eval()
    with torch.no_grad():
        latent = sampler.sample(model_fn, tuple(x.shape), cond,
                                generator=torch.Generator().manual_seed(cfg.run.seed),
                                guidance=guidance)
    engine.train()
    if engine.global_rank == 0:
        # An encoded run holds no encoders: rank 0 builds the autoencoder for the preview
        # only (the text encoder is never needed).
        ae = encoders.autoencoder if encoders is not None \
            else cfg.encoders.autoencoder.build(x.device)
        decode = ae.decode
        frames = preview_frames(decode(x[:1].float())[0], decode(latent[:1].float())[0])
        tracker.log_video(step, frames)
