"""TTM denoisers: the DiT and U-Net families behind one ``build_model(ModelConfig)``.

Plain PyTorch (no Ray, DeepSpeed or MLflow). See :mod:`ttm_ray.models.registry`.
"""

from ttm_ray.models.config import ModelConfig
from ttm_ray.models.registry import (
    Family,
    build_model,
    count_parameters,
    get_family,
    resolve_family_config,
)
from ttm_ray.models.weights import check_init_from, load_weights

__all__ = [
    "Family",
    "ModelConfig",
    "build_model",
    "check_init_from",
    "count_parameters",
    "get_family",
    "load_weights",
    "resolve_family_config",
]
