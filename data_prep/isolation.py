"""Inputs whose block failed, re-run one per task, so a poison input ends as a reject.

When a worker dies natively (a decoder's abort or segfault, an OOM kill) on a block more
times than ``faults.task_retries``, Ray Data drops the block (``faults.max_errored_blocks``)
and its rows never arrive. The job notices which inputs produced nothing and re-runs each
alone in its own Ray task (no retries) through the same stages in-process
(:func:`data_prep.pipeline.run_sequential`). An input that kills its worker again, or runs
past ``faults.isolation_timeout_s``, becomes a ``worker_crashed`` reject naming the input and
the error; every other input's rows are kept. Model stages load their models per isolated
task, which is slow but happens only for the few inputs a crash touched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from data_prep.config import PrepConfig
from data_prep.rows import reject, to_table

log = logging.getLogger(__name__)
STAGE = "isolation"


def _run_one(cfg: PrepConfig, row: dict, done: Any) -> pa.Table:
    from data_prep.pipeline import run_sequential

    return to_table(run_sequential(cfg, [row], done), stage=STAGE)


def _task_resources(cfg: PrepConfig) -> dict[str, Any]:
    """One task that can run every stage the pipeline uses (the largest GPU share)."""
    from data_prep.pipeline import stage_specs

    specs = stage_specs(cfg, None)
    gpus = max((s.resources.num_gpus for s in specs if s.resources), default=0)
    custom: dict[str, float] = {}
    for s in specs:
        for k, v in ((s.resources.custom_resources or {}) if s.resources else {}).items():
            custom[k] = max(custom.get(k, 0.0), v)
    out: dict[str, Any] = {"num_cpus": 1, "max_retries": 0}
    if gpus:
        out["num_gpus"] = min(1.0, gpus) if gpus < 1 else gpus
    if custom:
        out["resources"] = custom
    return out


def isolate(cfg: PrepConfig, rows: list[dict], done: Any) -> Iterator[pa.Table]:
    """Re-run each input row alone; yields each one's result rows as a table."""
    import ray

    if not rows:
        return
    log.warning("prep: %d inputs produced no rows (their blocks failed); re-running each "
                "alone to find the one that crashes", len(rows))
    remote = ray.remote(**_task_resources(cfg))(_run_one)
    refs = [(row, remote.remote(cfg, row, done)) for row in rows]
    for row, ref in refs:
        try:
            yield ray.get(ref, timeout=cfg.faults.isolation_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            yield _crashed(row, f"still running after faults.isolation_timeout_s="
                                f"{cfg.faults.isolation_timeout_s}s alone; cancelled")
        except (ray.exceptions.RayError, ray.exceptions.RayTaskError) as exc:
            yield _crashed(row, f"{type(exc).__name__}: {str(exc)[:2000]}")


def _crashed(row: dict, detail: str) -> pa.Table:
    name = row.get("source_uri") or row.get("video_id")
    log.error("prep: input %s crashed its worker again when run alone: rejected as "
              "worker_crashed (%s)", name, detail.splitlines()[0] if detail else "")
    message = (f"input {name} killed its worker on every try (in its block and alone): "
               f"{detail}. Fix: inspect or re-encode the file; it is retried by the next "
               "run until faults.max_attempts")
    return to_table([reject(row, STAGE, "worker_crashed", message)], stage=STAGE)
