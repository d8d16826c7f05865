"""One rule for "a model folder saved with ``save_pretrained``", shared by every side.

A model folder holds ``config.json`` and at least one weights file. A pipeline folder may hold
the component under a subfolder (``vae/``, ``text_encoder/``), so lookups try those too.
Loading code, the plan and the preflights all find folders through :func:`model_folder`, so
they cannot disagree on what counts as "there".
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def model_folder(path: str | Path, subfolders: tuple[str, ...] = ()) -> Path | None:
    """``path`` or ``path/<sub>`` (first that holds a ``config.json``), else None."""
    root = Path(path).expanduser()
    return next((d for d in (root, *(root / s for s in subfolders))
                 if (d / "config.json").is_file()), None)


def has_weights(folder: Path) -> bool:
    """Any weights file (sharded or not) directly in ``folder``."""
    return any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in folder.iterdir())


def weights_problem(key: str, path: str | None, what: str,
                    subfolders: tuple[str, ...] = ()) -> str | None:
    """Why ``path`` (config key ``key``) is not a usable model folder, or None.

    ``what`` names the expected model for the message ("an AutoencoderKLCosmos").
    """
    fix = f"put {what} saved with save_pretrained (config.json + weights) there or change {key}"
    if not path:
        return f"{key} is not set: {fix}"
    if "://" in path:
        return None  # a URI is resolved by the loader on the node that reads it
    root = Path(path).expanduser()
    if not root.exists():
        return f"{key}: {root} does not exist: {fix}"
    folder = model_folder(root, subfolders)
    if folder is None:
        where = " nor ".join([str(root / "config.json")] + [str(root / s / "config.json")
                                                          for s in subfolders])
        return f"{key}: no {where}: {fix}"
    if not has_weights(folder):
        return (f"{key}: {folder} has config.json but no weights file "
                f"({', '.join(WEIGHT_SUFFIXES)}): {fix}")
    return None


__all__ = ["WEIGHT_SUFFIXES", "has_weights", "model_folder", "weights_problem"]
