"""What every GPU check under ``benchmarks/gpu/`` shares: the repository on ``sys.path``, the
result line, tables, timing and the exit codes ``benchmarks/gpu_check.sh`` reads.

A check prints readable tables, then **one JSON line** as its last line::

    {"check": "<name>", "ok": true|false, "skipped": null|"<why>", "summary": "<one line>", ...}

and exits with :data:`EXIT_OK`, :data:`EXIT_FAILED` or :data:`EXIT_SKIPPED` (a dependency is
missing or there is no CUDA device: the script decides whether that counts as a failure).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing the project
    sys.path.insert(0, str(REPO))

EXIT_OK, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 3


def finish(check: str, ok: bool, summary: str, **fields: Any) -> int:
    """Print the result line and return the exit code for it."""
    print(json.dumps({"check": check, "ok": ok, "skipped": None, "summary": summary, **fields},
                     default=str), flush=True)
    return EXIT_OK if ok else EXIT_FAILED


def skip(check: str, why: str, **fields: Any) -> int:
    """A check that could not run here (missing package, no CUDA): say why, exit 3."""
    print(f"skipped: {why}", flush=True)
    print(json.dumps({"check": check, "ok": False, "skipped": why, "summary": f"skipped: {why}",
                      **fields}, default=str), flush=True)
    return EXIT_SKIPPED


def missing_module(*names: str) -> str | None:
    """The first of ``names`` that does not import, as ``"<name> not importable (<error>)"``."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a package that breaks while importing
            return f"{name} not importable ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (the results file embeds the output as is)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def synchronize(device: Any) -> None:
    """Wait for queued CUDA work: time whole operations, not their launches."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], Any], device: Any, repeats: int, warmup: int = 1) -> float:
    """The best wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def device_name(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
