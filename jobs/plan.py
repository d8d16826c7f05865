"""``ttm-ray plan``: capacity plans, computed on any machine before a run is submitted.

    ttm-ray plan model --config jobs/configs/train/dit_stage2.yaml
    ttm-ray plan train --config jobs/configs/train/dit_stage2.yaml
    ttm-ray plan train --config jobs/configs/train/unet_stage1.yaml --gpu-memory-gib 40
    ttm-ray plan train --config ... --set batch.micro_batch=2 --set batch.global_batch=64
    ttm-ray plan train --config jobs/configs/train/dit_stage1_tiny.yaml --cpu \
        --set scaling.num_workers=1

``plan model`` prints the parameters by component and the forward FLOPs per sample of the
config's model. ``plan train`` prints per-GPU memory under ZeRO-2 and ZeRO-3 (with
DeepSpeed's own estimate beside it), step time and wall-clock at an assumed MFU, and the
gradient traffic per step against the interconnect with the part the compute cannot hide
(the overlap model is printed); it says when the configured ZeRO stage
does not fit (``--require-fit`` turns that into exit status 1). The last stdout line is the
JSON summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields, replace

from jobs.common import CONFIG_EPILOG, load_job_config, run_job, setup_logging

# Hardware flag -> Hardware field (None: keep the default / the config's value).
_HARDWARE_FLAGS = {
    "--gpu-name": ("name", str, "GPU name shown in the plan"),
    "--gpu-memory-gib": ("gpu_memory_gib", float, "memory per GPU (default 80)"),
    "--reserved-gib": ("reserved_gib", float, "kept back per GPU for context/NCCL/fragments "
                                              "(default 3)"),
    "--peak-tflops": ("peak_tflops", float, "dense bf16 peak per GPU (default: the config's "
                                            "logging.peak_tflops_per_worker, else 312)"),
    "--mfu": ("mfu", float, "assumed model FLOPs utilisation (default 0.4)"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node (default 8)"),
    "--intra-node-gbps": ("intra_node_gb_per_s", float, "GB/s per GPU inside a node "
                                                        "(default 300, NVLink)"),
    "--inter-node-gbps": ("inter_node_gb_per_s", float, "GB/s per GPU across nodes "
                                                        "(default 25, 200 Gb/s IB)"),
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="memory / time / communication plan of a train config",
                       description=__doc__, epilog=CONFIG_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="train config YAML (kind: train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    for flag, (_, kind, text) in _HARDWARE_FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--cpu", action="store_true",
                   help="plan for this machine's CPU as the device (peak measured by a matmul "
                        "benchmark in the run's dtype, memory = RAM, MFU 1.0 unless --mfu); "
                        "for a single-worker run, e.g. --set scaling.num_workers=1")
    p.add_argument("--skip-activations", action="store_true",
                   help="do not measure activations (faster; totals become a lower bound)")
    p.add_argument("--require-fit", action="store_true",
                   help="exit 1 when the configured ZeRO stage does not fit")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    def job() -> dict:
        from ttm_ray.training.config import TrainConfig
        from ttm_ray.training.plan import Hardware, plan_training

        cfg = load_job_config(TrainConfig, args)
        values = {field: getattr(args, flag[2:].replace("-", "_"))
                  for flag, (field, _, _) in _HARDWARE_FLAGS.items()}
        if args.cpu:
            base = Hardware.cpu(bf16=cfg.deepspeed.bf16)
        else:
            base = Hardware()
            if values["peak_tflops"] is None:
                values["peak_tflops"] = cfg.logging.peak_tflops_per_worker
        known = {f.name for f in fields(Hardware)}
        hardware = replace(base, **{k: v for k, v in values.items()
                                    if v is not None and k in known})
        plan = plan_training(cfg, hardware, measure_activations=not args.skip_activations)
        print(plan.format())
        if args.require_fit and not plan.memory[plan.configured_stage].fits:
            raise RuntimeError(plan.verdict())
        return plan.summary()

    return run_job(job, "plan-train")


def _add_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="parameters and forward FLOPs of a train config's model",
                       description="Parameters by component (counted on the meta device: "
                                   "nothing is allocated) and forward FLOPs per sample by "
                                   "component (closed form for the DiT, flop counter on "
                                   "meta for the U-Net) of the model: section of a train "
                                   "config.", epilog=CONFIG_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="train config YAML (kind: train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="text length assumed for the FLOPs (default: 256 DiT / 77 U-Net)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(run=_run_model)


def _run_model(args: argparse.Namespace) -> int:
    def job() -> dict:
        from ttm_ray.models import build_model, count_parameters
        from ttm_ray.models.flops import forward_flop_report
        from ttm_ray.training.config import TrainConfig

        cfg = load_job_config(TrainConfig, args).model
        params = count_parameters(build_model(cfg, device="meta"))
        flops = forward_flop_report(cfg, text_tokens=args.text_tokens)
        ckpt = cfg.activation_checkpointing
        print(f"model {cfg.family} {cfg.size} stage {cfg.stage}: latent "
              f"[{cfg.latent_channels}, {cfg.num_frames}, {cfg.height}, {cfg.width}], "
              f"{flops.tokens:,} tokens")
        print(f"\n{'parameters':<28}{'count':>18}{'share':>8}")
        for name, count in sorted(params.items(), key=lambda kv: -kv[1]):
            if name != "total":
                print(f"  {name:<26}{count:>18,}{count / params['total']:>8.1%}")
        print(f"  {'total':<26}{params['total']:>18,}")
        print(f"\n{'forward FLOPs / sample':<28}{'FLOPs':>18}{'share':>8}   ({flops.method})")
        for name, value in sorted(flops.by_component.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<26}{value:>18.4g}{value / flops.total:>8.1%}")
        print(f"  {'total':<26}{flops.total:>18.4g}")
        train = flops.training_per_sample(ckpt)
        print(f"  training / sample (x{4 if ckpt else 3}{', recompute' if ckpt else ''}):"
              f"{train:>13.4g}")
        return {"family": cfg.family, "size": cfg.size, "stage": cfg.stage,
                "parameters": params["total"], "forward_flops": flops.total,
                "training_flops_per_sample": train, "tokens": flops.tokens,
                "flop_method": flops.method}

    return run_job(job, "plan-model")


SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "train": _add_train,
    "model": _add_model,
}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, metavar="{" + ",".join(
        SUBCOMMANDS) + "}")
    for add in SUBCOMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
