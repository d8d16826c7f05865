"""The dataset card from statistics that add up: computed per shard group in the workers,
summed in the driver, so the card of a million clips costs the driver a few kilobytes.

:class:`CardStats` holds counts (by reject reason, stage and class; objects per kept clip) and
fixed-bin histograms of the scores the filter uses, split kept vs filtered. Fixed bins make
the histograms of two groups addable; a reused shard group brings its stored stats along.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_prep.filtering import FILTERED, FilterConfig
from data_prep.rows import reject_class
from ttm_ray.dataset.schema import SCHEMA_VERSION

#: name -> (title, value range, bins, where the score lives, filter threshold attribute)
HISTOGRAMS: dict[str, tuple[str, tuple[float, float], int, str, str]] = {
    "omega": ("temporal consistency (min CLIP cos-sim)", (0.0, 1.0), 200,
              "score_temporal_min", "omega"),
    "persistence": ("object persistence", (0.0, 1.0), 50, "persistence", "min_persistence"),
    "motion": ("object centroid motion (per frame, fraction of diagonal)", (0.0, 0.2), 50,
               "centroid_motion", "min_motion"),
}
_CLIP_SCORES = {"score_temporal_min"}


def _values(rows: list[dict], key: str) -> list[float]:
    if key in _CLIP_SCORES:
        return [r[key] for r in rows if r.get(key) is not None]
    return [o[key] for r in rows for o in r.get("object_scores") or [] if o.get(key) is not None]


def _hist(values: list[float], lo_hi: tuple[float, float], bins: int) -> list[int]:
    clipped = np.clip(np.asarray(values, dtype=np.float64), *lo_hi)
    return np.histogram(clipped, bins=bins, range=lo_hi)[0].astype(int).tolist()


@dataclass
class CardStats:
    """Addable statistics of some kept and rejected rows (JSON-able via :meth:`to_dict`)."""

    kept: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    stages: Counter = field(default_factory=Counter)
    classes: Counter = field(default_factory=Counter)
    objects: Counter = field(default_factory=Counter)  # objects per kept clip -> clips
    hists: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # name->{kept,filtered}

    @classmethod
    def of(cls, kept: list[dict], rejected: list[dict]) -> CardStats:
        filtered = [r for r in rejected if r.get("reject_reason") == FILTERED]
        stats = cls(kept=len(kept), rejected=len(rejected))
        stats.reasons.update(r.get("reject_reason") or "?" for r in rejected)
        stats.stages.update(r.get("reject_stage") or "?" for r in rejected)
        stats.classes.update(reject_class(r.get("reject_reason") or "stage_error")
                             for r in rejected)
        stats.objects.update(str(len(r.get("c_local") or [])) for r in kept)
        for name, (_, lo_hi, bins, key, _) in HISTOGRAMS.items():
            stats.hists[name] = {"kept": _hist(_values(kept, key), lo_hi, bins),
                                 "filtered": _hist(_values(filtered, key), lo_hi, bins)}
        return stats

    def __add__(self, other: CardStats) -> CardStats:
        hists = {name: {side: (np.asarray(self.hists.get(name, {}).get(side, 0))
                               + np.asarray(other.hists.get(name, {}).get(side, 0))).tolist()
                        for side in ("kept", "filtered")}
                 for name in HISTOGRAMS}
        return CardStats(self.kept + other.kept, self.rejected + other.rejected,
                         self.reasons + other.reasons, self.stages + other.stages,
                         self.classes + other.classes, self.objects + other.objects, hists)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "rejected": self.rejected, "reasons": dict(self.reasons),
                "stages": dict(self.stages), "classes": dict(self.classes),
                "objects": dict(self.objects), "hists": self.hists}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CardStats:
        return cls(d["kept"], d["rejected"], Counter(d["reasons"]), Counter(d["stages"]),
                   Counter(d["classes"]), Counter(d["objects"]), d["hists"])

    def summary(self) -> dict[str, Any]:
        """The counts a job summary and MLflow show (no histograms)."""
        return {"kept": self.kept, "rejected": self.rejected,
                "rejected_permanent": self.classes.get("permanent", 0),
                "rejected_transient": self.classes.get("transient", 0),
                "rejects_by_reason": dict(self.reasons)}


def _histogram_png(name: str, counts: dict[str, list[int]], threshold: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, (lo, hi), bins, _, _ = HISTOGRAMS[name]
    edges = np.linspace(lo, hi, bins + 1)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for label, values in counts.items():
        if sum(values):
            ax.stairs(values, edges, fill=True, alpha=0.6, label=f"{label} ({sum(values)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold}")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def build_card(stats: CardStats, filt: FilterConfig, lineage: dict[str, Any]
               ) -> dict[str, bytes]:
    """The card's files: README.md (counts by reason, stage and class; filter; lineage) and
    one histogram per filter score (kept vs filtered, threshold marked)."""
    def table(title: str, counts: Counter, head: str) -> list[str]:
        return ["", f"## {title}", "", f"| {head} | rows |", "|---|---|",
                *(f"| {k} | {v} |" for k, v in sorted(counts.items()))]

    lines = [
        f"# Dataset card ({SCHEMA_VERSION})", "",
        f"- kept clips: {stats.kept}",
        f"- rejected rows: {stats.rejected} (permanent {stats.classes.get('permanent', 0)}, "
        f"transient {stats.classes.get('transient', 0)}: retried by the next run)",
        f"- objects per kept clip: {dict(sorted(stats.objects.items()))}",
        *table("Rejects by class", stats.classes, "class"),
        *table("Rejects by reason", stats.reasons, "reason"),
        *table("Rejects by stage", stats.stages, "stage"),
        "", "## Filter", "", "```json", json.dumps(filt.__dict__, indent=2), "```",
        "", "## Lineage", "", "```json", json.dumps(lineage, indent=2, default=str), "```",
        "", " ".join(f"![{n}]({n}.png)" for n in HISTOGRAMS), "",
    ]
    files = {f"card/{name}.png": _histogram_png(name, stats.hists.get(name, {}),
                                                getattr(filt, attr) if filt.enabled else None)
             for name, (_, _, _, _, attr) in HISTOGRAMS.items()}
    files["card/README.md"] = "\n".join(lines).encode()
    return files
