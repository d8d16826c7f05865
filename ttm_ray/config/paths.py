"""Paths in configs that other processes read (Ray workers, recorded lineage)."""

from __future__ import annotations

from pathlib import Path


def absolute_path(path: str | None) -> str | None:
    """A relative local path against this process's working dir (Ray workers run elsewhere,
    and a recorded config must compare equal wherever it is read); absolute paths and URIs
    are what every node sees and stay as they are."""
    if not path or "://" in path or Path(path).is_absolute():
        return path
    return str(Path(path).resolve())
