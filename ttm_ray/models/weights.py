"""``model.init_from``: loading exported weights, and checking them against a config without
loading them.

:func:`load_weights` is what :func:`~ttm_ray.models.build_model` runs; :func:`check_init_from`
is the training preflight's check: it reads only the safetensors header and compares it with
the model's shapes built on the meta device, so a 4B model's mismatch costs milliseconds and
no memory. Both run :func:`weight_problems`, so they accept and refuse the same files:

* keys the checkpoint lacks must be stage-2 additions (``masked_*``): a stage-1 or
  text-to-video checkpoint starts a stage-2 model;
* a widened input layer (:mod:`ttm_ray.models.widening`) takes its narrow weight alone (a
  text-to-video ``patchify.weight``: the condition channels start at zero), one full-width
  weight, or the narrow weight plus ``visual_weight`` (either family's layout).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ttm_ray.models.widening import EXTRA, adapt_checkpoint, widened_layers

if TYPE_CHECKING:
    from ttm_ray.models.config import ModelConfig

log = logging.getLogger(__name__)

#: Where ``init_from`` points when it names a directory (what ``ttm-ray train`` exports).
WEIGHTS_NAME = "model.safetensors"
#: How many key names a missing/unexpected message lists before "... and N more".
MAX_LISTED = 10
FIX = ("fix: point model.init_from at weights exported for this model (same family, size, "
       "latent_channels and overrides; an earlier stage or a text-to-video checkpoint is "
       "fine), or set those model settings to the ones the checkpoint was trained with")


def weights_file(path: str | Path) -> Path:
    """The safetensors file ``init_from`` names: the path itself, or ``model.safetensors``
    inside it when it is a directory."""
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() else path


def _not_found(file: Path) -> str:
    return (f"model.init_from: no weights at {file}; give a .safetensors file or a directory "
            f"with {WEIGHTS_NAME} (what `ttm-ray train` exports), or set model.init_from: "
            "null to start from random weights")


def checkpoint_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a safetensors file from its header alone (no tensor is read).
    Raises ValueError when the file is not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"not a readable safetensors file ({exc})") from exc


def weight_problems(model: nn.Module, shapes: Mapping[str, Sequence[int]],
                    what: str = "the model") -> list[str]:
    """Why a checkpoint with these ``{key: shape}`` would not load into ``model`` (empty: it
    loads). One message per mismatching weight (a widened input layer's entries together),
    one for the missing and one for the unexpected keys; ``what`` names the model in them.
    ``model`` may live on the meta device."""
    # Shape-only stand-ins, rewritten by the same code the load hook runs (narrow -> zero
    # condition channels added, other layouts -> the layer's own), so what is accepted here
    # is what loads.
    state: dict[str, torch.Tensor] = {
        k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
    adapt_checkpoint(model, state)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    problems = []
    handled: set[str] = set()  # keys a widened layer's message already covers
    for prefix, layer in widened_layers(model).items():
        w_key, v_key = prefix + "weight", prefix + EXTRA
        if w_key not in state:
            continue  # absent altogether: reported with the missing keys
        keys = (w_key, v_key)
        if {k: expected[k] for k in keys if k in expected} == \
                {k: tuple(state[k].shape) for k in keys if k in state}:
            continue
        handled.update(keys)
        narrow, full, extra = layer.shapes()
        found = ", ".join(f"{k} {list(shapes[k])}" for k in keys if k in shapes)
        problems.append(
            f"{found} in the checkpoint does not fit the input layer of {what} "
            f"({layer.base_in_channels} input + {layer.extra_channels} condition channels), "
            f"which takes {w_key} {list(narrow)} alone (the input channels only, e.g. a "
            f"text-to-video checkpoint; the condition channels then start at zero), {w_key} "
            f"{list(full)} alone, or {w_key} {list(narrow)} with {v_key} {list(extra)}; {FIX}")

    for key in sorted((expected.keys() & state.keys()) - handled):
        if tuple(state[key].shape) != expected[key]:
            problems.append(f"{key} is {list(shapes[key])} in the checkpoint but {what} takes "
                            f"{list(expected[key])}; {FIX}")
    # Both families name their stage-2 additions ``masked_*``: a stage-1 checkpoint lacks
    # exactly those (and a narrow one the condition channels, which adapt_checkpoint added).
    missing = sorted(k for k in expected.keys() - state.keys() - handled
                     if "masked_" not in k)
    if missing:
        problems.append(f"lacks {len(missing)} weights {what} has (only its stage-2 "
                        f"masked_* layers may be missing): {_listed(missing)}; {FIX}")
    unexpected = sorted(state.keys() - expected.keys() - handled)
    if unexpected:
        problems.append(f"holds {len(unexpected)} weights {what} does not have: "
                        f"{_listed(unexpected)}; {FIX}")
    return problems


def _listed(keys: list[str]) -> str:
    more = len(keys) - MAX_LISTED
    return ", ".join(keys[:MAX_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def check_init_from(model_cfg: ModelConfig) -> list[str]:
    """Problems of ``model_cfg.init_from`` for the model ``model_cfg`` builds, without loading
    it: the safetensors header against the parameter shapes of a meta-device build. Each
    message starts with ``model.init_from: <file>:`` and ends with the fix; empty when
    ``init_from`` is unset or would load (narrow text-to-video input weights included)."""
    if not model_cfg.init_from:
        return []
    from ttm_ray.models.registry import build_model  # the registry imports this module

    file = weights_file(model_cfg.init_from)
    if not file.is_file():
        return [_not_found(file)]
    try:
        shapes = checkpoint_shapes(file)
    except ValueError as exc:
        return [f"model.init_from: {file}: {exc}; give the {WEIGHTS_NAME} that `ttm-ray "
                "train` exports"]
    model = build_model(dataclasses.replace(model_cfg, init_from=None), device="meta")
    what = (f"the model ({model_cfg.family} {model_cfg.size}, stage {model_cfg.stage}, "
            f"latent_channels {model_cfg.latent_channels})")
    return [f"model.init_from: {file}: {p}" for p in weight_problems(model, shapes, what)]


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load exported weights into ``model`` (safetensors only: no unpickling of files that may
    come from elsewhere). Refuses what :func:`weight_problems` refuses, with its messages;
    a narrow input weight loads with the condition channels at zero."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = weights_file(path)
    if not file.is_file():
        raise FileNotFoundError(_not_found(file))
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"model.init_from: {file}: not a readable safetensors file "
                         f"({exc})") from exc
    problems = weight_problems(model, {k: v.shape for k, v in state.items()})
    if problems:
        raise ValueError(f"model.init_from: {file}: weights do not match the model: "
                         + " | ".join(p.removesuffix("; " + FIX) for p in problems)
                         + "; " + FIX)
    # The load hook would do the same; done here first so the log says what happened.
    for prefix, how in adapt_checkpoint(model, state).items():
        log.info("%s: %s: %s", file, prefix[:-1],
                 "narrow (text-to-video) weight, the condition channels start at zero"
                 if how == "narrow" else f"converted from the {how} layout")
    model.load_state_dict(state, strict=False)


__all__ = ["WEIGHTS_NAME", "check_init_from", "checkpoint_shapes", "load_weights",
           "weight_problems", "weights_file"]
