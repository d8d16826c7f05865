"""Exported weights: the format training writes and inference (or a later stage) reads.

An export is a folder::

    model.safetensors   consolidated fp32 weights (no pickles: safe to load from anywhere)
    model.yaml          the ModelConfig that builds the matching module (``init_from`` null)
    encoders.yaml       the frozen autoencoder + text encoder the model was trained with
    diffusion.yaml      the objective, sampler and guidance settings of the run
    export.json         where it came from: run name, step, dataset version, code version

``model.*`` is all :func:`load_exported` needs; the other files let two-stage inference rebuild
the exact conditioning and sampler of the run without the training config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ttm_ray.config import dump_yaml, from_dict, to_dict
from ttm_ray.models.config import ModelConfig

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.yaml"
ENCODERS_CONFIG = "encoders.yaml"
DIFFUSION_CONFIG = "diffusion.yaml"
INFO = "export.json"


def write_export(out_dir: str | Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                 *, encoders: Any = None, diffusion: Any = None,
                 info: dict[str, Any] | None = None) -> Path:
    """Write an export folder (weights first, configs after; ``export.json`` last marks it
    complete for readers that poll)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    cfg = from_dict(ModelConfig, {**to_dict(model_cfg), "init_from": None})
    (out / MODEL_CONFIG).write_text(dump_yaml(cfg))
    if encoders is not None:
        (out / ENCODERS_CONFIG).write_text(dump_yaml(encoders))
    if diffusion is not None:
        (out / DIFFUSION_CONFIG).write_text(dump_yaml(diffusion))
    (out / INFO).write_text(json.dumps(info or {}, indent=2, default=str))
    return out


def read_export_config(export_dir: str | Path, name: str, cls: type) -> Any:
    """One of the export's YAML configs as ``cls``; a clear error when the file is missing."""
    import yaml

    path = Path(export_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing from the export; re-export the run with `ttm-ray train` (exports "
            f"write {MODEL_CONFIG}, {ENCODERS_CONFIG} and {DIFFUSION_CONFIG}) or give the "
            "settings in the generation config")
    return from_dict(cls, yaml.safe_load(path.read_text()) or {}, source=str(path))


def exported_model_config(export_dir: str | Path) -> ModelConfig:
    """The export's ModelConfig with ``init_from`` pointing at its weights."""
    cfg = read_export_config(export_dir, MODEL_CONFIG, ModelConfig)
    weights = Path(export_dir) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the export has no weights; point at a folder "
                                "written by `ttm-ray train` (checkpoint.export: true)")
    return from_dict(ModelConfig, {**to_dict(cfg), "init_from": str(Path(export_dir))})


def load_exported(export_dir: str | Path, device: torch.device | str | None = None
                  ) -> torch.nn.Module:
    """The exported model in eval mode, built from its own config through ``build_model``."""
    from ttm_ray.models.registry import build_model

    return build_model(exported_model_config(export_dir), device=device).eval()


__all__ = ["DIFFUSION_CONFIG", "ENCODERS_CONFIG", "INFO", "MODEL_CONFIG", "WEIGHTS",
           "exported_model_config", "load_exported", "read_export_config", "write_export"]
