"""bf16 training steps of a dit-4b-wide, depth-reduced DiT under DeepSpeed ZeRO-2 with activation
checkpointing on one GPU: TFLOP/s and MFU against this GPU's measured bf16 matmul peak.

    python benchmarks/gpu/dit_mfu.py [--depth 4] [--stage 1|2] [--warmup 3] [--steps 8]
        [--no-checkpointing] [--peak-tflops X] [--cpu-smoke]

First the peak: the best TFLOP/s of large bf16 matmuls (8192^3 and 16384^3, after warm-up) on
this device; that measured number, not the datasheet's, is the MFU denominator (the datasheet
figure is printed beside it where the device name is known).

Then the training path of a worker, in this process as rank 0 of a 1-process group
(``torch.distributed`` through ``deepspeed.init_distributed``, nccl, rendezvous from env vars):
the train config (``jobs/configs/train/dit_stage1.yaml``, or ``dit_stage2.yaml`` with
``--stage 2``) with its model's ``overrides.depth`` set to ``--depth``, ``init_from`` off,
batch 1 x 1 x 1 worker, ``optim.torch_adam`` (no FusedAdam JIT build) ->
``ttm_ray.models.build_model`` -> ``deepspeed.initialize`` with the config of
``ttm_ray.training.deepspeed_config.deepspeed_config`` (ZeRO-2, bf16) -> the config's
objective (flow matching) through the loop's ``engine_fn``, on ``flops.example_inputs``-shaped
random inputs at the config's latent grid (16 x 32 x 32 -> 4,096 tokens).

FLOPs: ``ttm_ray.models.flops.forward_flop_report`` (the analytic DiT count). MFU uses the
model FLOPs, 3x forward per sample (the recomputed forward of activation checkpointing is not
useful work); HFU counts it (4x). ``--cpu-smoke``: dit-tiny, 2 blocks, a 4 x 8 x 8 latent,
fp32, gloo, the CPU accelerator of DeepSpeed: checks this script, not the GPU.
Output: a table, then one JSON line (``{"check": "dit_mfu", ...}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, device_name, finish, missing_module, skip, synchronize, table

CHECK = "dit_mfu"
#: Dense bf16 datasheet TFLOP/s by device-name fragment (SXM parts), printed for comparison
#: only: MFU divides by the measured matmul peak.
DATASHEET_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def matmul_peak(device: Any, dtype: Any, sizes: tuple[int, ...], seconds: float = 0.5) -> dict:
    """The best TFLOP/s of square ``dtype`` matmuls of ``sizes`` (each timed for about
    ``seconds`` after a warm-up)."""
    import torch

    best: dict[str, Any] = {"tflops": 0.0}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b)
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        reps = max(2, int(seconds / max(time.perf_counter() - start, 1e-6)))
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        synchronize(device)
        tflops = 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12
        if tflops > best["tflops"]:
            best = {"tflops": tflops, "n": n, "reps": reps}
        del a, b
    return best


def init_single_process_group(backend: str) -> None:
    """Rank 0 of a world of 1, rendezvous through env vars on a free local port."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def train_config(args: argparse.Namespace, cuda: bool) -> Any:
    """The run's TrainConfig reduced to this check (one worker, batch 1, depth ``--depth``)."""
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig

    base = load_config(TrainConfig, args.config or REPO / "jobs" / "configs" / "train" /
                       f"dit_stage{args.stage}.yaml")
    model = base.model
    overrides = {**model.overrides, "depth": args.depth}
    grid: dict[str, Any] = {}
    if args.cpu_smoke:
        grid = {"size": "dit-tiny", "num_frames": 4, "height": 8, "width": 8}
        overrides = {"depth": args.depth}
    masked = model.masked_attention_blocks
    model = dataclasses.replace(
        model, overrides=overrides, init_from=None, **grid,
        activation_checkpointing=not args.no_checkpointing,
        masked_attention_blocks=None if masked is None else min(masked, args.depth))
    if model.stage == 2 and model.masked_attention_blocks is None:
        model = dataclasses.replace(model, masked_attention_blocks=args.depth)
    model.validate()
    return dataclasses.replace(
        base, model=model,
        batch=dataclasses.replace(base.batch, global_batch=1, micro_batch=1, grad_accum=1),
        scaling=dataclasses.replace(base.scaling, num_workers=1, use_gpu=cuda),
        optim=dataclasses.replace(base.optim, torch_adam=True),
        deepspeed=dataclasses.replace(base.deepspeed, zero_stage=2, bf16=cuda,
                                      offload_optimizer="none"))


def run_steps(cfg: Any, device: Any, warmup: int, steps: int) -> dict[str, Any]:
    """Build, ``deepspeed.initialize``, then ``warmup`` + ``steps`` timed optimizer steps."""
    import deepspeed
    import torch

    from ttm_ray.models import build_model
    from ttm_ray.models.flops import random_example_inputs
    from ttm_ray.training.deepspeed_config import deepspeed_config, warmup_factor
    from ttm_ray.training.loop import engine_fn

    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(cfg.model, device=device)
    params = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, warmup_factor(cfg.optim.warmup_steps)))
    setup_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    x_data, cond = random_example_inputs(cfg.model, engine.module, gen, device=device)
    objective = cfg.diffusion.build()
    model_fn = engine_fn(engine)
    losses: list[float] = []

    def step() -> None:
        loss = objective.loss(model_fn, x_data, cond, gen)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))  # a sync per step, as the loop's logging does

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    step_s = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return {"params": params, "setup_s": setup_s,
            "warmup_s": first_s, "step_time_s": step_s, "losses": losses,
            "peak_mem_gib": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Details: the module docstring of this file.")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default 4; 2 smoke)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1,
                        help="2: the masked layers too (backend auto = flex on CUDA)")
    parser.add_argument("--config", default=None, help="train config (default dit_stage<N>)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="without activation checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator instead of the measured matmul peak")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="dit-tiny on the CPU, fp32, gloo: checks this script")
    args = parser.parse_args(argv)
    args.depth = args.depth or (2 if args.cpu_smoke else 4)
    if args.cpu_smoke:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    # Before deepspeed is imported: the Makefile/test env exports DS_ACCELERATOR=cpu.
    os.environ["DS_ACCELERATOR"] = "cpu" if args.cpu_smoke else "cuda"
    why = missing_module("torch", "deepspeed", "ttm_ray.models", "ttm_ray.training.loop")
    if why:
        return skip(CHECK, why)
    import torch

    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        return skip(CHECK, "no CUDA device (torch.cuda.is_available() is False); "
                           "--cpu-smoke runs the tiny CPU version")
    device = torch.device("cuda" if cuda else "cpu")
    name = device_name(device)
    peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32,
                       (8192, 16384) if cuda else (256,), seconds=0.5 if cuda else 0.1)
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
    denominator = args.peak_tflops or peak["tflops"]
    print(f"{name}: measured {'bf16' if cuda else 'fp32'} matmul peak "
          f"{peak['tflops']:.1f} TFLOP/s (n={peak['n']}); datasheet {datasheet}", flush=True)

    from ttm_ray.models.flops import forward_flop_report

    cfg = train_config(args, cuda)
    init_single_process_group("nccl" if cuda else "gloo")
    try:
        res = run_steps(cfg, device, args.warmup, args.steps)
    except Exception as exc:
        return finish(CHECK, False, f"training steps failed: {type(exc).__name__}: "
                                    f"{str(exc)[:300]}", device=name, matmul_peak=peak,
                      error=f"{type(exc).__name__}: {exc}"[:2000])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    report = forward_flop_report(cfg.model)
    fwd = report.total  # per sample; batch 1
    ckpt = cfg.model.activation_checkpointing
    model_tflops = 3 * fwd / res["step_time_s"] / 1e12
    hw_tflops = report.training_per_sample(ckpt) / res["step_time_s"] / 1e12
    mfu, hfu = model_tflops / denominator, hw_tflops / denominator
    finite = all(math.isfinite(v) for v in res["losses"])
    print(table(
        ["model", "params", "tokens", "act. ckpt", "ZeRO", "dtype", "step s", "model TFLOP/s",
         "MFU", "HFU", "peak GiB"],
        [[f"{cfg.model.size} x {args.depth} blocks, stage {cfg.model.stage}",
          f"{res['params'] / 1e6:.0f}M", report.tokens, "yes" if ckpt else "no",
          cfg.deepspeed.zero_stage, "bf16" if cfg.deepspeed.bf16 else "fp32",
          f"{res['step_time_s']:.3f}", f"{model_tflops:.1f}", f"{mfu:.1%}", f"{hfu:.1%}",
          "n/a" if res["peak_mem_gib"] is None else f"{res['peak_mem_gib']:.1f}"]]))
    print(f"MFU denominator: {denominator:.1f} TFLOP/s "
          f"({'--peak-tflops' if args.peak_tflops else 'measured matmul peak'}); forward "
          f"{fwd / 1e12:.2f} TFLOP/sample; setup {res['setup_s']:.1f} s, warm-up "
          f"{res['warmup_s']:.1f} s; losses {[round(v, 4) for v in res['losses']]}")
    summary = (f"{cfg.model.size} x {args.depth} blocks, {report.tokens} tokens, ZeRO-2 "
               f"{'bf16' if cuda else 'fp32'}: {res['step_time_s']:.3f} s/step, "
               f"{model_tflops:.1f} TFLOP/s, MFU {mfu:.1%} of measured peak "
               f"{denominator:.3g} TFLOP/s" + ("" if finite else "; NON-FINITE LOSS"))
    return finish(CHECK, finite, summary, device=name, matmul_peak=peak,
                  datasheet_tflops=datasheet, denominator_tflops=denominator,
                  size=cfg.model.size, depth=args.depth, stage=cfg.model.stage,
                  tokens=report.tokens, forward_flops=fwd, activation_checkpointing=ckpt,
                  step_time_s=res["step_time_s"], model_tflops=model_tflops,
                  mfu=mfu, hfu=hfu, params=res["params"], peak_mem_gib=res["peak_mem_gib"],
                  setup_s=res["setup_s"], losses=res["losses"])


if __name__ == "__main__":
    sys.exit(main())
