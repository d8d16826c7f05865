"""Prompts: from the caption ``c``, the motion prompt ``c_motion`` and object prompts ``c_local``.

Both come from one frozen LLM (the paper: Llama-3.1-8B) with the appendix prompts, Fig. 11
(``motion_v1``) and Fig. 12 (``local_v1``). Each answer is parsed strictly
(:mod:`data_prep.parsing`); an unusable answer is asked again, sampling with a new seed, up
to ``max_attempts`` times per prompt. The raw answers are kept (``llm_raw_motion``,
``llm_raw_local``: the last answer of each; a reject's ``reject_detail`` holds every attempt).

Rejects: ``unparseable_llm_output`` (no parseable answer after all attempts), ``no_objects``
(the object answer, last time, named no object), ``prompts_failed`` (manifest mode found no /
invalid given prompts), all permanent; ``engine_error`` (the engine failed on every attempt of
a prompt: transient), ``stage_error`` (no caption).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from data_prep.engines import EngineConfig, build_engine
from data_prep.engines.base import ChatRequest, EngineError, TextEngine, generate_safely
from data_prep.engines.manifest_engine import (
    MANIFEST,
    ManifestMissing,
    given_motion_prompt,
    given_object_prompts,
)
from data_prep.parsing import (
    LlmParseError,
    ObjectPrompt,
    parse_local_prompts,
    parse_motion_prompt,
    validate_object_prompts,
)
from data_prep.prompts import Template, load_template
from data_prep.rows import is_rejected, reject
from ttm_ray.config import constrained

STAGE = "prompts"
TASKS = ("motion", "local")
_RAW_KEEP = 1500  # characters of each raw answer kept in reject_detail (which caps at 20k)


@dataclass
class PromptConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    motion_template: str = constrained("motion_v1", nonempty=True, help="Fig. 11 prompt")
    local_template: str = constrained("local_v1", nonempty=True, help="Fig. 12 prompt")
    max_objects: int = constrained(
        4, ge=1, help="object prompts per clip at most (the paper: quality drops beyond 3)"
    )
    on_too_many_objects: Literal["reject", "truncate"] = constrained(
        "reject", help="more objects than max_objects: retry then reject, or keep the first ones"
    )
    max_attempts: int = constrained(3, ge=1, help="tries per prompt before rejecting the row")

    def validate(self) -> None:
        for key in ("motion_template", "local_template"):
            template = load_template(getattr(self, key))  # TemplateError is a ValueError
            if template.placeholders != {"caption"}:
                raise ValueError(
                    f"{key} {template.name!r} must have exactly the field {{caption}}, "
                    f"has {sorted(template.placeholders)}"
                )


@dataclass
class PromptTask:
    """One prompt of one row across attempts."""

    prompt: str
    value: Any = None
    done: bool = False
    attempts: int = 0
    raw: str | None = None
    log: list[dict[str, Any]] = field(default_factory=list)


class PromptStage:
    """Rows with a caption -> rows with ``c_motion`` and ``c_local``, or a reject."""

    def __init__(self, cfg: PromptConfig, engine: TextEngine | None = None) -> None:
        """``engine``: an already built engine (tests); by default built from ``cfg.engine``."""
        self.cfg = cfg
        self.manifest = cfg.engine.kind == MANIFEST
        self.truncate = cfg.on_too_many_objects == "truncate"
        self.engine: TextEngine | None = None
        self.templates: dict[str, Template] = {}
        if not self.manifest:
            self.templates = {"motion": load_template(cfg.motion_template),
                              "local": load_template(cfg.local_template)}
            self.engine = engine if engine is not None else build_engine(cfg.engine)

    def __call__(self, rows: list[dict]) -> list[dict]:
        out = list(rows)
        todo = []
        for i, row in enumerate(out):
            if is_rejected(row):
                continue
            missing = missing_caption_reason(row)
            if missing:
                out[i] = reject(row, STAGE, "stage_error", missing)
            else:
                todo.append(i)
        if self.manifest:
            for i in todo:
                out[i] = self._from_manifest(out[i])
        elif todo:
            self._generate(out, todo)
        return out

    # -------------------------------------------------------------------------- parsing
    def _parser(self, task: str) -> Callable[[str], Any]:
        return prompt_parser(self.cfg, task)

    # --------------------------------------------------------------------------- manifest
    def _from_manifest(self, row: dict) -> dict:
        try:
            motion = parse_motion_prompt(given_motion_prompt(row))
            objects = validate_object_prompts(
                given_object_prompts(row), self.cfg.max_objects, self.truncate
            )
        except ManifestMissing as exc:
            return reject(row, STAGE, "prompts_failed", str(exc))
        except LlmParseError as exc:
            reason = "no_objects" if exc.reason_code == "no_objects" else "prompts_failed"
            return reject(row, STAGE, reason, f"given prompts are invalid: {exc}")
        return {**row, "c_motion": motion, "c_local": [o.as_dict() for o in objects],
                "prompts_engine": MANIFEST, "prompts_model": None,
                "motion_prompt_version": None, "local_prompt_version": None,
                "llm_raw_motion": None, "llm_raw_local": None, "llm_attempts": 0}

    # ------------------------------------------------------------------------------ model
    def _generate(self, out: list[dict], todo: list[int]) -> None:
        assert self.engine is not None
        tasks = {
            (i, t): PromptTask(self.templates[t].format(caption=out[i]["caption"].strip()))
            for i in todo for t in TASKS
        }
        parsers = {t: self._parser(t) for t in TASKS}
        for attempt in range(self.cfg.max_attempts):
            keys = [k for k, task in tasks.items() if not task.done]
            if not keys:
                break
            temperature, seed = self.cfg.engine.sampling_for(attempt)
            # Motion and object prompts of the whole batch go to the engine in one call.
            requests = [ChatRequest(user=tasks[k].prompt, temperature=temperature, seed=seed)
                        for k in keys]
            for key, answer in zip(keys, generate_safely(self.engine, requests), strict=True):
                prompt_attempt(tasks[key], attempt, answer, parsers[key[1]])
        for i in todo:
            out[i] = self._finish(out[i], tasks[(i, "motion")], tasks[(i, "local")])

    def _finish(self, row: dict, motion: PromptTask, local: PromptTask) -> dict:
        assert self.engine is not None
        return finish_prompts(row, motion, local, self.engine.name, self.engine.model_id,
                              self.templates["motion"].tag, self.templates["local"].tag)


# The pure steps of one row's prompting, shared by PromptStage and the Ray Data LLM processor
# (data_prep.engines.ray_llm), so both write the same fields and reject reasons.


def prompt_parser(cfg: PromptConfig, task: str) -> Callable[[str], Any]:
    """The strict parser of ``task``'s answers (``motion`` or ``local``)."""
    if task == "motion":
        return parse_motion_prompt
    truncate = cfg.on_too_many_objects == "truncate"
    return lambda text: parse_local_prompts(text, cfg.max_objects, truncate)


def missing_caption_reason(row: dict) -> str | None:
    """Why ``row`` cannot be prompted (no caption yet), or None."""
    if not (row.get("caption") or "").strip():
        return "row has no caption: the caption stage must run before prompts"
    return None


def prompt_attempt(task: PromptTask, attempt: int, answer: str | EngineError,
                   parser: Callable[[str], Any]) -> None:
    """Record attempt ``attempt`` (0-based) of ``task``: its parsed value, or why not."""
    task.attempts += 1
    entry: dict[str, Any] = {"attempt": attempt + 1}
    if isinstance(answer, EngineError):
        task.log.append({**entry, "error": "engine_error", "message": str(answer)})
        return
    task.raw = answer
    try:
        task.value, task.done = parser(answer), True
    except LlmParseError as exc:
        task.log.append({**entry, "error": exc.reason_code, "message": exc.message,
                         "raw": answer[:_RAW_KEEP]})


def finish_prompts(row: dict, motion: PromptTask, local: PromptTask, engine: str, model: str,
                   motion_version: str, local_version: str) -> dict:
    """``row`` with the prompts and their provenance, or its reject after all attempts."""
    row = {
        **row,
        "prompts_engine": engine,
        "prompts_model": model,
        "motion_prompt_version": motion_version,
        "local_prompt_version": local_version,
        "llm_raw_motion": motion.raw,
        "llm_raw_local": local.raw,
        # Rounds of asking: the larger of the two prompts' attempt counts.
        "llm_attempts": max(motion.attempts, local.attempts),
    }
    if motion.done and local.done:
        objects: list[ObjectPrompt] = local.value
        return {**row, "c_motion": motion.value, "c_local": [o.as_dict() for o in objects]}
    failed = [t for t in (motion, local) if not t.done]
    if all(e["error"] == "engine_error" for t in failed for e in t.log):
        reason = "engine_error"  # the model never answered: transient
    elif not local.done and local.log and local.log[-1]["error"] == "no_objects":
        reason = "no_objects"
    else:
        reason = "unparseable_llm_output"
    detail = {name: {"ok": t.done, "attempts": t.log}
              for name, t in (("motion", motion), ("local", local))}
    return reject(row, STAGE, reason, json.dumps(detail, ensure_ascii=False))
