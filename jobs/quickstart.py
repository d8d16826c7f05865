"""The main job on the embedded default, end to end: generate a corpus, then curate it.

Local Ray, a local MLflow store and everything else under ./runs/quickstart. Later issues
extend the same command with dataset publishing, training and generation.

    ttm-ray quickstart                  # 12 videos + 4 broken inputs
    ttm-ray quickstart --videos 40
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jobs.common import resolve_config_path, run_job, setup_logging

PREP_CONFIG = "jobs/configs/prep/quickstart.yaml"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/quickstart", help="where everything is written")
    parser.add_argument("--videos", type=int, default=12, help="generated videos")
    parser.add_argument("--corrupt", type=int, default=4, help="generated broken inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    root = Path(args.root)

    def job() -> dict:
        from data_prep.config import PrepConfig
        from data_prep.pipeline import format_summary, run_prep
        from data_prep.synthetic import generate_corpus
        from data_prep.tiny_models import build_tiny_clip
        from ttm_ray.config import load_config

        start = time.perf_counter()
        print(f"[quickstart] 1/2 generating {args.videos}+{args.corrupt} videos", file=sys.stderr)
        manifest = generate_corpus(root / "corpus", args.videos, args.seed, args.corrupt)
        print(f"[quickstart] 2/2 curating {manifest}", file=sys.stderr)
        clip_dir = build_tiny_clip(root / "models" / "tiny-clip")  # random weights, real code
        cfg = load_config(PrepConfig, resolve_config_path(PREP_CONFIG), [
            f"source.path={manifest}", f"run.root={root}", "run.name=prep",
            f"score.clip_model_path={clip_dir}",
        ])
        summary = run_prep(cfg)
        print(format_summary(summary), file=sys.stderr)
        print(f"[quickstart] done in {time.perf_counter() - start:.0f}s. Outputs:\n"
              f"  corpus:  {root / 'corpus'}\n"
              f"  dataset: {summary['version_path']} (latest of {summary['dataset_root']})\n"
              f"  mlflow:  {cfg.run.resolved_mlflow_uri()} (experiment "
              f"{cfg.run.mlflow_experiment!r}; `mlflow ui --backend-store-uri ...`)",
              file=sys.stderr)
        return {"corpus": str(root / "corpus"), "dataset_version": summary["dataset_version"],
                "dataset": summary["version_path"], "kept": summary["kept"],
                "rejected": summary["rejected"], "mlflow_run_id": summary.get("mlflow_run_id")}

    return run_job(job, "quickstart")


if __name__ == "__main__":
    sys.exit(main())
