"""Generation items: one image (or a reference video's first frame) and its prompt.

A manifest (JSONL, JSON list, CSV or Parquet; local path or URI) has one item per row::

    id               unique item id (output folder name)
    prompt           the global prompt c (required)
    image            input image path/URI; optional when reference_video is given
    reference_video  SA-V-128 / Image-Animation-Bench style ground truth: frame 0 is the
                     input image when no image is given; metrics compare against it
    subset           e.g. single / multi (default: from the number of objects)
    motion_prompt    given c_motion      } manual prompts: the LLM is skipped for the item
    object_prompts   given c_local       } [{name, prompt}] (JSON text in a CSV cell)
    annotation       SA-V-format masks (GT trajectories; a user-supplied trajectory)

:func:`load_items` checks every row and reports all problems with their row numbers before
any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ttm_ray.dataset.video import Video, sample_frame_indices

FIELDS = ("id", "prompt", "image", "reference_video", "subset", "motion_prompt",
          "object_prompts", "annotation")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message lists every problem with its row."""


@dataclass(frozen=True)
class GenerationItem:
    item_id: str
    prompt: str
    image: str | None = None
    reference_video: str | None = None
    subset: str | None = None
    motion_prompt: str | None = None
    object_prompts: tuple[tuple[str, str], ...] | None = None
    annotation: str | None = None

    @property
    def source(self) -> str:
        """Where the input image comes from (the image, else the reference's frame 0)."""
        return self.image or str(self.reference_video)

    def as_dict(self) -> dict[str, Any]:
        objects = None if self.object_prompts is None else [
            {"name": n, "prompt": p} for n, p in self.object_prompts]
        return {"id": self.item_id, "prompt": self.prompt, "image": self.image,
                "reference_video": self.reference_video, "subset": self.subset,
                "motion_prompt": self.motion_prompt, "object_prompts": objects,
                "annotation": self.annotation}


def _read_table(path: str) -> list[dict[str, Any]]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ttm_ray.dataset.video import open_input

    lower = path.lower()
    if lower.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    with open_input(path) as f:
        data = f.read()
    if lower.endswith(".csv"):
        import io

        return pacsv.read_csv(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8")
    if lower.endswith(".json"):
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ManifestError(f"{path}: a .json manifest must hold a list of items")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}: line {n} is not JSON: {exc}") from exc
    return rows


def _object_prompts(value: Any) -> tuple[tuple[str, str], ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise ValueError("object_prompts must be a list of {name, prompt}")
    out = []
    for i, o in enumerate(value):
        if not isinstance(o, dict) or not str(o.get("name") or "").strip() \
                or not str(o.get("prompt") or "").strip():
            raise ValueError(f"object_prompts[{i}] needs a non-empty name and prompt")
        out.append((str(o["name"]).strip(), str(o["prompt"]).strip()))
    return tuple(out)


def item_from_row(row: dict[str, Any]) -> GenerationItem:
    """One manifest row -> an item (ValueError naming the field)."""
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {list(FIELDS)}")
    item_id = str(row.get("id") or "").strip()
    if not item_id:
        raise ValueError("id: required")
    prompt = " ".join(str(row.get("prompt") or "").split())
    if not prompt:
        raise ValueError("prompt: required (the global prompt c)")
    if not (row.get("image") or row.get("reference_video")):
        raise ValueError("image or reference_video: one is required (the input image)")

    def opt(key: str) -> str | None:
        v = row.get(key)
        return None if v is None or str(v).strip() == "" else str(v).strip()

    try:
        objects = _object_prompts(row.get("object_prompts"))
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"object_prompts: {exc}") from exc
    return GenerationItem(item_id, prompt, opt("image"), opt("reference_video"), opt("subset"),
                          opt("motion_prompt"), objects, opt("annotation"))


def load_items(path: str) -> list[GenerationItem]:
    """All items of a manifest; :class:`ManifestError` listing every bad row."""
    try:
        rows = _read_table(path)
    except ManifestError:
        raise
    except Exception as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {type(exc).__name__}: "
                            f"{exc}") from exc
    items, problems, seen = [], [], set()
    for n, row in enumerate(rows, start=1):
        try:
            item = item_from_row(row)
        except ValueError as exc:
            problems.append(f"{path}: item {n}: {exc}")
            continue
        if item.item_id in seen:
            problems.append(f"{path}: item {n}: duplicate id {item.item_id!r}")
        seen.add(item.item_id)
        items.append(item)
    if problems:
        raise ManifestError("\n".join(problems))
    if not items:
        raise ManifestError(f"{path}: the manifest has no items")
    return items


@dataclass
class LoadedItem:
    """An item's pixels: the input image and, for a reference video, the frames sampled at
    the clip's fps (the reference for metrics) and their indices (for GT masks)."""

    image: np.ndarray  # uint8 [H, W, 3]
    frame_indices: list[int]
    reference: np.ndarray | None  # uint8 [T, H, W, 3]


def load_pixels(item: GenerationItem, num_frames: int, fps: float | None) -> LoadedItem:
    """Decode the item's image (and reference frames). Raises VideoReadError naming the file.

    A reference video shorter than ``num_frames`` samples gives as many frames as it has.
    """
    if item.reference_video is None:
        with Video(item.source) as v:
            return LoadedItem(v.read([0])[0], [0], None)
    with Video(item.reference_video) as v:
        indices = sample_frame_indices(v.info.fps, 0, num_frames, fps)
        indices = [i for i in indices if i < v.info.num_frames]
        reference = v.read(indices)
    if item.image:
        with Video(item.image) as img:
            image = img.read([0])[0]
    else:
        image = reference[0]
    return LoadedItem(image, indices, reference)


def annotation_request(item: GenerationItem, frame_indices: list[int], want_llm: bool = False,
                       need_motion: bool = True) -> dict[str, Any]:
    """The item as a request to the front-end (:mod:`ttm_ray.inference.annotation`)."""
    objects = None if item.object_prompts is None else [
        {"name": n, "prompt": p} for n, p in item.object_prompts]
    # The frames the masks are read for: the image alone, or the reference's sampled clip.
    source = item.reference_video if item.reference_video and not item.image else item.source
    indices = frame_indices if source == item.reference_video else [0]
    return {"item_id": item.item_id, "source_uri": source, "frame_indices": list(indices),
            "caption": item.prompt, "motion_prompt": item.motion_prompt,
            "object_prompts": objects, "annotation_uri": item.annotation,
            "want_llm": bool(want_llm), "need_motion": bool(need_motion)}


__all__ = ["FIELDS", "GenerationItem", "LoadedItem", "ManifestError", "annotation_request",
           "item_from_row", "load_items", "load_pixels"]
