"""Generate videos with the two TTM stages from exported models.

One image:   the front-end (data prep's LLM prompt stage, Grounding DINO + SAM2, or a given
trajectory) gives c_motion, c_local and s0; stage 1 samples the mask trajectory; stage 2 the
video. Writes <out>/<variant>/<id>/{video,trajectory,overlay}.mp4, first_frame.png and
generation.json (prompts, seed, steps, guidance scales, model versions).

A manifest:  the same for every item on Ray Data actor pools (resources.annotate /
resources.generate), resumable: finished items are skipped on a rerun, failures are
recorded in <out>/failures.jsonl with their reason and the run goes on.

    ttm-ray generate --config jobs/configs/generate/quickstart.yaml \\
        --image cat.png --prompt "a cat jumps onto the sofa" \\
        --stage1 runs/dit-stage1/export --stage2 runs/dit-stage2/export
    ttm-ray generate ... --motion-prompt "jumps up" --object "cat=a cat jumping"   # no LLM
    ttm-ray generate ... --masks masks.json --object "cat=a cat jumping"   # s0 given: no SAM2
    ttm-ray generate ... --trajectory masks.json --object "cat=..."        # no stage 1
    ttm-ray generate --config ... --manifest items.jsonl                            # batch

Without --id, one image's folder is <image stem>-<10 hex>: a hash of the input's content
(image, prompts, masks) and of the settings that change its video (seed, sampling, models),
so rerunning the same input skips it and a new input or setting gets a folder of its own.

Exit codes: 0 every item generated, 1 some failed (see failures.jsonl) or the job failed,
2 invalid configuration.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from jobs.common import job_parser, load_job_config, run_job, setup_logging

DEFAULT_CONFIG = "jobs/configs/generate/quickstart.yaml"


def _overrides(args: Any) -> list[str]:
    """The convenience flags as ``--set`` overrides (validated like any other key)."""
    import json

    out = []
    for flag, key in (("image", "input.image"), ("id", "input.id"), ("prompt", "input.prompt"),
                      ("motion_prompt", "input.motion_prompt"),
                      ("manifest", "input.manifest"),
                      ("stage1", "generation.stage1.export"),
                      ("stage2", "generation.stage2.export"), ("out", "out_dir")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={json.dumps(value)}")
    if args.seed is not None:
        out.append(f"generation.seed={args.seed}")
    if args.steps is not None:
        out += [f"generation.stage1.steps={args.steps}", f"generation.stage2.steps={args.steps}"]
    if args.objects:
        objects = []
        for text in args.objects:
            name, sep, prompt = text.partition("=")
            if not sep:
                from ttm_ray.config import ConfigError

                raise ConfigError([f"--object {text!r}: expected NAME=PROMPT"])
            objects.append({"name": name.strip(), "prompt": prompt.strip()})
        out.append(f"input.object_prompts={json.dumps(objects)}")
    for path, variant in ((args.masks, "generated"), (args.trajectory, "given_trajectory")):
        if path is not None:
            out += [f"input.annotation={json.dumps(path)}", "annotate.mask_source=gt",
                    f"batch.variants=[{variant}]"]
    return out


def id_settings(cfg: Any) -> dict[str, Any]:
    """What a derived item id hashes besides the item's inputs: every setting that changes
    its video, so another seed, step count, guidance scale, model or front-end writes a new
    folder rather than being skipped as an earlier run's finished one. Left out, because they
    change where or how fast but not what is generated: ``run``, ``resources``, ``engine``,
    ``generation.device`` (one CPU noise generator per item gives the same clip on any
    device), ``batch.variants`` (already the folder above the id) and ``batch.overwrite``."""
    from pathlib import Path

    from ttm_ray.config import to_dict
    from ttm_ray.models.export import INFO

    generation = {k: v for k, v in to_dict(cfg.generation).items() if k != "device"}
    batch = {k: v for k, v in to_dict(cfg.batch).items() if k not in ("variants", "overwrite")}
    # An export's path does not say which weights it holds now; its export.json (training
    # run, step, config hash) does, so a re-export into the same folder is a new model.
    models: dict[str, str | None] = {}
    for stage in ("stage1", "stage2"):
        export = getattr(cfg.generation, stage).export
        info = Path(export) / INFO if export else None
        models[stage] = info.read_text() if info is not None and info.is_file() else None
    return {"generation": generation, "models": models, "annotate": to_dict(cfg.annotate),
            "batch": batch}


def generate_items(cfg: Any, items: list, variants: list[str], engine: str,
                   progress: bool = True) -> dict[str, Any]:
    """Plan, annotate, generate and record ``items`` x ``variants`` under ``cfg.output_dir``
    (shared by ``generate`` and ``evaluate``)."""
    from dataclasses import replace

    from data_prep.annotate import ImageAnnotator
    from ttm_ray.config import ConfigError
    from ttm_ray.inference import batch as B
    from ttm_ray.inference.harness import STAGE1_VARIANTS
    from ttm_ray.inference.stage_model import export_pixel_shape

    out = cfg.output_dir
    need_stage1 = any(v in STAGE1_VARIANTS for v in variants)
    cfg.generation.require_exports(need_stage1)
    need_llm = "gt_llm" in variants or any(
        i.object_prompts is None or (i.motion_prompt is None and need_stage1) for i in items)
    try:
        cfg.annotate.check_models(need_llm)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from exc
    frames = export_pixel_shape(cfg.generation.stage2.export)[0]
    batch_cfg = replace(cfg.batch, variants=variants)
    work = B.plan(items, variants, out, cfg.generation.seed, cfg.batch.overwrite)
    print(f"[generate] {len(items)} items x {len(variants)} settings: {work.pending} to "
          f"generate, {work.skipped_done} already done, {len(work.failures)} not possible; "
          f"outputs in {out}", file=sys.stderr)
    for folder in work.done:
        print(f"[generate] already done (batch.overwrite=true regenerates): {folder}",
              file=sys.stderr)
    annotator = functools.partial(ImageAnnotator, cfg.annotate)
    if engine == "ray":
        from ttm_ray.runtime import init_ray

        init_ray(cfg.run)
        results = B.run_ray(work, cfg.generation, batch_cfg, out, annotator, frames,
                            cfg.resources, load_stage1=need_stage1, progress=progress,
                            capacity_timeout_s=cfg.run.capacity_timeout_s)
    else:
        results = B.run_local(work, cfg.generation, batch_cfg, out, annotator, frames,
                              load_stage1=need_stage1)
    summary = B.record_results(out, results, work.failures)
    summary.update(out_dir=str(out), skipped_done=work.skipped_done, variants=variants)
    for r in results:
        if r["status"] == "generated":
            print(f"[generate] {r['variant']}/{r['item_id']}: {r['dir']}", file=sys.stderr)
        else:
            print(f"[generate] FAILED {r['variant']}/{r['item_id']}: {r['reason']}: "
                  f"{str(r['detail']).splitlines()[-1][:300] if r['detail'] else ''}",
                  file=sys.stderr)
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(prog, __doc__ or "", DEFAULT_CONFIG)
    group = parser.add_argument_group("input (shortcuts for --set input.*)")
    group.add_argument("--image", help="input image (png/jpg/webp) or video (its first frame)")
    group.add_argument("--id", help="output folder name (input.id); default: <image stem>-<10 "
                                     "hex> from the input's content and settings")
    group.add_argument("--prompt", help="global prompt c")
    group.add_argument("--motion-prompt", dest="motion_prompt",
                       help="c_motion (with --object: skip the LLM)")
    group.add_argument("--object", dest="objects", action="append", metavar="NAME=PROMPT",
                       help="an object and its local prompt (repeatable, trajectory colour "
                            "order)")
    group.add_argument("--masks", help="SA-V-format masks (one masklet per --object, in "
                                       "order): s0 from their first frame (no SAM2)")
    group.add_argument("--trajectory", help="SA-V-format masks over the clip (one masklet per "
                                            "--object, in order): skip stage 1")
    group.add_argument("--manifest", help="batch: items file (JSONL / JSON / CSV / Parquet)")
    group = parser.add_argument_group("models and sampling")
    group.add_argument("--stage1", help="stage-1 export folder (generation.stage1.export)")
    group.add_argument("--stage2", help="stage-2 export folder (generation.stage2.export)")
    group.add_argument("--seed", type=int, help="noise seed (generation.seed)")
    group.add_argument("--steps", type=int, help="sampler steps of both stages")
    group.add_argument("--out", help="output folder (out_dir)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def job() -> dict:
        from jobs.inference_config import GenerateConfig
        from ttm_ray.config import ConfigError, write_effective_config
        from ttm_ray.inference.items import item_from_row, load_items
        from ttm_ray.inference.outputs import item_dir

        args.overrides = [*args.overrides, *_overrides(args)]
        cfg = load_job_config(GenerateConfig, args)
        cfg.input.require()
        try:
            # One image without input.id gets an id derived from its content and settings
            # (a fixed default would make every new image "already done"); manifest ids stay
            # required, they are the benchmark's names.
            items = (load_items(cfg.input.manifest) if cfg.input.manifest
                     else [item_from_row(cfg.input.item_row(), id_settings(cfg))])
        except ValueError as exc:  # ManifestError included: bad input, before any work
            raise ConfigError([f"input: {exc}"]) from exc
        engine = cfg.engine if cfg.engine != "auto" else (
            "ray" if cfg.input.manifest else "local")
        write_effective_config(cfg, cfg.output_dir)
        variants = cfg.batch.expanded()
        summary = generate_items(cfg, items, variants, engine, progress=not args.no_progress)
        if not cfg.input.manifest:  # where the one image went, generated now or before
            summary["item_dirs"] = [str(item_dir(cfg.output_dir / v, items[0].item_id))
                                    for v in variants]
        if summary["failed"]:
            raise RuntimeError(f"{summary['failed']} of {summary['failed'] + summary['generated']}"
                               f" items failed ({summary['failed_by_reason']}); see "
                               f"{cfg.output_dir}/failures.jsonl (generated ones are kept)")
        return summary

    return run_job(job, "generate")


if __name__ == "__main__":
    sys.exit(main())
