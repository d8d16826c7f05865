"""Self-describing metrics: the registry drives config validation, the evaluator and the
report, so a metric is one declaration plus one registry entry."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator

import numpy as np
import pytest

from ttm_ray.config import ConfigError, from_dict
from ttm_ray.evaluation import registry
from ttm_ray.evaluation.benchmark import settings_markdown
from ttm_ray.evaluation.config import EvalItem, EvaluationConfig
from ttm_ray.evaluation.displacement import FlowConfig
from ttm_ray.evaluation.metric import Batch, Metric, PerItemScorer, Scorer
from ttm_ray.evaluation.report import mlflow_metrics, per_video_csv, to_csv, to_markdown

PAPER_ORDER = ("fvd", "clipframe", "viclip_t", "viclip_v", "ad")


# ----------------------------------------------------------------------------- declarations
def test_registry_keeps_the_paper_metrics_and_table_order() -> None:
    assert registry.names() == PAPER_ORDER
    assert [m.column for m in registry.metrics()] == [
        "FVD ↓", "CLIPFrame ↑", "ViCLIP-T ↑", "ViCLIP-V ↑", "AD"]
    assert [m.decimals for m in registry.metrics()] == [2, 3, 3, 3, 2]
    assert registry.in_table_order(["ad", "fvd", "nope"]) == ("fvd", "ad")
    with pytest.raises(KeyError, match="registered: fvd, clipframe, viclip_t, viclip_v, ad"):
        registry.get("fid")


@pytest.mark.parametrize("name", PAPER_ORDER)
def test_each_metric_declares_every_field_consistently(name: str) -> None:
    metric = registry.get(name)
    assert isinstance(metric, Metric) and metric.name == name
    assert name.isidentifier() and name == name.lower()  # a config value and an MLflow key
    # The label is the backbone listing's short name: one word, no arrow of its own.
    assert metric.label and len(metric.label.split()) == 1 and not set(metric.label) & set("↑↓")
    assert isinstance(metric.decimals, int) and 0 <= metric.decimals <= 6
    assert metric.higher_is_better in (True, False, None)
    assert metric.column.startswith(metric.label)
    assert metric.format(1.0) == f"{1.0:.{metric.decimals}f}" and metric.format(None) == "–"
    for flag in (metric.needs_reference, metric.needs_caption, metric.set_level):
        assert isinstance(flag, bool)
    assert callable(metric.build)
    # Its backbone section is a config section that can load something.
    if metric.section is not None:
        hints = typing.get_type_hints(EvaluationConfig)
        assert metric.section in {f.name for f in dataclasses.fields(EvaluationConfig)}
        assert callable(getattr(hints[metric.section], "build", None))


def test_registered_metrics_build_scorers_from_their_sections() -> None:
    evaluator = EvaluationConfig(device="cpu", allow_random_init=True,
                                 flow=FlowConfig(backend="lucas_kanade")).build()
    assert evaluator.metrics == PAPER_ORDER
    for name, scorer in evaluator.scorers.items():
        assert isinstance(scorer, Scorer) and isinstance(scorer.name, str), name
    # one section, one loaded backbone, whichever metrics read it
    assert evaluator.backbones["viclip_t"] == evaluator.backbones["viclip_v"]
    assert evaluator.need_reference == ["fvd", "viclip_v"]
    assert evaluator.need_caption == ["viclip_t"]


def test_unknown_metric_error_lists_the_registered_names() -> None:
    with pytest.raises(ConfigError, match=r"metrics\[1\]: expected one of 'fvd', 'clipframe', "
                                          r"'viclip_t', 'viclip_v', 'ad' \(the registered "
                                          r"metrics\), got \"fid\""):
        from_dict(EvaluationConfig, {"metrics": ["ad", "fid"]})
    with pytest.raises(ValueError, match="listed twice"):
        EvaluationConfig(metrics=["ad", "ad"]).validate()


# ----------------------------------------------------------------------------- a toy metric
def _brightness(_backbone: None) -> PerItemScorer:
    return PerItemScorer("mean pixel", lambda batch: [float(v.mean()) for v in batch.videos])


class _GapScorer:
    """Set-level: |mean brightness of the generated set - that of the reference set|."""

    name = "numpy"

    def score(self, batch: Batch) -> list[tuple[float, float]]:
        return [(float(v.mean()), float(r.mean()))
                for v, r in zip(batch.videos, batch.references, strict=True)]

    def aggregate(self, values: list[tuple[float, float]], subset: str) -> float | None:
        if not values:
            return None
        return abs(np.mean([g for g, _ in values]) - np.mean([r for _, r in values]))


BRIGHTNESS = Metric(name="brightness", label="Brightness", decimals=1,
                    higher_is_better=None, section=None, build=_brightness,
                    needs_caption=True)
GAP = Metric(name="gap", label="Gap", decimals=4, higher_is_better=False, section=None,
             build=lambda _: _GapScorer(), needs_reference=True, set_level=True)


@pytest.fixture
def toy_metrics() -> Iterator[None]:
    """Register the toys for one test; the process-wide registry is restored after."""
    saved = dict(registry.REGISTRY)
    registry.register(BRIGHTNESS)
    registry.register(GAP)
    try:
        yield
    finally:
        registry.REGISTRY.clear()
        registry.REGISTRY.update(saved)


def _video(value: int, frames: int = 3) -> np.ndarray:
    return np.full((frames, 8, 8, 3), value, dtype=np.uint8)


def test_unregistered_metric_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"expected one of .*'ad' .*got \"brightness\""):
        from_dict(EvaluationConfig, {"metrics": ["brightness"]})


def test_a_registered_toy_metric_flows_through_config_evaluator_and_report(toy_metrics) -> None:
    with pytest.raises(ValueError, match="already"):
        registry.register(GAP)
    cfg = from_dict(EvaluationConfig, {"metrics": ["gap", "ad", "brightness"], "device": "cpu",
                                       "benchmark": "SA-V-128", "video_batch_size": 2,
                                       "flow": {"backend": "lucas_kanade"}})
    assert "gap" in EvaluationConfig().metrics  # registered metrics are on by default
    evaluator = cfg.build()
    assert evaluator.metrics == ("ad", "brightness", "gap")  # registry (column) order
    assert evaluator.backbones["brightness"] == "mean pixel"
    items = [EvalItem("a", _video(10), _video(20), "x", "single-object"),
             EvalItem("b", _video(30), _video(20), "x", "single-object"),
             EvalItem("c", _video(50), _video(80), "x", "multi-object")]
    results = evaluator.evaluate(iter(items))
    assert [r["brightness"] for r in results.per_video] == [10.0, 30.0, 50.0]
    assert all("gap" not in r for r in results.per_video)  # set-level: no per-video value
    assert results.subsets["single-object"]["brightness"] == 20.0
    assert results.subsets["single-object"]["gap"] == pytest.approx(0.0)
    assert results.subsets["all"]["gap"] == pytest.approx(abs(30.0 - 40.0))
    assert results.subsets["all"]["ad"] == pytest.approx(0.0)

    # What the metric needs is checked per item, with its name in the message.
    with pytest.raises(ValueError, match=r"no reference video, which \['gap'\] need"):
        evaluator.evaluate([EvalItem("d", _video(1), None, "x")])
    with pytest.raises(ValueError, match="no caption, which brightness needs"):
        evaluator.evaluate([EvalItem("e", _video(1), _video(1), "")])

    # Report: column labels, decimals, which tables hold it, MLflow keys.
    assert to_csv(results).splitlines()[0] == (
        "benchmark,subset,source,n_videos,ad,brightness,gap")
    assert per_video_csv(results).splitlines()[0] == "video_id,subset,ad,brightness"
    md = to_markdown(results)
    assert "| | AD | Brightness | Gap ↓ |" in md
    assert "| this run | 0.00 | 20.0 | 0.0000 |" in md
    assert "| Ours-UNet (paper) | 4.70 | – | – |" in md  # the paper has no toy numbers
    assert "Brightness: mean pixel; Gap: numpy" in md
    assert "| setting | videos | AD | Brightness | Gap ↓ |" in settings_markdown({"s": results})
    assert mlflow_metrics(results)["eval/all/gap"] == pytest.approx(10.0)
