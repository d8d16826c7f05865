"""GT masks: mask trajectories from an SA-V annotation instead of Grounding DINO + SAM2.

For inputs that bring exact masks (the generated corpus; SA-V's manual annotations), the
``masks`` column is copied from the annotation at ``annotation_uri``: for each sampled frame
of the clip, the annotation's RLE of each object (the RLE strings are copied as they are, so
the masks are bit-exact). ``mask_source="gt"``, ``mask_model=None``.

Which frame: the generated corpus annotates every frame (stride 1), so each sampled frame has
its own masks. SA-V annotates every 4th frame; a sampled frame between two annotated ones
takes the *nearest* annotated frame (a tie goes to the earlier one, so a mask never shows the
future; see :meth:`~ttm_ray.dataset.sav_format.SavAnnotation.annotated_frame_for`).
``exact_frames: true`` rejects clips with a sampled frame that is not annotated instead.

Which objects (``objects``):

* ``c_local`` (default): the objects named in ``c_local``, in that order, found by name in
  ``given_object_prompts``: the generator writes masklet ``k`` for ``object_prompts[k]``,
  so a name's position there is its masklet. Names matched like Grounding DINO phrases (case
  and spacing ignored). A ``c_local`` name that is not there goes to ``dropped_objects``
  (``not_in_annotation``).
* ``all``: every masklet, in annotation order, named ``given_object_prompts[k].name`` when
  the input gave names and ``masklet_<id>`` otherwise (SA-V itself has no names).

``boxes`` are the objects' bounding boxes on the first sampled frame (source pixels x0, y0,
x1, y1, exclusive ends, score 1.0), so later stages see the same columns as after SAM2. An
object not visible on the first sampled frame is dropped (``not_in_first_frame``) by default,
as SAM2 could not have tracked it either; ``require_first_frame: false`` keeps it, with its
box from the first frame where it is visible. Objects that are empty in every sampled frame
are dropped (``empty_mask``). Rejects: ``no_gt_masks`` (no annotation, it is missing or does
not parse or does not fit the video, no object left: permanent); ``remote_read_error`` when
reading it fails otherwise (transient: a later run retries it).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from data_prep.rows import TRANSIENT, map_rows, reason_for, reject, reject_class
from data_prep.stages.ground import phrase
from ttm_ray.config import constrained
from ttm_ray.dataset.rle import decode_mask, mask_areas
from ttm_ray.dataset.sav_format import SavAnnotation, read_sav_annotation
from ttm_ray.dataset.video import is_local, local_path, open_input

STAGE = "gt_masks"
_CACHE_SIZE = 4  # annotations kept in memory: clips of one video arrive close together


@dataclass
class GtMasksConfig:
    objects: Literal["c_local", "all"] = constrained(
        "c_local", help="c_local: the objects named in c_local, matched by name to "
        "given_object_prompts (masklet k = object_prompts[k]); all: every masklet")
    exact_frames: bool = constrained(
        False, help="reject a clip with a sampled frame that is not annotated; false: use "
        "the nearest annotated frame (ties: the earlier one)")
    require_first_frame: bool = constrained(
        True, help="drop objects not visible on the clip's first sampled frame")
    max_objects: int | None = constrained(
        None, gt=0, help="keep at most this many objects per clip (in order); null: all")


def mask_box(mask: np.ndarray) -> list[float] | None:
    """Bounding box ``[x0, y0, x1, y1]`` (pixel edges, exclusive ends) of a mask; None if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if not len(ys):
        return None
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)]


def load_annotation(uri: str) -> SavAnnotation:
    """Read an SA-V annotation from a local path or any URI :mod:`~ttm_ray.dataset.video`
    reads (``s3://``, ``gs://``, ...)."""
    if is_local(uri):
        return read_sav_annotation(local_path(uri))
    with open_input(uri) as f:
        data = json.loads(f.read().decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: expected a JSON object, got {type(data).__name__}")
    return read_sav_annotation(data)


class _NoMasks(Exception):
    """This row has no usable GT masks (the message says why)."""


class GtMasksStage:
    """Rows with ``annotation_uri`` -> rows with GT ``masks`` and ``boxes``, or a reject."""

    def __init__(self, cfg: GtMasksConfig | None = None) -> None:
        self.cfg = cfg or GtMasksConfig()
        self._cache: OrderedDict[str, SavAnnotation] = OrderedDict()

    def __call__(self, rows: list[dict]) -> list[dict]:
        return map_rows(rows, STAGE, self._masks, expected={_NoMasks: "no_gt_masks"})

    def _annotation(self, uri: str) -> SavAnnotation:
        if uri in self._cache:
            self._cache.move_to_end(uri)
            return self._cache[uri]
        try:
            ann = load_annotation(uri)
        except (OSError, ValueError) as exc:  # missing file, bad JSON, malformed annotation
            if isinstance(exc, OSError) and reject_class(reason_for(exc)) == TRANSIENT:
                raise  # a read hiccup is not a missing annotation: a later run retries it
            raise _NoMasks(f"annotation {uri} does not read: {type(exc).__name__}: {exc}") from exc
        self._cache[uri] = ann
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return ann

    def _masks(self, row: dict) -> dict:
        uri = row.get("annotation_uri")
        if not uri:
            raise _NoMasks("the input has no annotation (annotation_uri is null)")
        indices = [int(i) for i in row.get("frame_indices") or []]
        if not indices:
            raise _NoMasks("row has no frame_indices: the clip stage must run first")
        ann = self._annotation(uri)
        size = (row.get("src_height"), row.get("src_width"))
        if None not in size and tuple(size) != ann.size:
            raise _NoMasks(f"annotation {uri} is {ann.width}x{ann.height}, the video "
                           f"{size[1]}x{size[0]}: masks must be at source resolution")
        try:
            annotated = [ann.annotated_frame_for(f, exact=self.cfg.exact_frames)
                         for f in indices]
        except (IndexError, ValueError) as exc:
            raise _NoMasks(f"annotation {uri}: {exc}") from exc
        chosen, dropped = self._objects(row, ann)
        masks, boxes = [], []
        for name, k in chosen:
            rles = [ann.masklet[a][k] for a in annotated]
            areas = mask_areas(rles)
            if not any(areas):
                dropped.append({"name": name, "reason": "empty_mask"})
                continue
            if not areas[0] and self.cfg.require_first_frame:
                dropped.append({"name": name, "reason": "not_in_first_frame"})
                continue
            first = next(i for i, a in enumerate(areas) if a)
            box = mask_box(decode_mask(rles[first]))
            masks.append({"name": name, "color_index": len(masks),
                          "rle": [{"size": list(r["size"]), "counts": r["counts"]}
                                  for r in rles]})
            boxes.append({"name": name, "box": box, "score": 1.0})
        if self.cfg.max_objects is not None:
            dropped += [{"name": m["name"], "reason": "max_objects"}
                        for m in masks[self.cfg.max_objects:]]
            masks, boxes = masks[:self.cfg.max_objects], boxes[:self.cfg.max_objects]
        row = dict(row, masks=masks, boxes=boxes, dropped_objects=dropped, mask_source="gt",
                   mask_model=None, grounding_model=None)
        if not masks:
            detail = ", ".join(f"{d['name']!r}: {d['reason']}" for d in dropped)
            return reject(row, STAGE, "no_gt_masks", f"no object left in {uri}: {detail}")
        return row

    def _objects(self, row: dict, ann: SavAnnotation) -> tuple[list[tuple[str, int]],
                                                               list[dict]]:
        """``[(name, masklet index)]`` to take, and the names dropped on the way."""
        given = [str(o.get("name") or "") for o in row.get("given_object_prompts") or []]
        if self.cfg.objects == "all":
            if given and len(given) != ann.num_objects:
                raise _NoMasks(f"{len(given)} given object prompts but {ann.num_objects} "
                               f"masklets in {row['annotation_uri']}")
            names = given or [f"masklet_{i}" for i in ann.object_ids]
            return list(zip(names, range(ann.num_objects), strict=True)), []
        if not given:
            raise _NoMasks("objects: c_local needs given_object_prompts (masklet k is "
                           "object_prompts[k]) to find masks by name; the input has none "
                           "(gt_masks.objects: all takes every masklet)")
        if len(given) != ann.num_objects:
            raise _NoMasks(f"{len(given)} given object prompts but {ann.num_objects} masklets "
                           f"in {row['annotation_uri']}: cannot map names to masklets")
        index = {phrase(n): k for k, n in enumerate(given)}
        chosen, dropped, seen = [], [], set()
        for obj in row.get("c_local") or []:
            name = str(obj.get("name") or "")
            k = index.get(phrase(name))
            if k is None:
                dropped.append({"name": name, "reason": "not_in_annotation"})
            elif k in seen:
                dropped.append({"name": name, "reason": "duplicate_name"})
            else:
                seen.add(k)
                chosen.append((name, k))
        return chosen, dropped


__all__ = ["GtMasksConfig", "GtMasksStage", "load_annotation", "mask_box"]
