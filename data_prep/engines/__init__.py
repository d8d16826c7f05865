"""Model engines behind one interface (:class:`TextEngine`), chosen by ``EngineConfig.kind``.

Importing this package never imports torch, transformers or vllm: engines load them when built.
"""

from __future__ import annotations

from data_prep.engines.base import (
    Answer,
    ChatRequest,
    EngineError,
    EngineLoadError,
    TextEngine,
)
from data_prep.engines.config import EngineConfig


def build_engine(cfg: EngineConfig) -> TextEngine:
    """The engine ``cfg`` names, with its model loaded (once per Ray actor)."""
    if cfg.kind == "transformers":
        from data_prep.engines.transformers_engine import TransformersEngine

        return TransformersEngine(cfg)
    # ray_data_llm stages run as ray.data.llm processors in the pipeline (engines.ray_llm);
    # in-process runs (run_sequential, isolated re-runs) build this: the same model on vLLM.
    if cfg.kind in ("vllm", "ray_data_llm"):
        from data_prep.engines.vllm_engine import VllmEngine

        return VllmEngine(cfg)
    if cfg.kind == "manifest":
        raise ValueError(
            "engine kind 'manifest' is a stage mode (answers copied from the input rows), not "
            "a model: the stages handle it without building an engine"
        )
    raise ValueError(f"unknown engine kind {cfg.kind!r}")


__all__ = [
    "Answer",
    "ChatRequest",
    "EngineConfig",
    "EngineError",
    "EngineLoadError",
    "TextEngine",
    "build_engine",
]
