"""The main job on the embedded default, end to end: generate a corpus, curate it into a
dataset version, train the tiny variants of the four TTM runs on it, animate an image with
both model families (two-stage generation), and evaluate the DiT pair on a benchmark made
from the corpus under the failure-case settings of the paper's Table 5.

Local Ray, a local MLflow store and everything else under ./runs/quickstart; tiny random
models (CLIP for the omega score and CLIPFrame, T5 and CLIP text encoders, X-CLIP and R3D-18
for the metrics) are built there first with the libraries' own save format, so the real
loading code runs. Rerunning reuses what is there: prep finds nothing new, finished
generations are skipped; training resumes its runs (already at their last step).
After prep, `ttm-ray encode` writes the encoded-latent cache of unet_stage2_tiny's clips
(prep/dataset-encoded/<hash>) and that run trains from it (data.encoded): no encoders on its
workers, its MLflow run tagged ttm.encoded_version.

    ttm-ray quickstart                  # 12 videos + 4 broken inputs, everything
    ttm-ray quickstart --videos 40 --train dit_stage1_tiny dit_stage2_tiny --no-eval
    ttm-ray quickstart --train none     # data prep only
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from jobs.common import resolve_config_path, run_job, setup_logging

PREP_CONFIG = "jobs/configs/prep/quickstart.yaml"
TRAIN_RUNS = ("dit_stage1_tiny", "dit_stage2_tiny", "unet_stage1_tiny", "unet_stage2_tiny")
#: The run the quickstart trains from an encoded version (`ttm-ray encode`, data.encoded).
ENCODED_RUN = "unet_stage2_tiny"


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
    parser.add_argument("--eval-items", type=int, default=3,
                        help="benchmark items (corpus videos) the evaluation generates and "
                             "scores; 0 skips generation and evaluation")
    parser.add_argument("--no-eval", action="store_true", help="skip generation + evaluation")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    root = Path(args.root)

    def job() -> dict:
        from data_prep.config import PrepConfig
        from data_prep.job import format_summary, run_prep
        from data_prep.synthetic import generate_corpus
        from data_prep.tiny_models import build_tiny_clip
        from ttm_ray.config import load_config

        runs = [r for r in args.train if r != "none"]
        # Families whose two stages are both trained can generate.
        pairs = [f for f in ("dit", "unet")
                 if {f"{f}_stage1_tiny", f"{f}_stage2_tiny"} <= set(runs)]
        scoring = not args.no_eval and args.eval_items > 0 and "dit" in pairs
        steps = (2 + len(runs) + int(ENCODED_RUN in runs)
                 + (1 if pairs and not args.no_eval else 0) + int(scoring))
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
        encoded = None
        if ENCODED_RUN in runs:
            print(f"[quickstart] 3/{steps} encoding the dataset for {ENCODED_RUN} "
                  "(ttm-ray encode: the encoded-latent cache)", file=sys.stderr)
            encoded = encode_tiny(ENCODED_RUN, root, summary["dataset_root"])
        first = 4 if encoded else 3
        trained = {}
        for i, name in enumerate(runs, start=first):
            print(f"[quickstart] {i}/{steps} training {name}"
                  f"{' on the encoded version' if encoded and name == ENCODED_RUN else ''}",
                  file=sys.stderr)
            trained[name] = train_tiny(name, root, summary["dataset_root"],
                                       encoded["dataset_root"] if encoded and
                                       name == ENCODED_RUN else None)
        step = first + len(runs)
        generated, evaluation = {}, None
        if pairs and not args.no_eval:
            print(f"[quickstart] {step}/{steps} two-stage generation ({', '.join(pairs)})",
                  file=sys.stderr)
            generated = {f: generate_sample(f, root, manifest, trained) for f in pairs}
            step += 1
        if scoring:
            print(f"[quickstart] {step}/{steps} evaluating the DiT pair on {args.eval_items} "
                  "corpus videos (Table 5 settings)", file=sys.stderr)
            evaluation = evaluate_benchmark(root, manifest, trained, args.eval_items)
        print(f"[quickstart] done in {time.perf_counter() - start:.0f}s. Outputs:\n"
              f"  corpus:  {root / 'corpus'}\n"
              f"  dataset: {summary['version_path']} (latest of {summary['dataset_root']})\n"
              f"  mlflow:  {cfg.run.resolved_mlflow_uri()} (experiment "
              f"{cfg.run.mlflow_experiment!r}; `mlflow ui --backend-store-uri ...`)",
              file=sys.stderr)
        for name, result in trained.items():
            print(f"  {name}: weights {result.get('export')}, checkpoints {result['storage']}, "
                  f"MLflow run {result['mlflow_run_id']}", file=sys.stderr)
        for family, folder in generated.items():
            print(f"  {family} generation: {folder} (video.mp4, trajectory.mp4, overlay.mp4, "
                  "generation.json)", file=sys.stderr)
        if evaluation:
            print(f"  evaluation: {evaluation['report']}/settings.md (MLflow run "
                  f"{evaluation['mlflow_run_id']})", file=sys.stderr)
        return {"corpus": str(root / "corpus"), "dataset_version": summary["dataset_version"],
                "dataset": summary["version_path"], "kept": summary["kept"],
                "rejected": summary["rejected"], "mlflow_run_id": summary.get("mlflow_run_id"),
                "encoded": None if encoded is None else {
                    k: encoded[k] for k in ("dataset_root", "encoded_version", "encoded",
                                            "reused", "rejected")},
                "train": {name: {"export": r.get("export"), "mlflow_run_id": r["mlflow_run_id"],
                                 "final_loss": r.get("metrics", {}).get("loss")}
                          for name, r in trained.items()},
                "generated": generated,
                "evaluation": None if evaluation is None else {
                    k: evaluation[k] for k in ("report", "mlflow_run_id", "scored")}}

    return run_job(job, "quickstart")


def _tiny_text_encoders(root: Path) -> dict[str, Path]:
    from ttm_ray.conditioning.tiny import build_tiny_clip_text, build_tiny_t5

    models = root / "models"
    return {"t5": build_tiny_t5(models / "tiny-t5"),
            "clip": build_tiny_clip_text(models / "tiny-clip-text")}


def encode_tiny(name: str, root: Path, dataset_root: str) -> dict:
    """``ttm-ray encode`` for train run ``name``'s clips: the train config's model, data and
    encoders sections (EncodeConfig.from_train), so its preflight accepts the result."""
    from ttm_ray.encoding.config import EncodeConfig
    from ttm_ray.encoding.job import run_encode

    cfg = _tiny_train_config(name, root, dataset_root, None)
    run = replace(cfg.run, name=f"encode-{cfg.run.name}")
    return run_encode(EncodeConfig.from_train(cfg, run=run), progress=False)


def _tiny_train_config(name: str, root: Path, dataset_root: str, encoded: str | None) -> object:
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig

    text = _tiny_text_encoders(root)
    path = resolve_config_path(f"jobs/configs/train/{name}.yaml")
    # Loaded twice: the first tells which text encoder the run's family uses.
    kind = load_config(TrainConfig, path).encoders.text_encoder.kind
    return load_config(TrainConfig, path, [
        f"run.root={root}", f"data.dataset_root={dataset_root}",
        f"encoders.text_encoder.path={text[kind]}",
        f"run.mlflow_tracking_uri=sqlite:///{(root / 'mlflow.db').resolve()}",
        # Its own run name: a run checkpointed on the dataset cannot resume on the encoded
        # version (an earlier quickstart's run of the same config trained on the fly).
        *([f"data.encoded={encoded}", f"run.name={cfg_name(path)}-encoded"] if encoded
          else [])])


def cfg_name(path: str | None) -> str:
    from ttm_ray.config import load_config
    from ttm_ray.training.config import TrainConfig

    return load_config(TrainConfig, path).run.name


def train_tiny(name: str, root: Path, dataset_root: str, encoded: str | None = None) -> dict:
    """Run ``jobs/configs/train/<name>.yaml`` on the quickstart's dataset and tiny encoders;
    ``encoded``: read that encoded version instead of encoding on the fly (``data.encoded``;
    the run's MLflow run is tagged ``ttm.encoded_version``)."""
    from ttm_ray.training.trainer import train

    return train(_tiny_train_config(name, root, dataset_root, encoded))


def _generate_config(kind: str, root: Path, trained: dict, family: str, overrides: list[str]
                     ) -> object:
    from jobs.inference_config import EvaluateConfig, GenerateConfig
    from ttm_ray.config import load_config

    cls = GenerateConfig if kind == "generate" else EvaluateConfig
    return load_config(cls, resolve_config_path(f"jobs/configs/{kind}/quickstart.yaml"), [
        f"run.root={root}",
        f"generation.stage1.export={trained[f'{family}_stage1_tiny']['export']}",
        f"generation.stage2.export={trained[f'{family}_stage2_tiny']['export']}",
        f"run.mlflow_tracking_uri=sqlite:///{(root / 'mlflow.db').resolve()}", *overrides])


def generate_sample(family: str, root: Path, corpus_manifest: Path, trained: dict) -> str:
    """Animate the first corpus video's first frame with the family's two tiny stages: its
    manual prompts, s0 from its GT masks, stage 1 samples the trajectory."""
    import pyarrow.parquet as pq

    from jobs.generate import generate_items
    from ttm_ray.inference.items import item_from_row

    row = next(r for r in pq.read_table(corpus_manifest).to_pylist() if not r["corrupt"])
    videos = corpus_manifest.parent
    cfg = _generate_config("generate", root, trained, family, [
        f"run.name=generate-{family}"])
    item = item_from_row({
        "id": row["video_id"], "prompt": row["caption"], "image": str(videos / row["path"]),
        "motion_prompt": row["motion_prompt"], "object_prompts": row["object_prompts"],
        "annotation": str(videos / row["annotation"])})
    summary = generate_items(cfg, [item], ["generated"], "local", progress=False)
    if summary["failed"]:
        raise RuntimeError(f"generation with the {family} pair failed: "
                           f"{summary['failed_by_reason']} (see {cfg.output_dir})")
    return str(Path(summary["out_dir"]) / "generated" / row["video_id"])


def evaluate_benchmark(root: Path, corpus_manifest: Path, trained: dict, items: int) -> dict:
    """``ttm-ray evaluate`` with jobs/configs/evaluate/quickstart.yaml on ``items`` corpus
    videos, tiny metric backbones built under ``root/models``."""
    from data_prep.synthetic import write_benchmark_manifest
    from jobs.evaluate import evaluate
    from ttm_ray.evaluation.tiny import build_tiny_fvd_weights, build_tiny_xclip

    models = root / "models"
    build_tiny_xclip(models / "tiny-xclip")
    build_tiny_fvd_weights(models / "tiny-fvd")
    bench = write_benchmark_manifest(corpus_manifest, root / "benchmark" / "manifest.jsonl",
                                     limit=items)
    # The YAML names the default root's folders; --root elsewhere must find its own models.
    cfg = _generate_config("evaluate", root, trained, "dit", [
        f"manifest={bench}", f"evaluation.clip.path={models / 'tiny-clip'}",
        f"evaluation.viclip.path={models / 'tiny-xclip'}",
        f"evaluation.fvd.weights={models / 'tiny-fvd' / 'r3d_18.safetensors'}"])
    return evaluate(cfg, progress=False)


if __name__ == "__main__":
    sys.exit(main())
