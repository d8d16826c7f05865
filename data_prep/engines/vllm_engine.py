"""The vLLM engine: the production path on GPU nodes.

The production captioner is Qwen2.5-VL-7B-Instruct (``Qwen2_5_VLForConditionalGeneration``);
Llama-3.2-Vision (``MllamaForConditionalGeneration``) is no longer served by current vLLM and
runs through the transformers engine instead. ``EngineConfig.validate`` refuses a folder whose
architecture the configured engine cannot serve (``ttm_ray.model_folders.servable_problem``).

``vllm`` is CUDA-only and never installed in the CPU test env, so it is imported inside
:class:`VllmEngine` only. The config mappings (:func:`vllm_llm_kwargs`,
:func:`ray_data_llm_processor_config`, used by :mod:`data_prep.engines.ray_llm`), the
message building and the sampling parameters are pure functions, tested
without vLLM. The real-model test is ``tests/data_prep/test_engines.py::test_vllm_engine_gpu``
(``@pytest.mark.gpu``): it runs on a CUDA machine with ``vllm`` installed and skips, saying
why, anywhere else.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.engines.base import (
    Answer,
    ChatRequest,
    EngineLoadError,
    check_request,
    isolate_failures,
)
from data_prep.engines.config import EngineConfig
from ttm_ray.config.resources import StageResources

log = logging.getLogger(__name__)

#: vLLM defaults that differ from vLLM's own, each overridable through ``engine_kwargs``.
VLLM_DEFAULTS: dict[str, Any] = {
    # Our prompts are < 2k tokens; a model's native 128k context would make vLLM reserve KV
    # cache for it (or refuse to start on one GPU).
    "max_model_len": 4096,
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.9,
}


def vllm_llm_kwargs(cfg: EngineConfig) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (``engine_kwargs`` win over the defaults)."""
    kwargs: dict[str, Any] = {"model": cfg.model_path, "dtype": cfg.dtype, "seed": cfg.seed}
    kwargs.update(VLLM_DEFAULTS)
    kwargs.update(cfg.engine_kwargs)
    return kwargs


def ray_data_llm_processor_config(
    cfg: EngineConfig, resources: StageResources | None = None, has_image: bool = False
) -> dict[str, Any]:
    """Keyword arguments for ``ray.data.llm.vLLMEngineProcessorConfig`` (Ray 2.60 names).

    Runs the same model through Ray's own LLM batch processor instead of our stage
    (``engine.kind: ray_data_llm``, :mod:`data_prep.engines.ray_llm`).
    Ray 2.60 dropped ``has_image``: images are enabled with ``prepare_multimodal_stage``.
    GPUs per replica come from ``tensor_parallel_size``; ``placement_group_config`` sets the
    per-worker bundle from the stage's ``resources`` (``num_gpus``/``num_cpus``).
    """
    res = resources or StageResources(num_gpus=1.0)
    engine_kwargs = {k: v for k, v in vllm_llm_kwargs(cfg).items() if k != "model"}
    out: dict[str, Any] = {
        "model_source": cfg.model_path,
        "engine_kwargs": engine_kwargs,
        "concurrency": (res.min_actors, res.max_actors),
        "batch_size": cfg.batch_size,
        "prepare_multimodal_stage": has_image,
        # A request vLLM refuses (a too long prompt, an image it cannot read) must reject its
        # row (engine_error), not fail the block with every other row in it.
        "should_continue_on_error": True,
        "placement_group_config": {
            "bundle_per_worker": {"CPU": res.num_cpus, "GPU": res.num_gpus},
        },
    }
    if res.accelerator_type:
        out["accelerator_type"] = res.accelerator_type
    return out


def image_data_uri(image: np.ndarray, quality: int = 92) -> str:
    """An HxWx3 uint8 frame as a JPEG ``data:`` URI (the OpenAI image_url form vLLM reads)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def vllm_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for ``LLM.chat`` (images first, as VLM templates expect).

    This is the one form vLLM's chat API takes for every multimodal model: vLLM decodes the
    ``image_url`` parts into its ``multi_modal_data`` and, for templates that loop over
    content parts (Qwen2.5-VL's, the production captioner), detects the "openai" content
    format and lets the template place ``<|vision_start|><|image_pad|><|vision_end|>`` where
    the part was; for string-only templates it inserts the model's image placeholder itself.
    So no per-model prompt string is built here.
    """
    return chat_messages(request.user, [image_data_uri(im) for im in request.images],
                         request.system)


def chat_messages(user: str, image_urls: Sequence[str] = (),
                  system: str | None = None) -> list[dict[str, Any]]:
    """:func:`vllm_messages` from already encoded images (the Ray Data LLM processor keeps
    the data URIs between attempts instead of decoding the frames again)."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    if image_urls:
        content: Any = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        content.append({"type": "text", "text": user})
    else:
        content = user
    messages.append({"role": "user", "content": content})
    return messages


def sampling_params(cfg: EngineConfig, temperature: float | None = None,
                    seed: int | None = None, max_tokens: int | None = None) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments of one request (``None``: the config's);
    the seed only matters, and is only set, when sampling (greedy decoding is deterministic).
    """
    temp = cfg.temperature if temperature is None else temperature
    return {"max_tokens": max_tokens or cfg.max_new_tokens, "temperature": temp,
            "seed": (cfg.seed if seed is None else seed) if temp > 0 else None}


def _is_vision_model(path: str) -> bool:
    """Whether the weights take images (their config has a ``vision_config``).

    Remote URIs are not read here: assume they do, and let vLLM refuse images per request.
    """
    config = Path(path).expanduser() / "config.json"
    if "://" in path or not config.is_file():
        return True
    try:
        return "vision_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True


class VllmEngine:
    """``vllm.LLM(...).chat`` with one ``SamplingParams`` per request."""

    name = "vllm"

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.model_id = cfg.model_id
        path = cfg.model_path or ""
        if not path:
            raise EngineLoadError("engine.model_path is not set: give the model folder or URI")
        if "://" not in path and not Path(path).expanduser().is_dir():
            raise EngineLoadError(
                f"engine.model_path: model folder {path} does not exist (fix engine.model_path)"
            )
        try:
            import vllm
        except ImportError as exc:
            raise EngineLoadError(
                "engine.kind is 'vllm' but the vllm package is not installed (GPU images only: "
                "pip install 'ttm-ray[gpu]'); on CPU use engine.kind: transformers"
            ) from exc
        self._vllm = vllm
        self.vision = _is_vision_model(path)
        self.llm = vllm.LLM(**vllm_llm_kwargs(cfg))

    def _params(self, r: ChatRequest) -> Any:
        return self._vllm.SamplingParams(
            **sampling_params(self.cfg, r.temperature, r.seed, r.max_new_tokens))

    def generate(self, requests: list[ChatRequest]) -> list[Answer]:
        answers: dict[int, Answer] = {}
        ok: list[int] = []
        for i, r in enumerate(requests):
            bad = check_request(self.name, r, self.vision)
            if bad is not None:
                answers[i] = bad
            else:
                ok.append(i)

        def run(idx: Sequence[int]) -> list[str]:
            outputs = self.llm.chat(
                [vllm_messages(requests[i]) for i in idx],
                sampling_params=[self._params(requests[i]) for i in idx],
                use_tqdm=False,
            )
            return [o.outputs[0].text.strip() for o in outputs]

        # vLLM schedules its own batches; a whole stage batch goes in one call.
        answers.update(isolate_failures(self.name, run, ok))
        return [answers[i] for i in range(len(requests))]
