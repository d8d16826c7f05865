"""The one interface every model engine offers: chat requests in, one answer per request out.

Failures are per request: :meth:`TextEngine.generate` returns an :class:`EngineError` in the
slot of a request that failed instead of raising, so a stage can reject that one row and keep
the rest of its batch. :func:`isolate_failures` gives engines that behaviour for free: run the
whole batch, and only if that raises, run the requests one by one to find the bad ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class ChatRequest:
    """One single-turn chat: an optional system message, a user message and its images.

    ``None`` sampling fields mean "use the engine config's value". ``seed`` only matters when
    ``temperature > 0`` (greedy decoding is deterministic).
    """

    user: str
    system: str | None = None
    images: list[np.ndarray] = field(default_factory=list)  # each HxWx3 uint8 (RGB)
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None


class EngineError(RuntimeError):
    """A request the engine could not answer; returned in that request's slot, not raised."""

    def __init__(self, engine: str, message: str) -> None:
        self.engine = engine
        super().__init__(f"{engine}: {message}")


class EngineLoadError(RuntimeError):
    """The engine could not start (bad model path, missing package): a config problem."""


Answer = str | EngineError


@runtime_checkable
class TextEngine(Protocol):
    """What the caption and prompt stages need from a model."""

    name: str  # the backend ("transformers", "vllm"), recorded in the rows
    model_id: str  # which weights, recorded in the rows

    def generate(self, requests: list[ChatRequest]) -> list[Answer]:
        """One answer per request, in order: the new text only, or an :class:`EngineError`."""
        ...


def check_image(image: object) -> str | None:
    """Why ``image`` is not an HxWx3 uint8 array, or ``None`` when it is one."""
    if not isinstance(image, np.ndarray):
        return f"image is a {type(image).__name__}, expected a numpy array"
    if image.ndim != 3 or image.shape[2] != 3:
        return f"image has shape {image.shape}, expected HxWx3"
    if image.dtype != np.uint8:
        return f"image has dtype {image.dtype}, expected uint8"
    if image.shape[0] < 1 or image.shape[1] < 1:
        return f"image has shape {image.shape}, which is empty"
    return None


def check_request(engine: str, request: ChatRequest, vision: bool) -> EngineError | None:
    """Input problems that are the request's fault: reported for that row only."""
    if not isinstance(request.user, str) or not request.user.strip():
        return EngineError(engine, "empty user message")
    if request.images and not vision:
        return EngineError(
            engine, f"the model is text-only but the request carries {len(request.images)} "
            "image(s); point engine.model_path at a vision-language model"
        )
    for i, image in enumerate(request.images):
        problem = check_image(image)
        if problem:
            return EngineError(engine, f"image {i}: {problem}")
    return None


def isolate_failures(
    engine: str,
    run_batch: Callable[[Sequence[int]], list[str]],
    indices: Sequence[int],
) -> dict[int, Answer]:
    """Answers for ``indices`` via ``run_batch``; a failing batch is retried one by one.

    The batch call is the fast path. When it raises we cannot tell which request was at fault
    (a too-long prompt, an image the processor rejects...), so each request runs alone and
    only the ones that still fail get an :class:`EngineError`.
    """
    if not indices:
        return {}
    try:
        answers = run_batch(indices)
        if len(answers) != len(indices):
            raise RuntimeError(f"engine returned {len(answers)} answers for {len(indices)}")
        return dict(zip(indices, answers, strict=True))
    except Exception as exc:
        if len(indices) == 1:
            return {indices[0]: EngineError(engine, f"{type(exc).__name__}: {exc}")}
        log.warning("%s: a batch of %d failed (%s); retrying one by one", engine, len(indices),
                    exc)
    out: dict[int, Answer] = {}
    for i in indices:
        out.update(isolate_failures(engine, run_batch, [i]))
    return out


def generate_safely(engine: TextEngine, requests: list[ChatRequest]) -> list[Answer]:
    """``engine.generate`` for a stage: whatever goes wrong becomes per-request errors.

    Engines already report per request; this also covers an engine that raises anyway
    (CUDA errors, a bug) or answers the wrong number of requests, so the stage can reject
    the affected rows with the reason instead of losing the whole batch to ``stage_error``.
    """
    if not requests:
        return []
    try:
        answers = list(engine.generate(requests))
    except Exception as exc:
        log.exception("%s: generate raised on %d requests", engine.name, len(requests))
        return [EngineError(engine.name, f"{type(exc).__name__}: {exc}")] * len(requests)
    if len(answers) != len(requests):
        err = EngineError(engine.name, f"{len(answers)} answers for {len(requests)} requests")
        return [err] * len(requests)
    return [a if isinstance(a, (str, EngineError)) else EngineError(engine.name, repr(a))
            for a in answers]
