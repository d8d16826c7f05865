"""Build a dataset with the Ray Data curation pipeline.

Raw videos -> clips -> captions -> motion prompt and per-object prompts -> Grounding DINO
boxes -> SAM2 mask trajectories (or GT masks) -> scores; every row lands in the run's work
store (work/), then a new dataset version is published atomically under dataset/ (data/,
rejects/, manifest.json, card/, _SUCCESS, then the `latest` pointer) and logged to MLflow.
Reruns skip what is already in work/, so an interrupted or incremental run resumes and never
duplicates rows. --refilter re-applies the config's filter thresholds to a published
version's stored scores without running any model.

    ttm-ray prep --config jobs/configs/prep/quickstart.yaml \\
        --set source.path=runs/corpus/manifest.parquet
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.build_dataset --config jobs/configs/prep/production.yaml
"""

from __future__ import annotations

import sys

from jobs.common import job_parser, load_job_config, run_job, setup_logging

DEFAULT_CONFIG = "jobs/configs/prep/quickstart.yaml"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(prog, __doc__ or "", DEFAULT_CONFIG)
    parser.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")
    parser.add_argument(
        "--refilter", nargs="?", const="latest", metavar="VERSION",
        help="no pipeline: re-apply filter.* to VERSION (default: latest) and publish the result")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def job() -> dict:
        from data_prep.config import PrepConfig
        from data_prep.job import format_summary, run_prep, run_refilter

        cfg = load_job_config(PrepConfig, args)
        if args.refilter:
            summary = run_refilter(cfg, args.refilter)
            print(f"[prep] refiltered {summary['refiltered_from']} -> "
                  f"{summary['dataset_version']}: {summary['kept']} kept, "
                  f"{summary['rejected']} rejected", file=sys.stderr)
            return summary
        print(f"[prep] writing to {cfg.output_dir}", file=sys.stderr)
        summary = run_prep(cfg, progress=not args.no_progress)
        print(format_summary(summary), file=sys.stderr)
        if summary["rejects_by_reason"].get("stage_error"):
            raise RuntimeError(
                f"{summary['rejects_by_reason']['stage_error']} rows hit a stage bug "
                f"(reject_reason=stage_error in {summary['version_path']}/rejects); outputs "
                "are kept, and the next run retries them (transient) up to faults.max_attempts"
            )
        keys = ("dataset_version", "version_path", "inputs", "new_clips", "new_rejects", "kept",
                "rejected", "rejected_permanent", "rejected_transient", "isolated_inputs",
                "mlflow_run_id", "seconds")
        return {k: summary.get(k) for k in keys}

    return run_job(job, "build_dataset")


if __name__ == "__main__":
    sys.exit(main())
