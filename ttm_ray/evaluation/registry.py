"""The evaluation metrics, by name, in table order.

Adding a metric: a module declaring its :class:`~ttm_ray.evaluation.metric.Metric`, plus one
line below. The config's name check, the evaluator, the report and the evaluate job read
this registry, so nothing else names metrics. (A metric whose backbone needs settings no
existing section has also adds that section as a field of ``EvaluationConfig``: the YAML key.)

Lookups go through :func:`get` / :func:`names` / :func:`metrics` at call time, so a metric
added with :func:`register` (tests; plugins registered before configs are loaded) is seen
everywhere.
"""

from __future__ import annotations

from ttm_ray.evaluation.clipframe import CLIPFRAME
from ttm_ray.evaluation.displacement import AD
from ttm_ray.evaluation.fvd import FVD
from ttm_ray.evaluation.metric import Metric
from ttm_ray.evaluation.viclip import VICLIP_T, VICLIP_V

#: name -> metric; insertion order is the tables' column order.
REGISTRY: dict[str, Metric] = {m.name: m for m in (FVD, CLIPFRAME, VICLIP_T, VICLIP_V, AD)}


def register(metric: Metric) -> Metric:
    """Add ``metric`` after the registered ones (its name must be new)."""
    if metric.name in REGISTRY:
        raise ValueError(f"metric {metric.name!r} is registered already")
    REGISTRY[metric.name] = metric
    return metric


def names() -> tuple[str, ...]:
    """Registered metric names, in table order."""
    return tuple(REGISTRY)


def metrics() -> tuple[Metric, ...]:
    return tuple(REGISTRY.values())


def get(name: str) -> Metric:
    """The metric called ``name``; the error lists the registered names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; registered: "
                       f"{', '.join(REGISTRY)}") from None


def in_table_order(wanted: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``wanted`` sorted into registry (column) order, unknown names dropped."""
    chosen = set(wanted)
    return tuple(n for n in REGISTRY if n in chosen)


__all__ = ["REGISTRY", "get", "in_table_order", "metrics", "names", "register"]
