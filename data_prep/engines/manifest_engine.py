"""Manifest mode: answers that came with the input, instead of a model.

Decision: this is a *stage mode*, not a :class:`~data_prep.engines.base.TextEngine`. A
manifest answer belongs to a row, not to a prompt, so pushing it through ``generate(requests)``
would mean smuggling row columns into chat requests and pretending a model ran. Instead the
stages check ``engine.kind == "manifest"`` and call the readers below, and the rows record
``*_engine = "manifest"`` with no model and no prompt version. :func:`build_engine` refuses
this kind with a message saying so.
"""

from __future__ import annotations

from typing import Any

MANIFEST = "manifest"


class ManifestMissing(ValueError):
    """The input row did not bring the answer manifest mode needs."""


def given_caption(row: dict[str, Any], config_key: str = "caption.engine") -> str:
    """The row's ``given_caption``, stripped; :class:`ManifestMissing` when absent or blank."""
    caption = row.get("given_caption")
    if caption is None or not str(caption).strip():
        raise ManifestMissing(
            f"{config_key}.kind is 'manifest' but the input brought no caption (given_caption is "
            f"empty); give captions in the manifest, or set {config_key}.kind to 'vllm' or "
            f"'transformers' with {config_key}.model_path to caption the clips with a model"
        )
    return " ".join(str(caption).split())


def given_motion_prompt(row: dict[str, Any], config_key: str = "prompts.engine") -> str:
    text = row.get("given_motion_prompt")
    if text is None or not str(text).strip():
        raise ManifestMissing(
            f"{config_key}.kind is 'manifest' but the input brought no motion prompt "
            f"(given_motion_prompt is empty); give it in the manifest, or set {config_key}.kind "
            f"to 'vllm' or 'transformers' with {config_key}.model_path"
        )
    return str(text)


def given_object_prompts(row: dict[str, Any],
                         config_key: str = "prompts.engine") -> list[tuple[str, str]]:
    """``(name, prompt)`` pairs from ``given_object_prompts`` (a list of {name, prompt})."""
    items = row.get("given_object_prompts")
    if items is None:
        raise ManifestMissing(
            f"{config_key}.kind is 'manifest' but the input brought no object prompts "
            f"(given_object_prompts is null); give them in the manifest, or set "
            f"{config_key}.kind to 'vllm' or 'transformers' with {config_key}.model_path"
        )
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ManifestMissing(f"given_object_prompts[{i}] is not a {{name, prompt}} mapping")
        pairs.append((str(item.get("name") or ""), str(item.get("prompt") or "")))
    return pairs
