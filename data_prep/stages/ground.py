"""Ground: one first-frame box per local-prompt object name, with Grounding DINO.

The paper's segmentation recipe starts here: Grounding DINO finds one box per object name of
``c_local`` on the clip's first frame, and SAM2 (``segment.py``) turns the boxes into mask
trajectories. All names of a clip go into one query in Grounding DINO's text format
(``"red circle. blue square."``), so one forward pass grounds every object of the clip.

Mapping detections back to names: the model scores every query (candidate box) against every
text *token*. Instead of decoding phrases from tokens (``post_process_grounded_object_detection``
returns strings like ``"red circle blue"`` when activations spill over, which do not match any
name), each name owns the tokens that fall inside its character span (tokenizer offsets), and
``score(query, name) = max over the name's tokens of sigmoid(logit)``. A (query, name) pair is a
candidate when the query's box score (its max over all tokens, Grounding DINO's usual box
confidence) is ``>= box_threshold`` and the name's own score is ``>= text_threshold``. Pairs
are then matched greedily by score, one box per name and one name per box, so two similar
names ("red circle", "blue circle") never share a box; a box that overlaps an already matched
one (``dedup_iou``) counts as a duplicate detection of that object, not as another name's box.

Names without a box land in ``dropped_objects`` with a reason; a clip with no box left is
rejected ``no_object_grounded``. Exceptions (frames that do not read, a failed forward pass,
CUDA out of memory) reject only their row, with the shared reasons of
:func:`~data_prep.rows.reason_for`. Boxes are in source pixels (x0, y0, x1, y1) of the first
sampled frame. The model loads from a local folder only (``ground.model_path``: a
``save_pretrained`` copy of e.g. ``IDEA-Research/grounding-dino-tiny``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from data_prep.rows import free_cuda_memory, is_rejected, reject, reject_error
from ttm_ray.config import constrained
from ttm_ray.dataset.video import read_frames

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STAGE = "ground"
CONFIG_KEY = "ground"  # where GroundingConfig sits in the prep config (for error messages)
#: ``dropped_objects[].reason`` values written by this stage.
DROP_REASONS = {
    "empty_name": "the object name is empty once made a Grounding DINO phrase",
    "duplicate_name": "another object of the clip has the same phrase",
    "max_objects": "the clip has more objects than ground.max_objects",
    "text_too_long": "the name fell beyond the model's max_text_len tokens",
    "no_box": "no box scored above box_threshold/text_threshold for this name",
}
# A box thinner than this (source pixels) after clipping to the frame is no usable prompt.
_MIN_BOX_SIDE = 1.0


@dataclass
class GroundingConfig:
    model_path: str | None = constrained(
        None, help="local folder of a Grounding DINO checkpoint (model + processor, "
        "save_pretrained layout); required when the sam2 mask source runs")
    model_name: str | None = constrained(
        None, help="name recorded in grounding_model; null: the model folder's name")
    box_threshold: float = constrained(
        0.35, ge=0, help="min box score (max token probability of a query) to keep a box")
    text_threshold: float = constrained(
        0.25, ge=0, help="min probability of an object name's tokens for a box to be that name")
    dedup_iou: float | None = constrained(
        0.8, gt=0, le=1, help="a box overlapping an already matched box by at least this IoU "
        "is a duplicate detection of that object, not a box for another name; null: off")
    max_objects: int = constrained(
        8, gt=0, help="ground at most this many objects per clip (c_local order); the rest "
        "are dropped with reason max_objects")
    batch_size: int = constrained(4, gt=0, help="frames per Grounding DINO forward pass")
    shortest_edge: int | None = constrained(
        None, ge=32, help="resize frames so the shorter side has this many pixels (the longer "
        "at most 5/3 of it); null: the processor's own (800 for Grounding DINO). Smaller is "
        "faster and misses small objects")
    device: str = constrained(
        "auto", nonempty=True, help="torch device (cpu, cuda, cuda:1); auto: cuda if available")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = constrained(
        "auto", help="weights/activations; auto: float32 (half precision is opt-in: compare "
        "its boxes with float32 on your data first)")

    def require_model_path(self) -> Path:
        """The model folder, or a ValueError naming the config key (check before any work)."""
        key = f"{CONFIG_KEY}.model_path"
        if not self.model_path:
            raise ValueError(
                f"{key} is not set: give the local folder of a Grounding DINO checkpoint (model "
                f"+ processor saved with save_pretrained, e.g. IDEA-Research/grounding-dino-"
                f"tiny); models are never downloaded from a hub")
        path = Path(self.model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"{key}: {str(path)!r} is not a model folder (no config.json)")
        return path


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given.

    The rule is :func:`ttm_ray.evaluation.weights.resolve_device` (one place decides what
    ``auto`` means for every model of the project), imported on call: importing this module
    (and ``segment``, which uses this) must not import torch into the pipeline's CPU workers.
    """
    from ttm_ray.evaluation.weights import resolve_device as resolve

    return resolve(device)


def phrase(name: str) -> str:
    """An object name as a Grounding DINO phrase: lower case, no dots, single spaces."""
    # The dot separates phrases in Grounding DINO's text format; inside a name it would split it.
    return re.sub(r"\s+", " ", name.replace(".", " ")).strip().lower()


def build_text(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """``"a. b."`` plus each phrase's character span ``[start, end)`` in it."""
    text, spans = "", []
    for p in phrases:
        spans.append((len(text), len(text) + len(p)))
        text += p + ". "
    return text.rstrip(), spans


def token_groups(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[list[int]]:
    """For each character span, the token positions whose offsets lie inside it."""
    groups: list[list[int]] = [[] for _ in spans]
    for t, (a, b) in enumerate(offsets):
        if b <= a:  # special tokens ([CLS], [SEP], padding) have empty offsets
            continue
        for i, (s, e) in enumerate(spans):
            if s <= a and b <= e:
                groups[i].append(t)
                break
    return groups


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(
    probs: np.ndarray, groups: list[list[int]], box_threshold: float, text_threshold: float,
    boxes: Sequence[Sequence[float] | None] | None = None, dedup_iou: float | None = None,
) -> dict[int, tuple[int, float]]:
    """``{name index: (query index, score)}``: the best box per name, each box used once.

    ``probs``: ``[queries, tokens]`` sigmoid probabilities of one image; ``groups``: each
    name's token positions. Greedy matching by descending name score (deterministic, and
    optimal enough for a handful of names). With ``boxes`` and ``dedup_iou``, a box that
    overlaps an already matched box by ``IoU >= dedup_iou`` is taken for a duplicate query on
    the same object and not given to another name (Grounding DINO often has several queries
    on one object that also score a similar name, e.g. "red circle" / "red square").
    """
    box_score = probs.max(axis=1) if probs.size else np.zeros(probs.shape[0])
    pairs = []
    for i, toks in enumerate(groups):
        if not toks:
            continue
        name_score = probs[:, toks].max(axis=1)
        for q in np.nonzero((box_score >= box_threshold) & (name_score >= text_threshold))[0]:
            pairs.append((float(name_score[q]), i, int(q)))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    out: dict[int, tuple[int, float]] = {}
    used: set[int] = set()
    for score, i, q in pairs:
        if i in out or q in used:
            continue
        if boxes is not None and dedup_iou is not None and boxes[q] is not None and any(
                box_iou(boxes[q], boxes[u]) >= dedup_iou for u in used):
            continue
        out[i] = (q, score)
        used.add(q)
    return out


def to_source_box(cxcywh: np.ndarray, height: int, width: int) -> list[float] | None:
    """A normalised (cx, cy, w, h) box as source pixels (x0, y0, x1, y1), clipped; None if
    it is thinner than a pixel once clipped."""
    cx, cy, w, h = (float(v) for v in cxcywh)
    x0 = min(max((cx - w / 2) * width, 0.0), float(width))
    x1 = min(max((cx + w / 2) * width, 0.0), float(width))
    y0 = min(max((cy - h / 2) * height, 0.0), float(height))
    y1 = min(max((cy + h / 2) * height, 0.0), float(height))
    if x1 - x0 < _MIN_BOX_SIDE or y1 - y0 < _MIN_BOX_SIDE:
        return None
    return [x0, y0, x1, y1]


@dataclass
class _Job:
    """One row on its way through the model."""

    index: int  # position in the batch
    names: list[str]  # the c_local names grounded, in order
    phrases: list[str]  # the same as Grounding DINO phrases
    frame: np.ndarray  # first sampled frame, source resolution, [H, W, 3] uint8
    dropped: list[dict]  # names dropped before the model ran


class _Found(NamedTuple):
    boxes: dict[int, tuple[list[float], float]]  # name index -> (source box, score)
    reasons: dict[int, str]  # name index -> why it has no box, when not just "no_box"


class GroundingStage:
    """Rows -> rows with ``boxes``, ``dropped_objects``, ``grounding_model`` (or a reject)."""

    def __init__(self, cfg: GroundingConfig) -> None:
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.cfg = cfg
        path = cfg.require_model_path()
        self.model_name = cfg.model_name or path.resolve().name
        self.device = resolve_device(cfg.device)
        self.dtype = getattr(torch, "float32" if cfg.dtype == "auto" else cfg.dtype)
        self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(
            str(path), local_files_only=True)
        self.model = model.to(self.device, dtype=self.dtype).eval()
        # Text beyond this many tokens is cut by the model; names there are dropped instead.
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))

    def __call__(self, rows: list[dict]) -> list[dict]:
        out = list(rows)
        jobs: list[_Job] = []
        for i, row in enumerate(out):
            if is_rejected(row):
                continue
            try:
                job = self._prepare(i, row)
            except Exception as exc:  # one odd row must not take the batch down with it
                out[i] = reject_error(row, STAGE, exc, limit=6)
                continue
            if isinstance(job, dict):  # rejected while preparing
                out[i] = job
            else:
                jobs.append(job)
        for k in range(0, len(jobs), self.cfg.batch_size):
            chunk = jobs[k:k + self.cfg.batch_size]
            for j, res in zip(chunk, self._detect_safely(chunk), strict=True):
                if isinstance(res, Exception):  # its forward pass failed (alone)
                    out[j.index] = reject_error(out[j.index], STAGE, res, limit=6)
                else:
                    out[j.index] = self._finish(out[j.index], j, res)
        return out

    # ------------------------------------------------------------------ per row
    def _prepare(self, index: int, row: dict) -> _Job | dict:
        objects = row.get("c_local") or []
        if not row.get("source_uri") or not row.get("frame_indices"):
            return reject(row, STAGE, "stage_error", "row has no source_uri/frame_indices: the "
                          "clip stage must run before the ground stage")
        names, phrases, dropped = [], [], []
        for obj in objects:
            name = str(obj.get("name") or "")
            p = phrase(name)
            if not p:
                dropped.append({"name": name, "reason": "empty_name"})
            elif p in phrases:
                dropped.append({"name": name, "reason": "duplicate_name"})
            elif len(phrases) >= self.cfg.max_objects:
                dropped.append({"name": name, "reason": "max_objects"})
            else:
                names.append(name)
                phrases.append(p)
        if not phrases:
            return reject(dict(row, dropped_objects=dropped), STAGE, "no_object_grounded",
                          f"no groundable object name in c_local ({len(objects)} given)")
        frame = read_frames(row["source_uri"], [row["frame_indices"][0]])[0]
        return _Job(index, names, phrases, frame, dropped)

    def _finish(self, row: dict, job: _Job, found: _Found) -> dict:
        boxes, dropped = [], list(job.dropped)
        for i, name in enumerate(job.names):
            if i in found.boxes:
                box, score = found.boxes[i]
                boxes.append({"name": name, "box": box, "score": score})
            else:
                dropped.append({"name": name, "reason": found.reasons.get(i, "no_box")})
        row = dict(row, boxes=boxes, dropped_objects=dropped, grounding_model=self.model_name)
        if not boxes:
            detail = ", ".join(f"{d['name']!r}: {d['reason']}" for d in dropped)
            return reject(row, STAGE, "no_object_grounded",
                          f"no box for any object (box_threshold {self.cfg.box_threshold}, "
                          f"text_threshold {self.cfg.text_threshold}): {detail}")
        return row

    # ------------------------------------------------------------------ model
    def _detect_safely(self, jobs: list[_Job]) -> list[_Found | Exception]:
        """:meth:`_detect`, retried row by row when the batch fails (e.g. CUDA out of memory
        on one huge frame), so one row's failure (its exception) does not reject the others."""
        try:
            return list(self._detect(jobs))
        except Exception as exc:
            free_cuda_memory(exc)
            if len(jobs) == 1:
                return [exc]
        return [r for j in jobs for r in self._detect_safely([j])]

    def _detect(self, jobs: list[_Job]) -> list[_Found]:
        """One forward pass over ``jobs``: per job, the box found for each name."""
        import torch

        texts, all_spans = zip(*(build_text(j.phrases) for j in jobs), strict=True)
        enc = self.processor.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_text_len,
            return_offsets_mapping=True, return_token_type_ids=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping").tolist()
        size = {}
        if self.cfg.shortest_edge is not None:  # Grounding DINO's own ratio: 800 -> 1333
            edge = self.cfg.shortest_edge
            size = {"size": {"shortest_edge": edge, "longest_edge": round(edge * 1333 / 800)}}
        pixels = self.processor.image_processor(images=[j.frame for j in jobs],
                                                return_tensors="pt", **size)
        inputs = {**enc, **pixels}
        inputs = {k: (v.to(self.device, dtype=self.dtype) if v.is_floating_point()
                      else v.to(self.device)) for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        probs = torch.sigmoid(outputs.logits.float()).cpu().numpy()  # [B, queries, tokens]
        boxes = outputs.pred_boxes.float().cpu().numpy()  # [B, queries, 4] cx, cy, w, h
        results = []
        for b, job in enumerate(jobs):
            groups = token_groups([tuple(o) for o in offsets[b]], all_spans[b])
            # Logits cover max_text_len tokens; a name cut off there cannot be scored.
            n_tok = probs.shape[2]
            groups = [[t for t in g if t < n_tok] for g in groups]
            h, w = job.frame.shape[:2]
            found = _Found({}, {i: "text_too_long" for i, g in enumerate(groups) if not g})
            # Boxes too thin to prompt SAM2 are removed before matching, so a name can still
            # take its next-best box.
            pix = [to_source_box(boxes[b, q], h, w) for q in range(boxes.shape[1])]
            p = probs[b].copy()
            p[[q for q, bx in enumerate(pix) if bx is None]] = -1.0
            matched = match_boxes(p, groups, self.cfg.box_threshold, self.cfg.text_threshold,
                                  boxes=pix, dedup_iou=self.cfg.dedup_iou)
            for i, (q, score) in matched.items():
                found.boxes[i] = (pix[q], score)
            results.append(found)
        return results


__all__ = ["DROP_REASONS", "GroundingConfig", "GroundingStage", "box_iou", "build_text",
           "match_boxes", "phrase", "resolve_device", "to_source_box", "token_groups"]
