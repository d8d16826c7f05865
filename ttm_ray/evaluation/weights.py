"""Where evaluation backbones come from: local folders / files, checked before any work.

Every metric loads its network from a local path (there is no model hub). A missing or wrong
path is a config error raised at ``build()`` time, and the message names the config key and
the fix, e.g.::

    evaluation.clip.path: folder /x not found: point it at a CLIP model saved with
    save_pretrained (tests and the quickstart: ttm_ray.evaluation.tiny.build_tiny_clip(dir))

``allow_random_init`` (tests only) turns "no path" into "random weights": a state dict is
left at its seeded initialisation, a transformers model is a tiny random one built by
:mod:`ttm_ray.evaluation.tiny` in a temporary folder. Random weights make the numbers
meaningless, so results name the backbone with ``(random init)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CONFIG_KEY = "evaluation"  # where EvaluationConfig sits in a job config (for error messages)
_RANDOM_DIRS: dict[tuple[str, int], Path] = {}  # tiny random models built in this process


class WeightsNotFound(FileNotFoundError):
    """A backbone's configured weights are missing; the message names the key and the fix."""


def resolve_device(device: str) -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _random_hint(key: str) -> str:
    root = key.split(".")[0] if "." in key else CONFIG_KEY
    return f"or set {root}.allow_random_init: true (tests only: meaningless numbers)"


def require_model_dir(key: str, path: str | None, what: str, tiny: str) -> Path:
    """The folder of a ``save_pretrained`` model, or :class:`WeightsNotFound`.

    ``what``: the model kind for the message ("a CLIP model"); ``tiny``: the builder that
    makes a tiny one for tests.
    """
    fix = (f"point it at {what} saved with save_pretrained (tests and the quickstart: "
           f"ttm_ray.evaluation.tiny.{tiny}(dir)), {_random_hint(key)}")
    if not path:
        raise WeightsNotFound(f"{key} is not set: {fix}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise WeightsNotFound(f"{key}: folder {folder} not found: {fix}")
    if not (folder / "config.json").is_file():
        raise WeightsNotFound(f"{key}: {folder} has no config.json: {fix}")
    return folder


def require_weights_file(key: str, path: str | None, what: str, tiny: str) -> Path:
    """A weights file (``.safetensors``, or a ``torch.save`` state dict), or
    :class:`WeightsNotFound`."""
    fix = (f"point it at {what} (tests and the quickstart: "
           f"ttm_ray.evaluation.tiny.{tiny}(dir)), {_random_hint(key)}")
    if not path:
        raise WeightsNotFound(f"{key} is not set: {fix}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsNotFound(f"{key}: file {file} not found: {fix}")
    return file


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file.

    ``weights_only=True``: a pickled checkpoint from elsewhere must not run code on load.
    """
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style wrappers keep the weights one level down
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def random_model_dir(builder: str, seed: int = 0) -> Path:
    """A tiny random transformers model from :mod:`ttm_ray.evaluation.tiny`, built once per
    process in a temporary folder (``allow_random_init``)."""
    import tempfile

    from ttm_ray.evaluation import tiny

    if (builder, seed) not in _RANDOM_DIRS:
        folder = Path(tempfile.mkdtemp(prefix=f"ttm_eval_{builder}_"))
        log.warning("evaluation: %s has no weights and allow_random_init is set: using a tiny "
                    "random model in %s (metric values are meaningless)", builder, folder)
        _RANDOM_DIRS[builder, seed] = getattr(tiny, builder)(folder, seed=seed)
    return _RANDOM_DIRS[builder, seed]


def strip_prefix(state: dict[str, Any], prefixes: tuple[str, ...] = ("module.",)
                 ) -> dict[str, Any]:
    """Keys without a DataParallel/DDP ``module.`` prefix (checkpoints saved from wrappers)."""
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


__all__ = [
    "CONFIG_KEY",
    "WeightsNotFound",
    "load_state_dict",
    "random_model_dir",
    "require_model_dir",
    "require_weights_file",
    "resolve_device",
    "strip_prefix",
]
