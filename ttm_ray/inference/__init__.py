"""Two-stage inference: image + prompt -> trajectory (stage 1) -> video (stage 2).

* :mod:`~ttm_ray.inference.generate`: :class:`TwoStageGenerator` over exported models.
* :mod:`~ttm_ray.inference.annotation`: the contract with the front-end that supplies
  c_motion, c_local and s0 (data prep's stages; injected, never imported here).
* :mod:`~ttm_ray.inference.items`, :mod:`~ttm_ray.inference.batch`: manifests and resumable
  batch generation (in-process or Ray Data actor pools).
* :mod:`~ttm_ray.inference.harness`: the failure-case settings of the paper's Table 5.
* :mod:`~ttm_ray.inference.outputs`: what one item leaves on disk.
"""

from ttm_ray.inference.config import GenerationConfig, StageModelConfig
from ttm_ray.inference.generate import (
    GenerationInput,
    GenerationOutput,
    ObjectPrompt,
    TwoStageGenerator,
)

__all__ = ["GenerationConfig", "GenerationInput", "GenerationOutput", "ObjectPrompt",
           "StageModelConfig", "TwoStageGenerator"]
