"""Scoring generated benchmark outputs: one table per generation setting, and the setting
comparison of the paper's Table 5 (failure cases: how errors propagate between stages).

Reads what batch generation wrote (``<out>/<variant>/<item>/video.mp4`` + ``generation.json``,
:mod:`ttm_ray.inference.outputs`) and the manifest's reference videos, sampled exactly as
generation sampled them (:func:`~ttm_ray.inference.items.load_pixels`). Decoding and scoring
happen in :mod:`ttm_ray.evaluation.scoring` (Ray actors by default): this module plans, the
driver only gathers per-item values and FVD features. ViCLIP-T always
compares with the item's own prompt, so a setting that conditioned on wrong or dropped
prompts is judged against the right one.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ttm_ray.config.resources import StageResources
from ttm_ray.evaluation.config import EvalItem, EvaluationConfig, Evaluator
from ttm_ray.evaluation.report import SUBSET_ALL, EvaluationResults, column, format_value
from ttm_ray.inference.items import GenerationItem, load_pixels
from ttm_ray.inference.name_binding import METHODS
from ttm_ray.inference.outputs import is_done, item_dir, read_record

log = logging.getLogger(__name__)

SINGLE, MULTI = "single-object", "multi-object"


def subset_of(item: GenerationItem, record: dict[str, Any]) -> str:
    """The manifest's subset, else single-/multi-object from the objects generation used."""
    if item.subset:
        return item.subset
    return SINGLE if len(record.get("objects") or []) == 1 else MULTI


def eval_items(items: Sequence[GenerationItem], variant_dir: str | Path, frames: int,
               fps: float | None, missing: list[str]) -> Iterator[EvalItem]:
    """EvalItems of one setting's outputs (lazily: one item's frames in memory at a time).
    Items without output are appended to ``missing``."""
    for item in items:
        if not is_done(variant_dir, item.item_id):
            missing.append(item.item_id)
            continue
        record = read_record(variant_dir, item.item_id)
        reference = (load_pixels(item, frames, fps).reference
                     if item.reference_video else None)
        yield EvalItem(item.item_id, str(item_dir(variant_dir, item.item_id) / "video.mp4"),
                       reference, item.prompt, subset_of(item, record))


def evaluate_variants(evaluator: Evaluator, items: Sequence[GenerationItem],
                      out_dir: str | Path, variants: Sequence[str], frames: int,
                      fps: float | None, *, engine: str = "local",
                      evaluation: EvaluationConfig | None = None,
                      resources: StageResources | None = None,
                      rejected: dict[str, list[dict[str, Any]]] | None = None,
                      progress: bool = True, capacity_timeout_s: float = 900.0
                      ) -> tuple[dict[str, EvaluationResults], dict[str, list[str]]]:
    """``({variant: results}, {variant: item ids without output})``; a variant with no
    scored item is left out of the results.

    ``engine``: ``ray`` decodes and scores on a Ray Data actor pool placed by ``resources``
    (the job's ``resources.score``; ``evaluation``: the config the actors build their
    backbones from; Ray must be initialised); ``local`` in this process with
    ``evaluator``. Either way the driver holds ids, paths, per-item values and FVD features
    only
    (:mod:`ttm_ray.evaluation.scoring`). Items that fail to decode or score are appended to
    ``rejected[variant]`` (reason, detail) and left out of the tables.
    """
    from ttm_ray.evaluation.scoring import collect, plan_chunks, score_local, score_ray

    if engine == "ray" and (evaluation is None or resources is None):
        raise ValueError("engine 'ray' needs the EvaluationConfig the actors build from and "
                         "their resources")
    every = evaluation.score.progress_every if evaluation is not None else 10
    results, missing = {}, {}
    for v in variants:
        gone: list[str] = []
        rows = plan_chunks(items, Path(out_dir) / v, evaluator.video_batch_size, gone)
        missing[v] = gone
        total = len(items) - len(gone)
        if not rows:
            log.warning("variant %s: no generated item to score", v)
            continue
        log.info("scoring %s: %d videos (%s)", v, total, engine)
        stream = (score_ray(evaluation, rows, frames, fps, resources, progress,
                            capacity_timeout_s)
                  if engine == "ray" and evaluation is not None and resources is not None
                  else score_local(evaluator, rows, frames, fps))
        scored = collect(evaluator, stream, total, label=f"scoring {v}",
                         progress_every=every)
        if rejected is not None:
            rejected[v] = scored.rejected
        if scored.results is None:
            log.warning("variant %s: every item was rejected at scoring", v)
            continue
        results[v] = scored.results
    return results, missing


def binding_counts(items: Sequence[GenerationItem], variant_dir: str | Path) -> dict[str, int]:
    """How one setting's generated items bound local prompts to masks, summed over items
    (``notes.name_binding`` of each ``generation.json``): ``objects``, one count per method
    (exact, normalised, similar, order, unbound) and ``unused_prompts``. Records written
    before the binding was recorded are skipped."""
    out = dict.fromkeys(("objects", *METHODS, "unused_prompts"), 0)
    for item in items:
        if not is_done(variant_dir, item.item_id):
            continue
        binding = (read_record(variant_dir, item.item_id).get("notes") or {}).get(
            "name_binding")
        if not binding:
            continue
        for method, n in binding["counts"].items():
            out[method] = out.get(method, 0) + int(n)
            out["objects"] += int(n)
        out["unused_prompts"] += len(binding.get("unused_prompts") or [])
    return out


def binding_markdown(bindings: dict[str, dict[str, int]]) -> str:
    """The binding counts per setting: a GT + LLM row with unbound or non-exact objects
    says its prompts, not only its masks, differ from the manual setting's."""
    cols = ("objects", *METHODS, "unused_prompts")
    lines = ["Local prompts bound to masks by name (exact, normalised, similar, order; unbound "
             "masks keep their mask with the caption as prompt):", "",
             "| setting | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    lines += [f"| {v} | " + " | ".join(str(c.get(k, 0)) for k in cols) + " |"
              for v, c in bindings.items()]
    return "\n".join(lines) + "\n"


def record_rejects(out_dir: str | Path, rejected: dict[str, list[dict[str, Any]]]
                   ) -> dict[str, dict[str, int]]:
    """Append scoring's rejects to ``<out_dir>/failures.jsonl`` (beside generation's, with
    ``stage: score``) and count them per setting and reason."""
    from ttm_ray.inference.batch import FAILURES, failure

    rows = [{**failure(r["video_id"], v, r["reason"], str(r["detail"])), "stage": "score"}
            for v, rejects in rejected.items() for r in rejects]
    if rows:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with (Path(out_dir) / FAILURES).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {v: dict(Counter(r["reason"] for r in rejects))
            for v, rejects in rejected.items() if rejects}


def settings_markdown(results: dict[str, EvaluationResults], subset: str = SUBSET_ALL,
                      bindings: dict[str, dict[str, int]] | None = None,
                      rejected: dict[str, dict[str, int]] | None = None) -> str:
    """One row per generation setting (the layout of the paper's Table 5); with
    ``bindings`` (:func:`binding_counts` per setting) also how names were bound; with
    ``rejected`` (:func:`record_rejects`) the items each setting lost at scoring."""
    if not results:
        return "_no setting produced any output_\n"
    metrics = next(iter(results.values())).metrics
    lines = ["| setting | videos | " + " | ".join(column(m) for m in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for v, res in results.items():
        row = res.subsets.get(subset, {})
        lines.append(f"| {v} | {row.get('n_videos', 0)} | "
                     + " | ".join(format_value(m, row.get(m)) for m in metrics) + " |")
    backbones = next(iter(results.values())).backbones
    lines += ["", "Backbones: " + "; ".join(f"{m}: {b}" for m, b in backbones.items())]
    if bindings:
        lines += ["", binding_markdown(bindings).rstrip("\n")]
    if rejected and any(rejected.values()):
        lines += ["", "Rejected at scoring (left out of the rows above; see failures.jsonl): "
                  + "; ".join(f"{v}: " + ", ".join(f"{n} {reason}" for reason, n in c.items())
                              for v, c in rejected.items() if c)]
    return "\n".join(lines) + "\n"


__all__ = ["MULTI", "SINGLE", "binding_counts", "binding_markdown", "eval_items",
           "evaluate_variants", "record_rejects", "settings_markdown", "subset_of"]
