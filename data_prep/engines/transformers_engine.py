"""The transformers engine: a local model folder, batched ``generate`` on CPU or GPU.

A folder whose config has a ``vision_config`` is a vision-language model: it loads with
``AutoProcessor`` + ``AutoModelForImageTextToText`` and takes images; any other folder is a
text model (``AutoTokenizer`` + ``AutoModelForCausalLM``). Never touches the model hub.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.engines.base import (
    Answer,
    ChatRequest,
    EngineLoadError,
    check_request,
    isolate_failures,
)
from data_prep.engines.config import EngineConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def check_model_folder(path: str | None, key: str = "engine.model_path") -> Path:
    """``path`` as a folder holding a transformers ``config.json``, or a clear error."""
    if not path:
        raise EngineLoadError(f"{key} is not set: give the local folder of the model")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise EngineLoadError(f"{key}: model folder {folder} does not exist (fix {key})")
    if not folder.is_dir():
        raise EngineLoadError(f"{key}: {folder} is a file, expected a model folder (fix {key})")
    if not (folder / "config.json").is_file():
        raise EngineLoadError(
            f"{key}: {folder} has no config.json, so it is not a transformers model folder "
            f"(save one with save_pretrained, or fix {key})"
        )
    return folder


def conversation(request: ChatRequest, vision: bool) -> list[dict[str, Any]]:
    """Chat messages for a request; VLM content is a list of image and text parts.

    Text-only models get plain string content, since many text chat templates (Llama 3.1's
    among them) only accept strings.
    """
    from PIL import Image

    messages: list[dict[str, Any]] = []
    if request.system:
        system: Any = [{"type": "text", "text": request.system}] if vision else request.system
        messages.append({"role": "system", "content": system})
    if vision:
        parts: list[dict[str, Any]] = [
            {"type": "image", "image": Image.fromarray(im)} for im in request.images
        ]
        parts.append({"type": "text", "text": request.user})
        messages.append({"role": "user", "content": parts})
    else:
        messages.append({"role": "user", "content": request.user})
    return messages


class TransformersEngine:
    """Batched chat generation with a local transformers model."""

    name = "transformers"

    def __init__(self, cfg: EngineConfig) -> None:
        import torch
        from transformers import AutoConfig

        self.cfg = cfg
        self.model_id = cfg.model_id
        folder = check_model_folder(cfg.model_path)
        try:
            hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise EngineLoadError(
                f"engine.model_path: cannot read the model config in {folder}: {exc}"
            ) from exc
        self.vision = getattr(hf_config, "vision_config", None) is not None
        if cfg.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = cfg.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise EngineLoadError("engine.device is 'cuda' but CUDA is not available here")
        dtype: Any = _DTYPES.get(cfg.dtype)
        if dtype is None:  # "auto": bf16 on GPUs, fp32 on CPUs (CPU bf16 matmuls are slow)
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        try:
            self._load(folder, getattr(torch, dtype))
        except EngineLoadError:
            raise
        except Exception as exc:
            raise EngineLoadError(
                f"engine.model_path: loading the model from {folder} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _load(self, folder: Path, dtype: Any) -> None:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        kwargs = dict(local_files_only=True, **self.cfg.engine_kwargs)
        if self.vision:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = self.processor.tokenizer
            model_cls: Any = AutoModelForImageTextToText
        else:
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model_cls = AutoModelForCausalLM
        # Decoder-only batches must be left-padded, or new tokens follow pad tokens.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.chat_template is None and (
            self.processor is None or getattr(self.processor, "chat_template", None) is None
        ):
            raise EngineLoadError(
                f"engine.model_path: {folder} has no chat template (an instruct/chat model "
                "is needed; base models are not supported)"
            )
        self.model = model_cls.from_pretrained(folder, dtype=dtype, **kwargs).to(self.device)
        self.model.eval()
        log.info("transformers engine: %s (%s) on %s, vision=%s", self.model_id, folder,
                 self.device, self.vision)

    # ------------------------------------------------------------------------ generation
    def _sampling(self, r: ChatRequest) -> tuple[int, float, int]:
        max_new = r.max_new_tokens or self.cfg.max_new_tokens
        temp = self.cfg.temperature if r.temperature is None else r.temperature
        seed = self.cfg.seed if r.seed is None else r.seed
        return max_new, temp, (seed if temp > 0 else 0)

    def generate(self, requests: list[ChatRequest]) -> list[Answer]:
        answers: dict[int, Answer] = {}
        # One generate() call per sampling setting: HF applies one setting to a whole batch.
        groups: dict[tuple[int, float, int], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            bad = check_request(self.name, r, self.vision)
            if bad is not None:
                answers[i] = bad
            else:
                groups[self._sampling(r)].append(i)
        for key, idx in groups.items():
            for start in range(0, len(idx), self.cfg.batch_size):
                chunk = idx[start:start + self.cfg.batch_size]
                answers.update(isolate_failures(
                    self.name, lambda sub, key=key: self._run(requests, sub, *key), chunk
                ))
        return [answers[i] for i in range(len(requests))]

    def _run(self, requests: list[ChatRequest], idx: Sequence[int], max_new: int, temp: float,
             seed: int) -> list[str]:
        import torch

        convs = [conversation(requests[i], self.vision) for i in idx]
        common: dict[str, Any] = dict(add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt")
        if self.processor is not None:
            inputs = self.processor.apply_chat_template(
                convs, processor_kwargs={"padding": True, "padding_side": "left"}, **common
            )
        else:
            inputs = self.tokenizer.apply_chat_template(convs, padding=True, **common)
        inputs = inputs.to(self.device)
        gen: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id)
        if temp > 0:
            torch.manual_seed(seed)
            gen.update(do_sample=True, temperature=temp)
        else:
            # Explicit, so a model's generation_config cannot turn sampling on behind our back.
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens,
                                                                skip_special_tokens=True)]
