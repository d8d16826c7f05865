"""Training data: the encoded-latent cache against on-the-fly encoding, plus the shard reader.

    .venv/bin/python benchmarks/train_data.py [--steps N] [--warmup W] [--batch B]
        [--reader-rows R] [--reader-samples S] [--out benchmarks/results/train_data_cpu.md]

Three numbers, one run:

* **encoded_step_ratio**: step time (data + forward + backward + AdamW step: the training
  step of ``ttm_ray.training.loop.train_step`` minus DeepSpeed) reading the encoded version
  (``data.encoded``: :class:`~ttm_ray.training.encoded_data.EncodedTrainingData`) over the
  same step encoding on the fly (:class:`~ttm_ray.training.data.TrainingData`: decode the
  embedded mp4, render the trajectory, run the frozen VAE and text encoder), same model
  (weights reset before each timed run), same clips (matched by clip_id), same seed, in this
  process, one torch thread (as a Ray worker). Setup: the training tests' tiny dataset (built
  with the quickstart prep config), dit-tiny stage 2 on the latent grid of the tiny SD-shaped
  image VAE (4 x 8 x 8 x 8 -> 8 frames of 64 x 64 px) and the tiny T5 of the tests: the
  encoders' share of a tiny step is of the same order as at paper scale (see the FLOPs
  below). On-the-fly decoding runs inside the step (``data.prefetch: 0``): on a loaded 2-core
  box the prefetch threads would compete for the same cores anyway. Runs alternate
  (fly, cached, fly, cached) and each side's mean counts, so a drifting machine load hits
  both.
* **reader_speedup**: ``measure_reader()`` of the sibling ``train_data_reader.py`` (the shard
  layout and row-group cache of training's reader).
* **encoder FLOPs removed per step at paper scale**, for each of the four paper runs
  (``jobs/configs/train/{unet,dit}_stage{1,2}.yaml``): the frozen encoders' forward FLOPs
  per sample (:func:`ttm_ray.training.plan.encoder_flops`: ``FlopCounterMode`` on the meta
  device, the paper's encoder architectures) x samples per GPU step, beside the denoiser's
  training FLOPs of the same step (:mod:`ttm_ray.models.flops`, as ``ttm-ray plan train``).

Last stdout line: JSON with ``encoded_step_ratio`` and ``reader_speedup``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmarks


def tiny_setup(work: Path) -> dict[str, Any]:
    """Dataset (tiny prep), tiny encoders, the model config and the encoded version."""
    from train_overhead import build_dataset

    from data_prep.tiny_models import build_tiny_clip
    from ttm_ray.conditioning.autoencoders import AutoencoderConfig
    from ttm_ray.conditioning.encoders import EncodersConfig
    from ttm_ray.conditioning.text_encoders import TextEncoderConfig
    from ttm_ray.conditioning.tiny import build_tiny_image_vae, build_tiny_t5
    from ttm_ray.config import RunConfig
    from ttm_ray.encoding.config import EncodeConfig, EncodeOutputConfig
    from ttm_ray.encoding.job import run_encode
    from ttm_ray.models import ModelConfig
    from ttm_ray.training.data import TrainDataConfig

    dataset = build_dataset(work / "data", build_tiny_clip(work / "tiny-clip"))
    encoders = EncodersConfig(
        AutoencoderConfig(kind="image_vae", path=str(build_tiny_image_vae(work / "vae"))),
        TextEncoderConfig(kind="t5", path=str(build_tiny_t5(work / "t5")), max_length=32))
    model = ModelConfig(family="dit", size="dit-tiny", stage=2, latent_channels=4,
                        num_frames=8, height=8, width=8)
    data = TrainDataConfig(dataset_root=str(dataset), prefetch=0)
    t0 = time.perf_counter()
    summary = run_encode(EncodeConfig(run=RunConfig(root=str(work), name="encode"),
                                      model=model, data=data, encoders=encoders,
                                      output=EncodeOutputConfig(rows_per_file=64)),
                         progress=False)
    return {"dataset": dataset, "encoders": encoders, "model": model, "data": data,
            "encoded": summary, "encode_s": time.perf_counter() - t0}


def timed_steps(data: Any, model: torch.nn.Module, batches: list[list[int]], null: Any,
                warmup: int) -> dict[str, float]:
    """Mean seconds per step (data, compute, total) after ``warmup`` steps."""
    from ttm_ray.diffusion import DiffusionConfig

    diffusion = DiffusionConfig(objective="flow_matching")
    objective, guidance = diffusion.build(), diffusion.guidance.build(*null)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    data_s, compute_s = [], []
    for i, indices in enumerate(batches):
        t0 = time.perf_counter()
        x, cond = data.batch(indices)
        t1 = time.perf_counter()
        cond = guidance.drop(cond, generator)
        loss = objective.loss(lambda xt, t, c: model(xt, t, c), x, cond, generator)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= warmup:
            data_s.append(t1 - t0)
            compute_s.append(t2 - t1)
    return {"data_s": statistics.mean(data_s), "compute_s": statistics.mean(compute_s),
            "step_s": statistics.mean(a + b for a, b in zip(data_s, compute_s, strict=True))}


def measure_steps(setup: dict[str, Any], steps: int, warmup: int, batch: int,
                  repeats: int = 2) -> dict[str, Any]:
    from ttm_ray.models import build_model
    from ttm_ray.training.data import TrainingData
    from ttm_ray.training.encoded_data import EncodedTrainingData

    torch.set_num_threads(1)
    fly = TrainingData(setup["data"], 2, setup["model"], setup["encoders"].build("cpu"), "cpu")
    cached = EncodedTrainingData(
        type(setup["data"])(encoded=setup["encoded"]["dataset_root"], prefetch=0), 2,
        setup["model"], "cpu")
    ids = cached._rows.clip_ids
    fly_index = {c: i for i, c in enumerate(fly._rows.clip_ids)}
    n = cached.num_rows
    plan = [[(s * batch + k) % n for k in range(batch)] for s in range(steps + warmup)]
    torch.manual_seed(0)
    model = build_model(setup["model"])
    initial = copy.deepcopy(model.state_dict())
    runs: dict[str, list[dict[str, float]]] = {"fly": [], "cached": []}
    for _ in range(repeats):
        for name, data, batches, null in (
                ("fly", fly, [[fly_index[ids[i]] for i in b] for b in plan],
                 fly.encoders.null_text(1)),
                ("cached", cached, plan, cached.null_text(1))):
            model.load_state_dict(initial)
            runs[name].append(timed_steps(data, model, batches, null, warmup))
    out = {name: {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
           for name, rs in runs.items()}
    out["encoded_step_ratio"] = round(out["cached"]["step_s"] / out["fly"]["step_s"], 3)
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def paper_flops() -> list[dict[str, Any]]:
    """Encoder FLOPs removed per GPU step for the four paper runs (plan's counters)."""
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig
    from ttm_ray.training.plan import encoder_flops, plan_training

    rows = []
    for name in ("unet_stage1", "unet_stage2", "dit_stage1", "dit_stage2"):
        cfg = load_config(TrainConfig, REPO / "jobs" / "configs" / "train" / f"{name}.yaml")
        plan = plan_training(cfg, measure_activations=False)
        enc = encoder_flops(cfg)
        per_step = cfg.batch.micro_batch * cfg.batch.grad_accum
        rows.append({
            "run": name, "samples_per_gpu_step": per_step,
            "encoder_tflop_per_step": round(enc.total * per_step / 1e12, 2),
            "autoencoder_tflop_per_step": round(enc.autoencoder * per_step / 1e12, 2),
            "text_tflop_per_step": round(enc.text * per_step / 1e12, 2),
            "denoiser_train_tflop_per_step": round(plan.flops_per_sample * per_step / 1e12, 1),
            "encoder_share_of_step": round(enc.total / (enc.total + plan.flops_per_sample), 3),
            "source": enc.source})
    return rows


def reader() -> Any:
    try:
        from train_data_reader import measure_reader
    except ImportError as exc:  # the sibling benchmark is not there
        return {"error": f"train_data_reader.measure_reader unavailable: {exc}"}
    return measure_reader


def format_report(res: dict[str, Any]) -> str:
    s = res["steps"]
    lines = [
        "| path | data s/step | compute s/step | step s | ratio to on the fly |",
        "|---|---|---|---|---|",
        f"| on the fly (decode + render + VAE + T5) | {s['fly']['data_s']:.4f} | "
        f"{s['fly']['compute_s']:.4f} | {s['fly']['step_s']:.4f} | 1.00 |",
        f"| encoded version (`data.encoded`) | {s['cached']['data_s']:.4f} | "
        f"{s['cached']['compute_s']:.4f} | {s['cached']['step_s']:.4f} | "
        f"**{s['encoded_step_ratio']:.3f}** |", "",
        "| paper run | samples / GPU step | encoder TFLOP removed / step (VAE + text) | "
        "denoiser training TFLOP / step | encoders' share of the on-the-fly step |",
        "|---|---|---|---|---|",
        *(f"| {r['run']} | {r['samples_per_gpu_step']} | {r['encoder_tflop_per_step']} "
          f"({r['autoencoder_tflop_per_step']} + {r['text_tflop_per_step']}) | "
          f"{r['denoiser_train_tflop_per_step']} | {r['encoder_share_of_step']:.1%} |"
          for r in res["paper_flops"]), ""]
    rd = res["reader"]
    if "reader_speedup" in rd:
        lines += [f"Reader (`train_data_reader.measure_reader`, {rd.get('rows')} rows, "
                  f"{rd.get('samples')} samples): old {rd['old_samples_per_s']} samples/s, "
                  f"new {rd['new_samples_per_s']} samples/s, speedup "
                  f"**{rd['reader_speedup']}**.", ""]
    else:
        lines += [f"Reader: {rd.get('error')}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reader-rows", type=int, default=50_000)
    parser.add_argument("--reader-samples", type=int, default=2_000)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)

    from ttm_ray.config import RunConfig
    from ttm_ray.runtime import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init_ray(RunConfig(num_cpus=2))
        setup = tiny_setup(work)
        steps = measure_steps(setup, args.steps, args.warmup, args.batch)
        measure = reader()
        rd = measure(rows=args.reader_rows, samples=args.reader_samples) \
            if callable(measure) else measure
    res = {"steps": steps, "paper_flops": paper_flops(), "reader": rd,
           "encode_s": round(setup["encode_s"], 1),
           "encoded_rows": setup["encoded"]["encoded"]}
    report = format_report(res)
    print(report)
    if args.out:
        command = " ".join([".venv/bin/python", "benchmarks/train_data.py",
                            *(argv or sys.argv[1:])])
        args.out.write_text(
            f"# Training data: encoded-latent cache and shard reader (CPU)\n\n`{command}`"
            f", {datetime.date.today()}, {torch.get_num_threads()} torch thread(s); "
            f"{res['encoded_rows']} clips encoded in {res['encode_s']} s (Ray Data, 1 CPU "
            "actor).\n\n" + report)
    print(json.dumps({"benchmark": "train_data",
                      "encoded_step_ratio": steps["encoded_step_ratio"],
                      "reader_speedup": rd.get("reader_speedup"),
                      "fly_step_s": round(steps["fly"]["step_s"], 4),
                      "cached_step_s": round(steps["cached"]["step_s"], 4),
                      "encoder_tflop_removed_per_step": {
                          r["run"]: r["encoder_tflop_per_step"] for r in res["paper_flops"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
