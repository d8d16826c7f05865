"""Scoring generated benchmark outputs: one table per generation setting, and the setting
comparison of the paper's Table 5 (failure cases: how errors propagate between stages).

Reads what batch generation wrote (``<out>/<variant>/<item>/video.mp4`` + ``generation.json``,
:mod:`ttm_ray.inference.outputs`) and the manifest's reference videos, sampled exactly as
generation sampled them (:func:`~ttm_ray.inference.items.load_pixels`). ViCLIP-T always
compares with the item's own prompt, so a setting that conditioned on wrong or dropped
prompts is judged against the right one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ttm_ray.evaluation.config import EvalItem, Evaluator
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
                      fps: float | None) -> tuple[dict[str, EvaluationResults],
                                                  dict[str, list[str]]]:
    """``({variant: results}, {variant: item ids without output})``; a variant with no
    output at all is left out of the results."""
    results, missing = {}, {}
    for v in variants:
        gone: list[str] = []
        scored = list(eval_items(items, Path(out_dir) / v, frames, fps, gone))
        missing[v] = gone
        if not scored:
            log.warning("variant %s: no generated item to score", v)
            continue
        log.info("scoring %s: %d videos", v, len(scored))
        results[v] = evaluator.evaluate(scored)
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


def settings_markdown(results: dict[str, EvaluationResults], subset: str = SUBSET_ALL,
                      bindings: dict[str, dict[str, int]] | None = None) -> str:
    """One row per generation setting (the layout of the paper's Table 5); with
    ``bindings`` (:func:`binding_counts` per setting) also how names were bound."""
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
    return "\n".join(lines) + "\n"


__all__ = ["MULTI", "SINGLE", "binding_counts", "binding_markdown", "eval_items",
           "evaluate_variants", "settings_markdown", "subset_of"]
