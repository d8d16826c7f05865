"""The paper's evaluation metrics (FVD, CLIPFrame, ViCLIP-T/V, AD) and benchmark tables.

Every backbone loads from a local path and is named in the results; see
:mod:`ttm_ray.evaluation.config` for the entry point and :mod:`ttm_ray.evaluation.video` for
the input convention (``[T, H, W, 3]`` RGB, uint8 or float in [0, 1], or a file path).
Each metric describes itself (:class:`~ttm_ray.evaluation.metric.Metric`: label, decimals,
what it needs, per video or per set, how its scorer is built) in its own module, and
:mod:`ttm_ray.evaluation.registry` lists them: config, evaluator, report and the evaluate job
read that list. Submodules import their heavy dependencies (transformers, torchvision) only
where used.

Example (tiny random backbones from :mod:`ttm_ray.evaluation.tiny`; real runs point the same
keys at real weights)::

    cfg = from_dict(EvaluationConfig, {"clip": {"path": clip_dir},
                                       "viclip": {"path": xclip_dir},
                                       "fvd": {"weights": "r3d_18.safetensors"},
                                       "flow": {"backend": "raft_large",
                                                "weights": "raft_large.pth"}})
    results = cfg.build().evaluate(EvalItem(id, video, reference, caption, subset) for ...)
    paths = write_report(results, out_dir)          # evaluation.csv / .md / _per_video.csv
    log_to_mlflow(results, mlflow, artifacts=paths.values())
"""

from ttm_ray.evaluation.config import EvalItem, EvaluationConfig, Evaluator
from ttm_ray.evaluation.report import EvaluationResults, log_to_mlflow, write_report

__all__ = ["EvalItem", "EvaluationConfig", "EvaluationResults", "Evaluator", "log_to_mlflow",
           "write_report"]
