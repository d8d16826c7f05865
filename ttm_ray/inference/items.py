"""Generation items: one image (or a reference video's first frame) and its prompt.

A manifest (JSONL, JSON list, CSV or Parquet; local path or URI) has one item per row::

    id               unique item id (output folder name); required here, since a benchmark's
                     ids name its results. The one-image CLI path derives one when none is
                     given: :func:`content_id` (``<image stem>-<10 hex>``)
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

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ttm_ray.dataset.video import Video, sample_frame_indices

FIELDS = ("id", "prompt", "image", "reference_video", "subset", "motion_prompt",
          "object_prompts", "annotation")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
ID_HEX = 10  # hex digits of a derived id: 40 bits, collisions negligible within one out dir


def safe_name(text: str, default: str = "item") -> str:
    """``text`` as one filesystem-safe path component (``..`` and ``/`` cannot escape)."""
    return _UNSAFE.sub("_", text).strip("._") or default


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


def item_from_row(row: dict[str, Any],
                  id_settings: Mapping[str, Any] | None = None) -> GenerationItem:
    """One manifest row -> an item (ValueError naming the field).

    A row without an id is an error unless ``id_settings`` is given (the one-image CLI path):
    then the id is :func:`content_id` of the item and those settings.
    """
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {list(FIELDS)}")
    item_id = str(row.get("id") or "").strip()
    if not item_id and id_settings is None:
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
    item = GenerationItem(item_id, prompt, opt("image"), opt("reference_video"), opt("subset"),
                          opt("motion_prompt"), objects, opt("annotation"))
    if item_id:
        return item
    return replace(item, item_id=content_id(item, id_settings or {}))


def _file_digest(uri: str) -> str:
    """What stands for a file's content in an id: the sha256 of its bytes for a local file;
    for a remote URI its address, size and modification time (the object is not downloaded
    just to name it, yet a replaced object gets a new id). A file that cannot be read is
    named by its URI alone: the run then reports it as unreadable_input with the reason."""
    from ttm_ray.dataset.video import is_local, open_input, stat

    try:
        if not is_local(uri):
            size, mtime = stat(uri)
            return f"uri:{uri}:{size}:{mtime}"
        digest = hashlib.sha256()
        with open_input(uri) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return f"sha256:{digest.hexdigest()}"
    except (OSError, ValueError):
        return f"uri:{uri}"


def content_id(item: GenerationItem, settings: Mapping[str, Any]) -> str:
    """A readable id that changes whenever the item's output would: ``<stem>-<10 hex>``.

    The stem is the input image's (else the reference video's) file name; the hex digits are
    a sha256 over the input files' content (:func:`_file_digest`: image, reference video,
    annotation), the prompts as the pipeline reads them and ``settings``, the caller's
    output-changing configuration (JSON data). The same input and settings give the same id,
    so a rerun finds its finished folder and skips it; any other input gets a folder of its
    own instead of an earlier input's video. ``item.item_id`` is ignored.
    """
    files = {key: None if uri is None else _file_digest(uri) for key, uri in (
        ("image", item.image), ("reference_video", item.reference_video),
        ("annotation", item.annotation))}
    inputs = {**item.as_dict(), **files}
    del inputs["id"]
    blob = json.dumps({"inputs": inputs, "settings": settings}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:ID_HEX]
    # The file name without folders, extension or a URI's query keeps the id short and
    # readable; the digest, not the name, tells inputs apart.
    path = urlsplit(item.source).path if "://" in item.source else item.source
    return f"{safe_name(PurePosixPath(path).stem)[:48]}-{digest}"


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


__all__ = ["FIELDS", "ID_HEX", "GenerationItem", "LoadedItem", "ManifestError",
           "annotation_request", "content_id", "item_from_row", "load_items", "load_pixels",
           "safe_name"]
