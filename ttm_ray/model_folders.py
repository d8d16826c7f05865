"""One rule for "a model folder saved with ``save_pretrained``", shared by every side.

A model folder holds ``config.json`` and at least one weights file. A pipeline folder may hold
the component under a subfolder (``vae/``, ``text_encoder/``), so lookups try those too.
Loading code, the plan and the preflights all find folders through :func:`model_folder`, so
they cannot disagree on what counts as "there".
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def model_folder(path: str | Path, subfolders: tuple[str, ...] = ()) -> Path | None:
    """``path`` or ``path/<sub>`` (first that holds a ``config.json``), else None."""
    root = Path(path).expanduser()
    return next((d for d in (root, *(root / s for s in subfolders))
                 if (d / "config.json").is_file()), None)


def has_weights(folder: Path) -> bool:
    """Any weights file (sharded or not) directly in ``folder``."""
    return any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in folder.iterdir())


def weights_problem(key: str, path: str | None, what: str,
                    subfolders: tuple[str, ...] = ()) -> str | None:
    """Why ``path`` (config key ``key``) is not a usable model folder, or None.

    ``what`` names the expected model for the message ("an AutoencoderKLCosmos").
    """
    fix = f"put {what} saved with save_pretrained (config.json + weights) there or change {key}"
    if not path:
        return f"{key} is not set: {fix}"
    if "://" in path:
        return None  # a URI is resolved by the loader on the node that reads it
    root = Path(path).expanduser()
    if not root.exists():
        return f"{key}: {root} does not exist: {fix}"
    folder = model_folder(root, subfolders)
    if folder is None:
        where = " nor ".join([str(root / "config.json")] + [str(root / s / "config.json")
                                                          for s in subfolders])
        return f"{key}: no {where}: {fix}"
    if not has_weights(folder):
        return (f"{key}: {folder} has config.json but no weights file "
                f"({', '.join(WEIGHT_SUFFIXES)}): {fix}")
    return None


# ------------------------------------------------------------------ architectures
#: The vLLM release :data:`VLLM_ARCHITECTURES` was taken from (vllm's model registry,
#: ``vllm/model_executor/models/registry.py``). pyproject's ``gpu`` extra requires >= this.
VLLM_ARCHITECTURES_FROM = "0.11.0"

#: The architectures our stages rely on that vLLM serves: the vision-language models a
#: caption stage may use and the text LLMs of the prompt stage. Used only where vllm is not
#: importable (CPU machines, laptops), so a config can be checked before it reaches a GPU node.
#: Every entry was checked on 2026-12-07 against vLLM's main-branch registry (commit
#: 0002bff0, ``_TEXT_GENERATION_MODELS`` / ``_MULTIMODAL_MODELS``).
#: ``MllamaForConditionalGeneration`` (Llama-3.2-Vision) is deliberately absent: that registry
#: lists it under ``_PREVIOUSLY_SUPPORTED_MODELS`` (last in 0.10.2); it stays available
#: through ``engine.kind: transformers``.
VLLM_ARCHITECTURES: frozenset[str] = frozenset({
    # vision-language (caption)
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
    "Gemma3ForConditionalGeneration",
    "InternVLChatModel",
    "PaliGemmaForConditionalGeneration",
    # text (prompts)
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
})

#: What the fix of an unservable vLLM model suggests.
VLLM_SUGGESTED = "Qwen2.5-VL-7B-Instruct (Qwen2_5_VLForConditionalGeneration)"


def read_config(folder: str | Path) -> dict:
    """``folder/config.json`` as a dict; a ValueError naming the file when it is missing or
    unreadable (callers prefix the config key)."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist, so {Path(folder)} is not a model folder "
                         "saved with save_pretrained")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def architectures(config: dict) -> list[str]:
    """The classes a ``config.json`` names: transformers' ``architectures`` list, or the one
    diffusers ``_class_name``; empty when it names none."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not archs and isinstance(config.get("_class_name"), str):
        archs = [config["_class_name"]]
    return [str(a) for a in archs]


def vllm_architectures() -> tuple[frozenset[str], str]:
    """Architectures vLLM serves and where that answer came from.

    The installed vllm's own registry when it imports (the truth for the node it runs on);
    else the shipped :data:`VLLM_ARCHITECTURES`.
    """
    try:
        from vllm import ModelRegistry  # type: ignore[import-not-found]

        return frozenset(ModelRegistry.get_supported_archs()), "the installed vllm's registry"
    except Exception:  # not installed (CPU env), or a broken CUDA import: use the shipped list
        return VLLM_ARCHITECTURES, (f"the list shipped in ttm_ray/model_folders.py (taken from "
                                    f"vLLM {VLLM_ARCHITECTURES_FROM}; vllm is not importable "
                                    "here)")


def transformers_architectures(vision: bool) -> frozenset[str]:
    """Classes the transformers engine loads: ``AutoModelForImageTextToText`` for folders with
    a ``vision_config``, ``AutoModelForCausalLM`` otherwise (what the engine itself picks)."""
    from transformers.models.auto import modeling_auto as auto

    names = (auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if vision
             else auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    out: set[str] = set()
    for value in names.values():
        out.update([value] if isinstance(value, str) else value)
    return frozenset(out)


def servable_problem(key: str, path: str | None, engine: str) -> str | None:
    """Why the model folder ``path`` (config key ``key``) cannot be served by ``engine``
    (``vllm`` or ``transformers``), or None.

    Only folders that exist here are read: production paths (``/mnt/models/...``) usually
    exist only on the cluster, and URIs are resolved by the loader, so those pass (the job's
    own load, and ``ttm-ray models check`` on a cluster node, catch them there).
    """
    if not path or "://" in path or engine not in ("vllm", "transformers"):
        return None
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    try:
        config = read_config(root)
    except ValueError as exc:
        return f"{key}: {exc}: point {key} at a model folder (config.json + weights)"
    found = architectures(config)
    if engine == "vllm":
        supported, source = vllm_architectures()
        fix = (f"use a model vLLM serves (e.g. {VLLM_SUGGESTED}) or set the engine's kind: "
               "transformers")
    else:
        vision = "vision_config" in config
        supported = transformers_architectures(vision)
        source = ("transformers' AutoModelForImageTextToText" if vision
                  else "transformers' AutoModelForCausalLM")
        fix = "use a chat model transformers loads with that class, or set the engine's kind: vllm"
    if not found:
        return (f"{key}: {root / 'config.json'} names no architectures, so {engine} cannot "
                f"tell which model it is: {fix}")
    if not any(a in supported for a in found):
        return (f"{key}: {root} holds {', '.join(found)}, which {engine} cannot serve "
                f"(checked against {source}): {fix}")
    return None


__all__ = [
    "VLLM_ARCHITECTURES",
    "VLLM_ARCHITECTURES_FROM",
    "WEIGHT_SUFFIXES",
    "architectures",
    "has_weights",
    "model_folder",
    "read_config",
    "servable_problem",
    "transformers_architectures",
    "vllm_architectures",
    "weights_problem",
]
