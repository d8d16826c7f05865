"""Evaluate two-stage generation on a benchmark the way the paper does.

Generates every manifest item under each setting of batch.variants (resumable: finished
items are kept), then scores them with FVD, CLIPFrame, ViCLIP-T, ViCLIP-V and AD
(evaluation.*: backbones from local paths) against the items' reference videos, per subset
(single-/multi-object) with the paper's numbers beside SA-V-128, plus one table comparing the
settings (`--set batch.variants=[table5]`: the failure cases of the paper's Table 5: GT /
generated / mildly and strongly noised trajectories with manual prompts; GT trajectories
with LLM-rewritten, word-dropped and wrong prompts). Writes CSV + Markdown under
<out>/report/ and logs everything to one MLflow run.

    ttm-ray evaluate --config jobs/configs/evaluate/quickstart.yaml
    ray job submit ... -- python -m jobs.evaluate --config jobs/configs/evaluate/production.yaml

Exit codes: 0 scored (failed items are listed in <out>/failures.jsonl and the summary),
1 the job failed, 2 invalid configuration.
"""

from __future__ import annotations

import sys
from typing import Any

from jobs.common import job_parser, load_job_config, run_job, setup_logging

DEFAULT_CONFIG = "jobs/configs/evaluate/quickstart.yaml"


def evaluate(cfg: Any, progress: bool = True, skip_generation: bool = False) -> dict:
    """Generate (unless skipped), score, report and log one evaluation config."""
    from jobs.generate import generate_items
    from ttm_ray.config import ConfigError, write_effective_config
    from ttm_ray.evaluation import registry
    from ttm_ray.evaluation.benchmark import (
        binding_counts,
        evaluate_variants,
        record_rejects,
        settings_markdown,
    )
    from ttm_ray.evaluation.report import log_to_mlflow, write_report
    from ttm_ray.inference.items import load_items
    from ttm_ray.inference.stage_model import export_pixel_shape
    from ttm_ray.tracking import code_version, flatten, log_params, start_mlflow_run

    try:
        items = load_items(cfg.manifest)
    except ValueError as exc:
        raise ConfigError([f"manifest: {exc}"]) from exc
    need_ref = [m for m in cfg.evaluation.metrics if registry.get(m).needs_reference]
    no_ref = [i.item_id for i in items if not i.reference_video]
    if need_ref and no_ref:
        raise ConfigError([f"evaluation.metrics: {need_ref} compare with reference videos; "
                           f"items {no_ref[:5]} have none (drop those metrics or add "
                           "reference_video to the manifest)"])
    try:
        evaluator = cfg.evaluation.build()  # missing backbones fail before any generation
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError([str(exc)]) from exc
    variants = cfg.batch.expanded()
    out = cfg.output_dir
    write_effective_config(cfg, out)
    generated = None
    if not skip_generation:
        generated = generate_items(cfg, items, variants, cfg.engine, progress=progress)
    frames = export_pixel_shape(cfg.generation.stage2.export)[0]
    # Scoring on Ray actors by default (decode + backbones where the GPUs are; the driver
    # holds per-item values and FVD features only); evaluation.score.engine: local debugs.
    score_engine = cfg.evaluation.score.resolved_engine(cfg.engine)
    if score_engine == "ray":
        from ttm_ray.runtime import init_ray

        init_ray(cfg.run)
    rejected: dict[str, list] = {}
    results, missing = evaluate_variants(
        evaluator, items, out, variants, frames, cfg.batch.fps, engine=score_engine,
        evaluation=cfg.evaluation, resources=cfg.resources.score, rejected=rejected,
        progress=progress, capacity_timeout_s=cfg.run.capacity_timeout_s)
    rejects = record_rejects(out, rejected)
    if not results:
        raise RuntimeError(f"nothing to score: no setting produced output (see "
                           f"{out}/failures.jsonl)")
    # How each setting's local prompts were bound to its masks (GT + LLM: unbound, non-exact).
    bindings = {v: binding_counts(items, out / v) for v in results}
    report = out / "report"
    files = []
    for v, res in results.items():
        files += list(write_report(res, report, stem=v).values())
    table = report / "settings.md"
    table.write_text(f"# {cfg.evaluation.benchmark}: generation settings\n\n"
                     + settings_markdown(results, bindings=bindings, rejected=rejects))
    files.append(table)
    import mlflow

    with start_mlflow_run(cfg.run.resolved_mlflow_uri(), cfg.run.mlflow_experiment,
                          cfg.run.name, tags={"ttm.kind": "evaluate", "ttm.job": "evaluate",
                                              "ttm.code_version": code_version()}) as run:
        log_params(flatten(cfg))
        # The registered model versions scored, as the run's model inputs (ttm-ray lineage).
        from ttm_ray.lineage import log_scored_models

        log_scored_models({"stage1": cfg.generation.stage1.export,
                           "stage2": cfg.generation.stage2.export})
        for v, res in results.items():
            log_to_mlflow(res, mlflow, prefix=f"eval/{v}")
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="report")
        run_id = run.info.run_id
    print(f"[evaluate] report: {report} (settings table {table}); MLflow run {run_id}",
          file=sys.stderr)
    print(settings_markdown(results, bindings=bindings, rejected=rejects), file=sys.stderr)
    return {"report": str(report), "mlflow_run_id": run_id, "variants": variants,
            "scored": {v: r.subsets["all"]["n_videos"] for v, r in results.items()},
            "missing": {v: len(m) for v, m in missing.items()},
            "rejected": {v: sum(c.values()) for v, c in rejects.items()},
            "score_engine": score_engine,
            "generation": generated, "name_binding": bindings,
            "all": {v: {m: r.subsets["all"].get(m) for m in r.metrics}
                    for v, r in results.items()}}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(prog, __doc__ or "", DEFAULT_CONFIG)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--skip-generation", action="store_true",
                        help="only score what is already generated")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def job() -> dict:
        from jobs.inference_config import EvaluateConfig

        return evaluate(load_job_config(EvaluateConfig, args), not args.no_progress,
                        args.skip_generation)

    return run_job(job, "evaluate")


if __name__ == "__main__":
    sys.exit(main())
