"""Train one of the four TTM models on Ray Train + DeepSpeed ZeRO.

Reads a published dataset version, trains with the config's ZeRO stage on
``scaling.num_workers`` workers, checkpoints to ``checkpoint.storage_path`` every
``checkpoint.every_steps`` steps, logs to MLflow, and exports consolidated weights
(``<run.root>/<run.name>/export``: model.safetensors + model.yaml). A worker failure restarts
from the last checkpoint; resubmitting the same run.name resumes the run (same MLflow run).

    ttm-ray train --config jobs/configs/train/dit_stage1_tiny.yaml
    ttm-ray train --config jobs/configs/train/dit_stage2.yaml --preflight   # checks only

Before any worker starts (and alone with --preflight) the job checks every weights folder and
file, init_from's tensor shapes against the model, and that the dataset version's clips have
the frame count and resolution the model's latent grid needs through the autoencoder; every
problem is reported at once (exit 2). On an autoscaling cluster it then asks the autoscaler
for the training nodes and waits up to run.capacity_timeout_s.
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.train --config jobs/configs/train/dit_stage2.yaml
"""

from __future__ import annotations

import sys

from jobs.common import job_parser, load_job_config, run_job, setup_logging

DEFAULT_CONFIG = "jobs/configs/train/dit_stage1_tiny.yaml"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(prog, __doc__ or "", DEFAULT_CONFIG)
    parser.add_argument("--preflight", action="store_true",
                        help="run the checks only (no Ray, nothing written); exit 0 if they pass")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def job() -> dict:
        from ttm_ray.training.config import TrainConfig
        from ttm_ray.training.trainer import train

        cfg = load_job_config(TrainConfig, args)
        if args.preflight:
            return train(cfg, preflight_only=True)
        summary = train(cfg)
        print(f"[train] {summary['run_name']}: checkpoints in {summary['storage']}, export in "
              f"{summary.get('export')}, MLflow run {summary['mlflow_run_id']} "
              f"({cfg.run.resolved_mlflow_uri()})", file=sys.stderr)
        return summary

    return run_job(job, "train")


if __name__ == "__main__":
    sys.exit(main())
