"""``EngineConfig``: which model answers a stage's prompts, and how it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ttm_ray.config import constrained
from ttm_ray.model_folders import servable_problem

#: Kinds that serve the model with vLLM (ours in an actor, or Ray Data LLM's processor).
VLLM_KINDS = ("vllm", "ray_data_llm")


@dataclass
class EngineConfig:
    """A model behind a stage.

    ``manifest`` needs no model: the stage copies the answers the input brought
    (``given_caption``, ``given_motion_prompt``, ``given_object_prompts``); it is the default
    because it runs anywhere, and rows without such answers are rejected with a detail that
    names this config. ``transformers`` runs on CPU or GPU (tests, small runs); ``vllm`` runs
    the model in our own actor pool (one node or a cluster); ``ray_data_llm`` is the cluster
    path: the same vLLM model through Ray's batch-inference library (``ray.data.llm``
    processors, :mod:`data_prep.engines.ray_llm`), which then owns batching, the actor pool
    and the engine lifecycle.
    """

    kind: Literal["transformers", "vllm", "ray_data_llm", "manifest"] = constrained(
        "manifest", help="transformers | vllm | ray_data_llm (vllm through ray.data.llm "
        "processors) | manifest (copy the answers given with the input)"
    )
    model_path: str | None = constrained(
        None, help="local model folder (vllm also takes a URI); required unless kind=manifest"
    )
    model_name: str | None = constrained(
        None, help="model id recorded in the rows; null: the model folder's name"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = constrained(
        "auto", help="weights dtype; auto: bfloat16 on CUDA, float32 on CPU (vllm: its own auto)"
    )
    device: Literal["auto", "cpu", "cuda"] = constrained(
        "auto", help="transformers only; auto: cuda when available"
    )
    max_new_tokens: int = constrained(256, gt=0, help="answer length cap in tokens")
    temperature: float = constrained(0.0, ge=0, help="first attempt; 0 is greedy decoding")
    retry_temperature: float = constrained(
        0.7, gt=0, help="temperature of retries after an unusable answer (greedy would repeat it)"
    )
    seed: int = constrained(0, ge=0, help="sampling seed; attempt k uses seed + k")
    batch_size: int = constrained(
        8, gt=0, help="requests per model call (transformers padding batch; vllm processor batch)"
    )
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "vllm: extra vllm.LLM kwargs (max_model_len, tensor_parallel_size, "
                          "gpu_memory_utilization...); transformers: extra from_pretrained kwargs"},
    )

    def validate(self) -> None:
        if self.kind == "manifest":
            return
        if not self.model_path or not self.model_path.strip():
            raise ValueError(
                f"model_path is required when kind is {self.kind!r}: set engine.model_path to "
                "a local model folder (or use kind: manifest to copy given answers)"
            )
        if self.kind == "transformers" and "://" in self.model_path:
            raise ValueError(
                f"model_path {self.model_path!r}: the transformers engine loads from a local "
                "folder only (no model hub, no URIs); download the model and give its folder"
            )
        if "model" in self.engine_kwargs:
            raise ValueError("engine_kwargs must not set 'model': use model_path")
        if self.kind in VLLM_KINDS and self.device == "cpu":
            raise ValueError(f"kind {self.kind!r} runs on CUDA only: use kind 'transformers' "
                             "on CPU")
        # A folder whose architecture the engine cannot serve (Llama-3.2-Vision under current
        # vLLM) would otherwise fail only when the GPU actor loads it, after the CPU stages ran.
        # Checked only where the folder exists here (see servable_problem).
        # ray_data_llm serves the folder with vLLM too: the same architectures apply.
        engine = "vllm" if self.kind in VLLM_KINDS else self.kind
        problem = servable_problem("model_path", self.model_path, engine)
        if problem:
            raise ValueError(problem)

    def sampling_for(self, attempt: int) -> tuple[float, int]:
        """``(temperature, seed)`` of attempt ``attempt`` (0-based) at the same prompt.

        Retries must not repeat the answer that failed: greedy decoding would, so retries
        sample at ``retry_temperature`` (or the configured one, if higher) with a new seed.
        """
        if attempt == 0:
            return self.temperature, self.seed
        return max(self.temperature, self.retry_temperature), self.seed + attempt

    @property
    def model_id(self) -> str:
        """The name recorded in the rows for these weights."""
        if self.model_name:
            return self.model_name
        if not self.model_path:
            return self.kind
        return Path(self.model_path.rstrip("/")).name or self.model_path
