"""The main job on the embedded default, end to end: generate a corpus, curate it into a
dataset version, then train the tiny variants of the four TTM runs on it.

Local Ray, a local MLflow store and everything else under ./runs/quickstart; tiny random
models (CLIP for the omega score, T5 and CLIP text encoders) are built there first, with the
libraries' own save_pretrained, so the real loading code runs.

    ttm-ray quickstart                  # 12 videos + 4 broken inputs, all four tiny runs
    ttm-ray quickstart --videos 40 --train dit_stage1_tiny
    ttm-ray quickstart --train none     # data prep only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jobs.common import resolve_config_path, run_job, setup_logging

PREP_CONFIG = "jobs/configs/prep/quickstart.yaml"
TRAIN_RUNS = ("dit_stage1_tiny", "dit_stage2_tiny", "unet_stage1_tiny", "unet_stage2_tiny")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/quickstart", help="where everything is written")
    parser.add_argument("--videos", type=int, default=12, help="generated videos")
    parser.add_argument("--corrupt", type=int, default=4, help="generated broken inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", nargs="*", default=list(TRAIN_RUNS), metavar="RUN",
                        help="tiny train configs (jobs/configs/train/RUN.yaml) to run after "
                             f"prep; default all four: {' '.join(TRAIN_RUNS)}; `none` skips")
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

        runs = [r for r in args.train if r != "none"]
        steps = 2 + len(runs)
        start = time.perf_counter()
        print(f"[quickstart] 1/{steps} generating {args.videos}+{args.corrupt} videos",
              file=sys.stderr)
        manifest = generate_corpus(root / "corpus", args.videos, args.seed, args.corrupt)
        print(f"[quickstart] 2/{steps} curating {manifest}", file=sys.stderr)
        clip_dir = build_tiny_clip(root / "models" / "tiny-clip")  # random weights, real code
        cfg = load_config(PrepConfig, resolve_config_path(PREP_CONFIG), [
            f"source.path={manifest}", f"run.root={root}", "run.name=prep",
            f"score.clip_model_path={clip_dir}",
        ])
        summary = run_prep(cfg)
        print(format_summary(summary), file=sys.stderr)
        trained = {}
        for i, name in enumerate(runs, start=3):
            print(f"[quickstart] {i}/{steps} training {name}", file=sys.stderr)
            trained[name] = train_tiny(name, root, summary["dataset_root"])
        print(f"[quickstart] done in {time.perf_counter() - start:.0f}s. Outputs:\n"
              f"  corpus:  {root / 'corpus'}\n"
              f"  dataset: {summary['version_path']} (latest of {summary['dataset_root']})\n"
              f"  mlflow:  {cfg.run.resolved_mlflow_uri()} (experiment "
              f"{cfg.run.mlflow_experiment!r}; `mlflow ui --backend-store-uri ...`)",
              file=sys.stderr)
        for name, result in trained.items():
            print(f"  {name}: weights {result.get('export')}, checkpoints {result['storage']}, "
                  f"MLflow run {result['mlflow_run_id']}", file=sys.stderr)
        return {"corpus": str(root / "corpus"), "dataset_version": summary["dataset_version"],
                "dataset": summary["version_path"], "kept": summary["kept"],
                "rejected": summary["rejected"], "mlflow_run_id": summary.get("mlflow_run_id"),
                "train": {name: {"export": r.get("export"), "mlflow_run_id": r["mlflow_run_id"],
                                 "final_loss": r.get("metrics", {}).get("loss")}
                          for name, r in trained.items()}}

    return run_job(job, "quickstart")


def train_tiny(name: str, root: Path, dataset_root: str) -> dict:
    """Run ``jobs/configs/train/<name>.yaml`` on the quickstart's dataset and tiny encoders."""
    from ttm_ray.conditioning.tiny import build_tiny_clip_text, build_tiny_t5
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig
    from ttm_ray.training.trainer import train

    models = root / "models"
    text = {"t5": build_tiny_t5(models / "tiny-t5"),
            "clip": build_tiny_clip_text(models / "tiny-clip-text")}
    path = resolve_config_path(f"jobs/configs/train/{name}.yaml")
    # Loaded twice: the first tells which text encoder the run's family uses.
    kind = load_config(TrainConfig, path).encoders.text_encoder.kind
    cfg = load_config(TrainConfig, path, [
        f"run.root={root / 'train'}", f"data.dataset_root={dataset_root}",
        f"encoders.text_encoder.path={text[kind]}",
        f"run.mlflow_tracking_uri=sqlite:///{(root / 'mlflow.db').resolve()}"])
    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
