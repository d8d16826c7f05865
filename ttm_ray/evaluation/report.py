"""Benchmark tables: one row per subset (single-object / multi-object / all), as CSV and
Markdown, with the paper's numbers beside ours on SA-V-128, and MLflow logging.

The paper's reference rows (method notes, sec. 4) are SA-V-128 single-object only. They were
computed with I3D (FVD), CLIP, ViCLIP and RAFT; a row from stand-in backbones (the names are
listed under every table) is not comparable to them, which the Markdown says.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttm_ray.evaluation.registry import REGISTRY

SUBSET_ALL = "all"
THIS_RUN = "this run"

#: benchmark -> subset -> source -> metric -> value (SA-V-128 single-object, paper sec. 4).
PAPER_REFERENCE: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "sa-v-128": {
        "single-object": {
            "Ours-UNet (paper)": {"fvd": 925.39, "clipframe": 0.969, "viclip_t": 0.220,
                                  "viclip_v": 0.888, "ad": 4.70},
            "Ours-DiT (paper)": {"fvd": 1216.83, "clipframe": 0.945, "viclip_t": 0.226,
                                 "viclip_v": 0.860, "ad": 7.22},
        },
    },
}


def benchmark_key(name: str) -> str:
    """``"SA-V-128"``, ``"sav128"``, ``"sa_v_128"`` -> ``"sa-v-128"`` (reference lookup)."""
    squashed = re.sub(r"[^a-z0-9]", "", name.lower())
    return "sa-v-128" if squashed == "sav128" else name.lower()


def references(benchmark: str, subset: str) -> dict[str, dict[str, float]]:
    """The paper's rows for ``subset`` of ``benchmark`` (empty when it reports none)."""
    return PAPER_REFERENCE.get(benchmark_key(benchmark), {}).get(subset, {})


@dataclass
class EvaluationResults:
    """What :meth:`ttm_ray.evaluation.config.Evaluator.evaluate` returns.

    ``subsets``: subset -> ``{"n_videos": n, metric: value or None}`` (``"all"`` last);
    ``per_video``: one dict per video (``video_id``, ``subset``, metric values);
    ``backbones``: metric -> the backbone that computed it.
    """

    benchmark: str
    metrics: tuple[str, ...]
    subsets: dict[str, dict[str, Any]]
    per_video: list[dict[str, Any]] = field(default_factory=list)
    backbones: dict[str, str] = field(default_factory=dict)

    def rows(self, with_references: bool = True) -> list[dict[str, Any]]:
        """Table rows: per subset, this run, then the paper's rows for it."""
        out = []
        for subset, values in self.subsets.items():
            out.append({"subset": subset, "source": THIS_RUN,
                        "n_videos": values.get("n_videos"),
                        **{m: values.get(m) for m in self.metrics}})
            if with_references:
                for source, ref in references(self.benchmark, subset).items():
                    out.append({"subset": subset, "source": source, "n_videos": None,
                                **{m: ref.get(m) for m in self.metrics}})
        return out


# Column label, short label and decimals come from the metric's registry entry. Results may
# name metrics this process never registered (e.g. read back from elsewhere): those show
# under their own name with 3 decimals rather than failing the report.
def column(metric: str) -> str:
    """Table header of ``metric``, e.g. ``"FVD ↓"``."""
    return REGISTRY[metric].column if metric in REGISTRY else metric


def short_label(metric: str) -> str:
    """``metric``'s label without the arrow, e.g. ``"FVD"``."""
    return REGISTRY[metric].label if metric in REGISTRY else metric


def format_value(metric: str, value: Any) -> str:
    if metric in REGISTRY:
        return REGISTRY[metric].format(value)
    return "–" if value is None else f"{value:.3f}"


def to_csv(results: EvaluationResults) -> str:
    """The table as CSV: ``benchmark, subset, source, n_videos, <metrics>``; missing values
    are empty cells, numbers at full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["benchmark", "subset", "source", "n_videos", *results.metrics])
    for row in results.rows():
        writer.writerow([results.benchmark, row["subset"], row["source"],
                         "" if row["n_videos"] is None else row["n_videos"],
                         *("" if row[m] is None else repr(float(row[m]))
                           for m in results.metrics)])
    return buf.getvalue()


def per_video_csv(results: EvaluationResults) -> str:
    """``video_id, subset, <per-video metrics>`` (set-level metrics such as FVD: not here)."""
    metrics = [m for m in results.metrics if not (m in REGISTRY and REGISTRY[m].set_level)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video_id", "subset", *metrics])
    for row in results.per_video:
        writer.writerow([row["video_id"], row.get("subset") or "",
                         *("" if row.get(m) is None else repr(float(row[m])) for m in metrics)])
    return buf.getvalue()


def to_markdown(results: EvaluationResults) -> str:
    """One Markdown table per subset, the backbones, and a comparability note."""
    lines = [f"# Evaluation: {results.benchmark}", ""]
    if results.backbones:
        by_name: dict[str, list[str]] = {}  # ViCLIP-T and -V share one model: list it once
        for m, name in results.backbones.items():
            by_name.setdefault(name, []).append(short_label(m))
        lines += ["Backbones: " + "; ".join(f"{'/'.join(ms)}: {name}"
                                            for name, ms in by_name.items()), ""]
    has_refs = False
    header = "| | " + " | ".join(column(m) for m in results.metrics) + " |"
    rule = "|---|" + "---:|" * len(results.metrics)
    for subset, values in results.subsets.items():
        lines += [f"## {subset} ({values.get('n_videos', 0)} videos)", "", header, rule]
        for row in results.rows():
            if row["subset"] != subset:
                continue
            has_refs |= row["source"] != THIS_RUN
            cells = " | ".join(format_value(m, row[m]) for m in results.metrics)
            lines.append(f"| {row['source']} | {cells} |")
        lines.append("")
    if has_refs:
        lines.append("Paper rows: computed with I3D (FVD), CLIP, ViCLIP and optical flow at the "
                     "paper's resolution; rows from stand-in backbones (named above) are not "
                     "comparable to them.")
        lines.append("")
    return "\n".join(lines)


def write_report(results: EvaluationResults, folder: str | Path,
                 stem: str = "evaluation") -> dict[str, Path]:
    """``<stem>.csv``, ``<stem>.md`` and ``<stem>_per_video.csv`` in ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "markdown": out / f"{stem}.md",
             "per_video": out / f"{stem}_per_video.csv"}
    paths["csv"].write_text(to_csv(results), encoding="utf-8")
    paths["markdown"].write_text(to_markdown(results), encoding="utf-8")
    paths["per_video"].write_text(per_video_csv(results), encoding="utf-8")
    return paths


def mlflow_metrics(results: EvaluationResults, prefix: str = "eval") -> dict[str, float]:
    """``{"<prefix>/<subset>/<metric>": value}`` for every computed value."""
    out = {}
    for subset, values in results.subsets.items():
        for m in (*results.metrics, "n_videos"):
            if values.get(m) is not None:
                out[f"{prefix}/{subset}/{m}"] = float(values[m])
    return out


def log_to_mlflow(results: EvaluationResults, mlflow: Any, *, run_id: str | None = None,
                  prefix: str = "eval", step: int | None = None,
                  artifacts: Iterable[str | Path] = ()) -> dict[str, float]:
    """Log the subset table (metrics), the backbones and benchmark (tags) and ``artifacts``
    (e.g. :func:`write_report`'s files).

    ``mlflow``: the ``mlflow`` module, logging into its active run, or an ``MlflowClient``
    with ``run_id``. Passed in, so importing this module never imports MLflow. Returns the
    metrics logged.
    """
    metrics = mlflow_metrics(results, prefix)
    tags = {f"{prefix}.benchmark": results.benchmark,
            **{f"{prefix}.backbone.{m}": name for m, name in results.backbones.items()}}
    if run_id is None:
        mlflow.log_metrics(metrics, step=step)
        mlflow.set_tags(tags)
        for path in artifacts:
            mlflow.log_artifact(str(path))
    else:
        for key, value in metrics.items():
            mlflow.log_metric(run_id, key, value, step=step or 0)
        for key, value in tags.items():
            mlflow.set_tag(run_id, key, value)
        for path in artifacts:
            mlflow.log_artifact(run_id, str(path))
    return metrics


__all__ = [
    "PAPER_REFERENCE",
    "EvaluationResults",
    "benchmark_key",
    "column",
    "format_value",
    "log_to_mlflow",
    "mlflow_metrics",
    "per_video_csv",
    "references",
    "short_label",
    "to_csv",
    "to_markdown",
    "write_report",
]
