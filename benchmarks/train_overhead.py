"""Training overhead: the Ray Train + DeepSpeed path against a bare PyTorch loop, same batches.

    .venv/bin/python benchmarks/train_overhead.py [--steps N] [--warmup W] [--workers 1 2]
        [--config jobs/configs/train/dit_stage1_tiny.yaml] [--dataset-root DIR] [--gpu]

Builds a tiny dataset the way the training tests do (generated corpus -> ``run_prep`` with GT
masks, manifest captions/prompts, a tiny random CLIP for the omega score, embedded clip bytes;
the quickstart prep config) and the tiny random text encoder of the run's family in a work
dir (or reads ``--dataset-root``), then measures in one process, on the same model config,
dataset version and global batch:

* **baseline**: the loop's own pieces (:func:`ttm_ray.training.loop.train_step`,
  ``TrainingData``, ``ShardedSampler``, the objective, guidance dropout, ``engine_fn``) run in
  this process with world size 1, no Ray and no DeepSpeed. ``train_step`` only needs
  ``backward()``/``step()`` of its engine, so :class:`PlainEngine` gives it those over
  ``torch.optim.AdamW`` (DeepSpeed's semantics: loss / grad_accum, clip + optimizer + lr
  schedule at the accumulation boundary). One torch thread, like every Ray worker
  (``OMP_NUM_THREADS=1``): the ratio then measures the infrastructure, not torch's threading.
  Timed with the loop's :class:`~ttm_ray.training.mlflow_logging.Tracker` (``tick`` per step,
  ``throughput`` after the timed steps), so both paths compute step time the same way.
* **DeepSpeed, no Ray** (``--no-local-deepspeed`` skips it): the same in-process loop with
  the worker's own ``deepspeed.initialize`` (rank 0 of a 1-process gloo group) as the engine,
  which splits the Ray path's overhead into DeepSpeed's share and Ray's.
* **ray**: :func:`ttm_ray.training.trainer.train` on the local Ray (2 CPUs, CPU workers, gloo,
  DeepSpeed ZeRO as configured) with ``scaling.num_workers`` 1 and 2. The steady-state step
  time is read back from the run's MLflow ``step_time_s`` metrics, skipping the intervals that
  contain the ``--warmup`` steps; "start-up s" = wall time of ``train()`` minus all steps at that
  steady rate (worker processes, imports, DeepSpeed init, data loading, the one checkpoint at
  the last step, teardown).

The in-process runs go once before and once after the Ray runs and count with the mean of the
two: a shared machine's load drifts over minutes, and bracketing spreads the drift over both
sides. Every run uses the same micro batch (the config's), so each forward has the same shape; the
grad accumulation makes up the global batch: baseline ``micro x accum`` = 1 worker's = 2
workers' ``micro x accum x 2``. Checkpoints only at the last step, no previews, no export:
what is timed is the stepping (MLflow logging every ``--log-every`` steps is part of it, as in
a real run).

``--gpu`` (CUDA only; skipped with a message elsewhere): samples/s and MFU of the real
training step (forward + backward + AdamW step, bf16 weights, the run's objective) of
``build_model`` at the paper's latent grid (``--gpu-config``, batch 1) for dit-tiny, a
10-block dit-4b and the full dit-4b with activation checkpointing, as far as each fits the GPU.
FLOPs and MFU come from the loop's own ``model_cost`` and ``Tracker.throughput``.

Output: tables, one JSON line (``{"benchmark": "train_overhead", ...}``), and the Markdown
tables written into ``--out`` between generated-section markers (text outside them is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_section  # noqa: E402  (benchmarks/ is not a package)

# Before torch/DeepSpeed load (tests/conftest.py does the same): DeepSpeed's CPU comm op is
# JIT-built once into this cache (40-45 s otherwise, every run), and the CPU comparison runs
# DeepSpeed on its CPU accelerator, also on a GPU box (the --gpu section uses no DeepSpeed).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CONFIG = REPO / "jobs" / "configs" / "train" / "dit_stage1_tiny.yaml"
PREP_CONFIG = REPO / "jobs" / "configs" / "prep" / "quickstart.yaml"
GPU_CONFIG = REPO / "jobs" / "configs" / "train" / "dit_stage1.yaml"
RESULTS = REPO / "benchmarks" / "results"
RAY_CPUS = 2
VIDEOS = 6  # as tests/training/conftest.py: 8+ clips, a few global batches of 4
CLIP_FRAMES = 9  # ditto: 4/8-frame pixel runs and a causal 1 + 8 video VAE all fit
LOCAL_LABEL = {"plain": "plain loop (baseline)", "deepspeed": "DeepSpeed, no Ray"}
#: (label, dit-4b/dit-tiny size, ModelConfig.overrides, activation checkpointing) of --gpu.
GPU_CASES = (
    ("dit-tiny", "dit-tiny", {}, False),
    ("dit-4b, 10 of 40 blocks", "dit-4b", {"depth": 10}, False),
    ("dit-4b", "dit-4b", {}, True),
)
#: Dense bf16 peak TFLOP/s by device-name fragment (SXM parts; --peak-tflops overrides).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}

log = functools.partial(print, file=sys.stderr, flush=True)

if TYPE_CHECKING:
    import torch

    from ttm_ray.training.config import TrainConfig


# ----------------------------------------------------------------------------- setup
def build_dataset(root: Path, clip_dir: Path) -> Path:
    """The training tests' tiny dataset (see ``tests/training/conftest.py``), from the
    quickstart prep config; returns the dataset root (its ``latest`` version)."""
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep
    from data_prep.synthetic import generate_corpus
    from ttm_ray.config import load_config

    manifest = generate_corpus(root / "corpus", VIDEOS, seed=11)
    cfg = load_config(PrepConfig, PREP_CONFIG, [
        f"run.root={root}", "run.name=prep", f"source.path={manifest}",
        f"output.dir={root / 'prep'}", f"score.clip_model_path={clip_dir}",
        f"clip.num_frames={CLIP_FRAMES}",
        "filter.omega=0.0",  # random CLIP weights: keep every clip, the scores mean nothing
        "publish.embed_clip_bytes=true",  # training reads the embedded mp4s
    ])
    summary = run_prep(cfg, progress=False, track=False)
    return Path(summary["dataset_root"])


def text_encoder_dir(cfg: TrainConfig, root: Path) -> Path:
    """A tiny random text encoder of the run's kind (t5 for the DiT, clip for the U-Net)."""
    from ttm_ray.conditioning import tiny

    kind = cfg.encoders.text_encoder.kind
    builder = {"t5": tiny.build_tiny_t5, "clip": tiny.build_tiny_clip_text}[kind]
    return builder(root / f"tiny-{kind}")


def run_config(path: Path, work: Path, dataset_root: Path, text_dir: Path, name: str,
               workers: int, steps: int, log_every: int, cpus_per_worker: float,
               extra: list[str]) -> TrainConfig:
    """``path`` on the benchmark's dataset, encoders and MLflow store, ``workers`` workers,
    ``steps`` steps, grad accumulation making up the config's global batch; no previews, no
    export, a checkpoint only at the last step (what is timed is the stepping)."""
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig

    batch = load_config(TrainConfig, path).batch
    per_step = batch.micro_batch * workers
    if batch.global_batch % per_step:
        raise SystemExit(f"global_batch {batch.global_batch} is not a multiple of micro_batch "
                         f"{batch.micro_batch} x {workers} workers")
    return load_config(TrainConfig, path, [
        f"run.root={work / 'train'}", f"run.name={name}",
        f"run.mlflow_tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"data.dataset_root={dataset_root}", f"encoders.text_encoder.path={text_dir}",
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus_per_worker}",
        f"batch.grad_accum={batch.global_batch // per_step}",
        f"optim.max_steps={steps}", f"checkpoint.every_steps={steps}",
        "checkpoint.export=false", "logging.sample_every=0", f"logging.log_every={log_every}",
        *extra])


# ----------------------------------------------------------------------------- baseline
class PlainEngine:
    """The part of a DeepSpeed engine that ``loop.train_step`` and ``loop.engine_fn`` use,
    over a bare module and ``torch.optim.AdamW`` (no ZeRO, no collectives).

    DeepSpeed's semantics, so the baseline does the same arithmetic: ``backward`` scales the
    loss by 1/grad_accum; ``step`` after every micro batch updates only at the accumulation
    boundary (clip the global grad norm, AdamW, the loop's warm-up schedule, zero the grads).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig,
                 dtype: torch.dtype | None = None) -> None:
        import torch

        from ttm_ray.training.deepspeed_config import warmup_factor

        self.module = model.to(dtype) if dtype is not None else model
        o = cfg.optim
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_factor(o.warmup_steps))
        self.grad_accum, self.grad_clip = cfg.batch.grad_accum, o.grad_clip
        self.global_rank, self._micro = 0, 0

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)

    def bfloat16_enabled(self) -> bool:
        import torch

        return self.params[0].dtype == torch.bfloat16

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        import torch

        self._micro += 1
        if self._micro % self.grad_accum:
            return
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


def make_tracker(cfg: TrainConfig, model: torch.nn.Module, storage: Path, version: str) -> Any:
    """The loop's Tracker on an MLflow run of its own (driver-side ``resolve_run``): its
    ``tick``/``throughput`` time the baseline exactly as the workers time themselves."""
    from ttm_ray.training.mlflow_logging import Tracker, model_cost, resolve_run

    tokens, flops = model_cost(cfg, model)
    run_id = resolve_run(cfg, str(storage / cfg.run.name), version)
    return Tracker(cfg, run_id, log_params=True, tokens_per_sample=tokens,
                   flops_per_sample=flops)


def end_tracker(tracker: Any, step: int, metrics: dict[str, float]) -> None:
    tracker.log(step, metrics)
    tracker.end()
    os.environ.pop("MLFLOW_RUN_ID", None)  # Tracker set it for setup_mlflow; not for later runs


def deepspeed_engine(model: torch.nn.Module, cfg: TrainConfig) -> Any:
    """The worker loop's ``deepspeed.initialize`` (same config and schedule), in this process
    as rank 0 of a 1-process gloo group: DeepSpeed's per-step cost without Ray's."""
    import socket

    import deepspeed
    import torch

    from ttm_ray.training.deepspeed_config import deepspeed_config, warmup_factor

    if not torch.distributed.is_initialized():
        with socket.socket() as sock:  # a free port for the 1-process rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_factor(cfg.optim.warmup_steps)))
    return engine


def run_local(cfg: TrainConfig, work: Path, warmup: int, steps: int,
              engine_kind: str = "plain") -> dict[str, Any]:
    """``warmup`` + ``steps`` optimizer steps of the loop's ``train_step`` in this process
    (world size 1, one torch thread), the last ``steps`` timed. ``engine_kind``: ``plain``
    (:class:`PlainEngine`, the baseline) or ``deepspeed`` (:func:`deepspeed_engine`)."""
    import torch

    from ttm_ray.dataset.versions import open_version
    from ttm_ray.models import build_model
    from ttm_ray.training.checkpoint import TrainState, rank_seed, seed_everything
    from ttm_ray.training.data import TrainingData, build_sampler
    from ttm_ray.training.loop import engine_fn, train_step

    if cfg.deepspeed.bf16:
        raise SystemExit("the CPU baseline trains in fp32: use a config with deepspeed.bf16: "
                         "false (the *_tiny.yaml ones)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each Ray worker (OMP_NUM_THREADS=1)
    try:
        version = open_version(cfg.data.dataset_root, cfg.data.version).name
        # The same construction as train_worker, minus Ray (and DeepSpeed for plain).
        seed_everything(cfg.run.seed)
        model = build_model(cfg.model)
        engine = (PlainEngine(model, cfg) if engine_kind == "plain"
                  else deepspeed_engine(model, cfg))
        encoders = cfg.encoders.build("cpu")
        data = TrainingData(dataclasses.replace(cfg.data, version=version), cfg.model.stage,
                            cfg.model, encoders, "cpu")
        sampler = build_sampler(cfg.data, data, 1, 0, cfg.batch.micro_batch,
                                cfg.batch.grad_accum)
        objective = cfg.diffusion.build()
        guidance = cfg.diffusion.guidance.build(*encoders.null_text(1))
        state = TrainState.fresh(cfg.run.seed, 0)
        seed_everything(rank_seed(cfg.run.seed, 0))
        model_fn = engine_fn(engine)
        tracker = make_tracker(cfg, model, work / "local", version)
        loss = torch.zeros(())
        for i in range(warmup + steps):
            if i == warmup:
                tracker.throughput()  # restart its clock: the timed steps begin here
            loss = train_step(engine, model_fn, data, sampler, objective, guidance, state)
            state.step += 1
            state.position = sampler.advance(state.position)
            tracker.tick()
        metrics = {"loss": float(loss), **tracker.throughput()}
        end_tracker(tracker, state.step, metrics)
        data.close()
    finally:
        torch.set_num_threads(threads)
    return {"step_time_s": metrics["step_time_s"], "loss": metrics["loss"],
            "rows": data.num_rows}


# ----------------------------------------------------------------------------- Ray path
def steady_step_time(history: list[tuple[int, float]], warmup: int) -> tuple[float, int]:
    """``(mean step time, steps)`` over the logged intervals after ``warmup``.

    Each logged ``step_time_s`` is the mean over the steps since the previous log (the
    Tracker's throughput window), so intervals are weighted by their length.
    """
    seconds, count, prev = 0.0, 0, 0
    for step, value in sorted(history):
        if prev >= warmup:
            seconds += value * (step - prev)
            count += step - prev
        prev = step
    if not count:
        raise RuntimeError(f"no step_time_s logged after step {warmup}: {history}")
    return seconds / count, count


def run_ray(cfg: TrainConfig, warmup: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from ttm_ray.training.trainer import train

    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    client = MlflowClient(tracking_uri=cfg.run.resolved_mlflow_uri())
    history = [(m.step, m.value)
               for m in client.get_metric_history(summary["mlflow_run_id"], "step_time_s")]
    step_time, timed = steady_step_time(history, warmup)
    total_steps = cfg.optim.max_steps
    first = min(history)[1] if history else float("nan")
    return {"step_time_s": step_time, "timed_steps": timed, "wall_s": wall,
            "startup_s": wall - total_steps * step_time, "first_interval_step_time_s": first,
            "interval_step_times_s": [round(v, 4) for _, v in sorted(history)],
            "loss": summary["metrics"].get("loss"), "mlflow_run_id": summary["mlflow_run_id"]}


# ----------------------------------------------------------------------------- GPU
def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def gpu_case(base: TrainConfig, work: Path, label: str, size: str, overrides: dict[str, Any],
             checkpointing: bool, warmup: int, steps: int, peak: float | None,
             device: str = "cuda") -> dict[str, Any]:
    """bf16 training steps of one model at the paper's latent grid, batch 1, on the GPU.

    (``device="cpu"`` runs the same code slowly, to check it on a machine without a GPU.)
    """
    import torch

    from ttm_ray.models import build_model
    from ttm_ray.models.flops import random_example_inputs
    from ttm_ray.training.loop import engine_fn

    model_cfg = dataclasses.replace(base.model, size=size, overrides=overrides,
                                    activation_checkpointing=checkpointing, init_from=None)
    model_cfg.validate()
    slug = re.sub(r"[^0-9A-Za-z]+", "-", label).strip("-")
    cfg = dataclasses.replace(
        base, model=model_cfg,
        run=dataclasses.replace(base.run, name=f"gpu-{slug}", root=str(work / "gpu"),
                                mlflow_tracking_uri=f"sqlite:///{work / 'mlflow.db'}"),
        batch=dataclasses.replace(base.batch, global_batch=1, micro_batch=1, grad_accum=1),
        scaling=dataclasses.replace(base.scaling, num_workers=1),
        logging=dataclasses.replace(base.logging, peak_tflops_per_worker=peak))
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync() -> None:  # CUDA runs asynchronously: time whole steps, not their launches
        if cuda:
            torch.cuda.synchronize()

    gc.collect()  # the previous case's model and optimizer state went with its frame
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # Tracker's peak_mem_gb is then this case's
    try:
        torch.manual_seed(0)
        engine = PlainEngine(build_model(cfg.model, device=dev), cfg, dtype=torch.bfloat16)
        params = sum(p.numel() for p in engine.params)
        gen = torch.Generator(device="cpu").manual_seed(0)
        x_data, cond = random_example_inputs(cfg.model, engine.module, gen, device=dev)
        objective = cfg.diffusion.build()
        model_fn = engine_fn(engine)
        tracker = make_tracker(cfg, engine.module, work / "gpu", "synthetic")

        def step() -> None:
            engine.backward(objective.loss(model_fn, x_data, cond, gen))
            engine.step()

        for _ in range(warmup):
            step()
        sync()
        tracker.throughput()
        for _ in range(steps):
            step()
            tracker.tick()
        sync()
        metrics = tracker.throughput()
        end_tracker(tracker, warmup + steps, metrics)
        return {"label": label, "params": params, "checkpointing": checkpointing,
                "tokens": tracker.tokens_per_sample, "fwd_flops": tracker.flops_per_sample,
                "samples_per_s": metrics["samples_per_s"], "step_time_s": metrics["step_time_s"],
                "tflops_per_s": 3 * tracker.flops_per_sample * metrics["samples_per_s"] / 1e12,
                "mfu": metrics["mfu"], "peak_mem_gb": metrics["peak_mem_gb"]}
    except torch.cuda.OutOfMemoryError as exc:
        return {"label": label, "checkpointing": checkpointing,
                "skipped": f"does not fit: {str(exc).splitlines()[0][:120]}"}


def run_gpu(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device here (torch.cuda.is_available() is False): the GPU "
                           "section runs only on a GPU machine"}
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig

    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops)
    base = load_config(TrainConfig, args.gpu_config)
    cases = [gpu_case(base, work, *case, warmup=args.gpu_warmup, steps=args.gpu_steps,
                      peak=peak) for case in GPU_CASES]
    return {"device": name, "peak_tflops": peak, "config": rel(args.gpu_config),
            "grid": [base.model.latent_channels, base.model.num_frames, base.model.height,
                     base.model.width], "stage": base.model.stage, "cases": cases}


# ----------------------------------------------------------------------------- report
def rel(path: Path | str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def machine_info() -> dict[str, Any]:
    import deepspeed
    import mlflow
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) / 2**20 for line in
                Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0.0)
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "deepspeed": deepspeed.__version__,
            "mlflow": mlflow.__version__, "commit": commit + (" + working tree" if dirty else "")}


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: the baseline, then each Ray run, with ratios against the baseline mean."""
    gb = res["global_batch"]
    base = res["baseline"]["step_time_s"]
    zero = f"DeepSpeed ZeRO-{res['zero_stage']}"
    out = [{"path": "plain PyTorch loop (baseline)", "workers": 1, "step_time_s": base,
            "startup_s": None}]
    if "deepspeed" in res["local"]:
        out.append({"path": f"{zero}, in this process (no Ray)", "workers": 1,
                    "step_time_s": res["local"]["deepspeed"]["step_time_s"],
                    "startup_s": None})
    out += [{"path": f"Ray Train + {zero}", "workers": w,
             "step_time_s": r["step_time_s"], "startup_s": r["startup_s"]}
            for w, r in res["ray"].items()]
    for r in out:
        r["steps_per_s"] = 1 / r["step_time_s"]
        r["samples_per_s"] = gb / r["step_time_s"]
        r["ratio"] = base / r["step_time_s"]
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = ["| path | workers | grad accum | steps/s | samples/s | ratio vs baseline | "
             "start-up s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows(res):
        accum = res["global_batch"] // (res["micro_batch"] * r["workers"])
        start = "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
        lines.append(f"| {r['path']} | {r['workers']} | {accum} | {r['steps_per_s']:.2f} | "
                     f"{r['samples_per_s']:.2f} | {r['ratio']:.2f} | {start} |")
    return "\n".join(lines)


def format_gpu(gpu: dict[str, Any]) -> str:
    if "skipped" in gpu:
        return f"GPU section skipped: {gpu['skipped']}"
    lines = [f"GPU: {gpu['device']}, peak {gpu['peak_tflops']} TFLOP/s bf16 dense, "
             f"{gpu['config']} model grid {gpu['grid']} (C, T, H, W), stage {gpu['stage']}, "
             "batch 1, bf16 weights + AdamW", "",
             "| model | params | act. ckpt | samples/s | TFLOP/s (3x fwd) | MFU | peak GiB |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for c in gpu["cases"]:
        if "skipped" in c:
            lines.append(f"| {c['label']} | - | {c['checkpointing']} | {c['skipped']} | | | |")
            continue
        mfu = "n/a" if c["mfu"] < 0 else f"{c['mfu']:.1%}"
        lines.append(f"| {c['label']} | {c['params'] / 1e6:,.1f}M | {c['checkpointing']} | "
                     f"{c['samples_per_s']:.3f} | {c['tflops_per_s']:.1f} | {mfu} | "
                     f"{c['peak_mem_gb']:.1f} |")
    return "\n".join(lines)


def format_report(res: dict[str, Any]) -> str:
    m = res["machine"]
    if "baseline" not in res:  # --gpu-only
        return "\n".join([f"machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu']}", "",
                          format_gpu(res["gpu"])])
    ray_lines = [f"  ray {w} worker(s): wall {r['wall_s']:.1f}s, first interval "
                 f"{r['first_interval_step_time_s']:.3f} s/step, logged step times "
                 f"{r['interval_step_times_s']}, final loss {r['loss']}"
                 for w, r in res["ray"].items()]
    return "\n".join([
        f"train_overhead: {res['config']} ({res['model']}), {res['rows']} rows, global batch "
        f"{res['global_batch']}, micro batch {res['micro_batch']}, {res['warmup']} warm-up + "
        f"{res['steps']} timed steps, log every {res['log_every']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; load avg start/end "
        f"{res['load_avg_start']}/{res['load_avg_end']}; ray.init {res['ray_init_s']:.1f}s "
        "(not counted)",
        "in-process runs: 1 torch thread (each Ray worker has 1: OMP_NUM_THREADS=1); step "
        "time before/after the Ray runs (the mean counts): " + "; ".join(
            f"{LOCAL_LABEL[k]} {v['runs_s'][0]:.4f}/{v['runs_s'][-1]:.4f} s"
            for k, v in res["local"].items()),
        *ray_lines, "", format_table(res), "", format_gpu(res["gpu"])])


def summary_json(res: dict[str, Any]) -> dict[str, Any]:
    if "baseline" not in res:  # --gpu-only
        return {"benchmark": "train_overhead", "gpu": res["gpu"]}
    return {"benchmark": "train_overhead", "config": res["config"],
            "global_batch": res["global_batch"], "warmup": res["warmup"],
            "steps": res["steps"], "load_avg_start": res["load_avg_start"],
            "load_avg_end": res["load_avg_end"],
            "baseline_step_time_s": round(res["baseline"]["step_time_s"], 5),
            "local_runs_s": {k: [round(x, 5) for x in v["runs_s"]]
                             for k, v in res["local"].items()},
            "ray": {str(w): {"step_time_s": round(r["step_time_s"], 5),
                             "ratio_vs_baseline": round(res["baseline"]["step_time_s"]
                                                        / r["step_time_s"], 3),
                             "startup_s": round(r["startup_s"], 1),
                             "wall_s": round(r["wall_s"], 1)}
                    for w, r in res["ray"].items()},
            "gpu": res["gpu"]}


def write_markdown(path: Path, res: dict[str, Any], command: str) -> None:
    """The generated section of ``path`` (:func:`results_file.write_section`)."""
    m = res["machine"]
    lines = [
        f"Generated by `{command}` on {m['date']}.",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB RAM, GPU: "
        f"{m['gpu'] or 'none'}; load average start/end {res['load_avg_start']} / "
        f"{res['load_avg_end']}",
        f"- versions: Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, DeepSpeed "
        f"{m['deepspeed']}, MLflow {m['mlflow']}; commit {m['commit']}",
    ]
    if "baseline" in res:  # not --gpu-only
        lines += [
            f"- run: `{res['config']}` ({res['model']}), {res['rows']} dataset rows, global "
            f"batch {res['global_batch']} (micro batch {res['micro_batch']}), {res['warmup']} "
            f"warm-up + {res['steps']} timed steps, MLflow metrics every {res['log_every']} "
            "steps; in-process runs on 1 torch thread (like each Ray worker), step time before "
            "/ after the Ray runs (the mean counts): " + "; ".join(
                f"{LOCAL_LABEL[k]} {v['runs_s'][0]:.4f} / {v['runs_s'][-1]:.4f} s"
                for k, v in res["local"].items())
            + f"; `ray.init` {res['ray_init_s']:.1f} s, not counted",
            "", format_table(res), "",
            *[f"- Ray, {w} worker(s): `train()` wall {r['wall_s']:.1f} s; logged "
              f"`step_time_s` per interval {r['interval_step_times_s']} (the first holds the "
              "warm-up)" for w, r in res["ray"].items()],
        ]
    lines += ["", format_gpu(res["gpu"])]
    write_section(path, "train_overhead", "\n".join(lines), (
        "# train_overhead\n\n`benchmarks/train_overhead.py`: see its docstring. The section "
        "between the markers is rewritten by every run; notes outside it are kept.\n\n"))


# ----------------------------------------------------------------------------- main
def run_cpu(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The CPU comparison: in-process runs before and after the Ray runs."""
    import ray

    from data_prep.tiny_models import build_tiny_clip
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig

    base_cfg = load_config(TrainConfig, args.config)
    start = time.perf_counter()
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    ray_init = time.perf_counter() - start
    if args.dataset_root:
        dataset_root = Path(args.dataset_root).resolve()
    else:
        log(f"[bench] building the tiny dataset in {work}")
        dataset_root = build_dataset(work / "data", build_tiny_clip(work / "tiny-clip"))
    text_dir = text_encoder_dir(base_cfg, work)
    total = args.warmup + args.steps
    stamp = time.strftime("%Y%m%d-%H%M%S")  # a fresh run name: never resume an earlier run

    def config(name: str, workers: int) -> TrainConfig:
        return run_config(args.config, work, dataset_root, text_dir, f"{name}-{stamp}",
                          workers, total, args.log_every, args.cpus_per_worker, args.set)

    res: dict[str, Any] = {"config": rel(args.config), "warmup": args.warmup,
                           "steps": args.steps, "log_every": args.log_every,
                           "global_batch": base_cfg.batch.global_batch,
                           "micro_batch": base_cfg.batch.micro_batch,
                           "model": f"{base_cfg.model.size} stage {base_cfg.model.stage}",
                           "zero_stage": base_cfg.deepspeed.zero_stage, "ray_init_s": ray_init,
                           "ray": {}}
    # In-process runs bracket the Ray runs (before and after, the mean counts): a shared
    # machine's load drifts over minutes, and this way it drifts across both sides alike.
    kinds = ["plain"] + ([] if args.no_local_deepspeed else ["deepspeed"])
    local: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}

    def local_round(tag: str) -> None:
        for kind in kinds:
            log(f"[bench] {LOCAL_LABEL[kind]} ({tag})")
            local[kind].append(run_local(config(f"{kind}-{tag}", 1), work, args.warmup,
                                         args.steps, engine_kind=kind))

    local_round("before")
    for workers in args.workers:
        log(f"[bench] Ray Train + DeepSpeed, {workers} worker(s)")
        res["ray"][workers] = run_ray(config(f"ray-w{workers}", workers), args.warmup)
    local_round("after")
    res["local"] = {k: {"runs_s": [r["step_time_s"] for r in v],
                        "step_time_s": sum(r["step_time_s"] for r in v) / len(v)}
                    for k, v in local.items()}
    res["baseline"] = res["local"]["plain"]
    res["rows"] = local["plain"][0]["rows"]
    ray.shutdown()
    import torch.distributed as dist

    if dist.is_initialized():  # the in-process DeepSpeed run's 1-process group
        dist.destroy_process_group()
    return res


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    load_start = [round(x, 2) for x in os.getloadavg()]
    res = {} if args.gpu_only else run_cpu(args, work)
    res["gpu"] = (run_gpu(args, work) if args.gpu or args.gpu_only
                  else {"skipped": "not requested (--gpu)"})
    res["load_avg_start"] = load_start
    res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["machine"] = machine_info()
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="train config (a CPU *_tiny.yaml: fp32, pixel autoencoder)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=5,
                        help="the Ray runs' logging.log_every (MLflow metrics every N steps)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help="scaling.cpus_per_worker (Ray gives the workers 1 torch thread "
                             "either way)")
    parser.add_argument("--no-local-deepspeed", action="store_true",
                        help="skip the in-process DeepSpeed row (DeepSpeed's cost without Ray)")
    parser.add_argument("--dataset-root", default=None,
                        help="an existing dataset root (with latest) instead of building one")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep everything here (default: a temp dir, deleted)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train-config override for every run (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown results file (default: benchmarks/results/"
                             "train_overhead_cpu.md, _gpu.md with --gpu); '-' for none")
    parser.add_argument("--gpu", action="store_true",
                        help="also the GPU section (CUDA only; skipped with a message elsewhere)")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the GPU section (no CPU comparison, no Ray)")
    parser.add_argument("--gpu-config", type=Path, default=GPU_CONFIG,
                        help="paper config whose model grid the GPU section uses")
    parser.add_argument("--gpu-steps", type=int, default=10)
    parser.add_argument("--gpu-warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU bf16 dense peak for MFU (default: by device name)")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.warmup % args.log_every:
        parser.error("--warmup and --steps must be >= 1, --warmup a multiple of --log-every")
    args.config = args.config.resolve()
    gpu = args.gpu or args.gpu_only
    out = args.out or RESULTS / f"train_overhead_{'gpu' if gpu else 'cpu'}.md"
    python = Path(sys.executable)  # not resolved: a venv's python is a link out of the repo
    python_name = (str(python.relative_to(REPO)) if python.is_relative_to(REPO)
                   else python.name)
    command = " ".join([python_name, rel(__file__),
                        *(argv if argv is not None else sys.argv[1:])])
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        res = run(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="train_overhead_") as tmp:
            res = run(args, Path(tmp))
    print(format_report(res))
    print(json.dumps(summary_json(res)))
    if str(out) != "-":
        write_markdown(Path(out), res, command)
        log(f"[bench] wrote {rel(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
