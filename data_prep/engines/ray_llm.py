"""The caption and prompt stages as Ray Data LLM processors (``engine.kind: ray_data_llm``).

On a cluster the vLLM model runs through Ray's own batch-inference library
(``ray.data.llm.build_processor``): batching, the engine actor pool and the engine lifecycle
come from a kept library instead of our actor. What stays ours are the pure steps the actor
stages use too (:mod:`data_prep.stages.caption`, :mod:`data_prep.stages.prompts`): the same
chat messages and sampling parameters go in, the same parsers read the answers, and the rows
get the same fields and reject reasons.

How one stage maps onto processors:

* One processor is one engine call per row, so each attempt (and, for prompts, each of the
  motion and object prompts) is one *pass*: a processor over the whole stream. A row's progress
  between passes travels in a JSON column (``_llm_caption`` / ``_llm_prompts``), and a last
  map (:func:`_finish_batch`) turns it into the stage's fields or reject, through
  :func:`data_prep.rows.to_table` like every other stage (which also drops the column).
* Rows with nothing to ask (already rejected upstream, or answered on an earlier pass) bypass
  the engine through the library's own error-row path: preprocess sets
  ``__inference_error__`` to :data:`BYPASS`, which every processor stage and the postprocess
  pass through untouched. Splitting the stream with ``filter`` and ``union``-ing it back would
  do the same, but a lazy Ray Dataset consumed by two filters runs everything upstream (decode,
  clip...) twice.
* ``should_continue_on_error`` is on: a request vLLM refuses marks its row (later an
  ``engine_error`` attempt), not the block.

Nothing here imports vllm; ``ray.data.llm`` is imported only when a processor is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from data_prep.engines.base import EngineError
from data_prep.engines.config import EngineConfig
from data_prep.engines.vllm_engine import (
    chat_messages,
    image_data_uri,
    ray_data_llm_processor_config,
    sampling_params,
)
from data_prep.parsing import ObjectPrompt
from data_prep.prompts import load_template
from data_prep.rows import COLUMNS, is_rejected, reject, reject_error, to_table
from data_prep.stages import caption as cap
from data_prep.stages import prompts as pr
from ttm_ray.config.resources import StageResources

RUNNER = "ray_data_llm"  # the engine name recorded in the rows
ERROR = "__inference_error__"  # ray.data.llm's per-row error column
BYPASS = "ttm-ray: nothing to ask"  # an ERROR value: the row skips the engine, unchanged

Updates = dict[str, Any]
Request = dict[str, Any]


def processor_config(cfg: EngineConfig, resources: StageResources | None,
                     has_image: bool) -> Any:
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` of one stage's engine."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(**ray_data_llm_processor_config(cfg, resources, has_image))


def build_processor(config: Any, preprocess: Callable[[dict], dict],
                    postprocess: Callable[[dict], dict]) -> Any:
    """``ray.data.llm.build_processor``: the one boundary tests replace (vLLM is CUDA-only)."""
    from ray.data.llm import build_processor as build

    return build(config, preprocess=preprocess, postprocess=postprocess)


# -------------------------------------------------------------------------------- caption
class CaptionPasses:
    """The caption stage's attempts as processor passes (pure row functions)."""

    state = "_llm_caption"

    def __init__(self, cfg: cap.CaptionConfig) -> None:
        self.cfg = cfg
        self.prompt, self.version = cap.caption_prompt(cfg)
        self.passes = [(attempt, "caption") for attempt in range(cfg.max_attempts)]

    def ask(self, row: dict, attempt: int, task: str) -> tuple[Updates, Request | None]:
        if is_rejected(row):
            return {}, None
        if attempt == 0:
            missing = cap.missing_clip_reason(row)
            if missing:
                return reject(row, cap.STAGE, "stage_error", missing), None
            try:
                images = cap.clip_images(row, self.cfg)
            except Exception as exc:  # one odd row must not take the batch down with it
                return reject_error(row, cap.STAGE, exc, limit=6), None
            # Encoded once: later attempts reuse the URIs instead of decoding the video again.
            state: dict[str, Any] = {"images": [image_data_uri(im) for im in images],
                                     "history": [], "caption": None}
        else:
            state = json.loads(row[self.state])
            if state["caption"] is not None:
                return {}, None
        temperature, seed = self.cfg.engine.sampling_for(attempt)
        return {self.state: json.dumps(state)}, {
            "messages": chat_messages(self.prompt, state["images"]),
            "sampling_params": sampling_params(self.cfg.engine, temperature, seed)}

    def record(self, row: dict, attempt: int, task: str, answer: str | EngineError) -> Updates:
        state = json.loads(row[self.state])
        state["caption"] = cap.caption_attempt(state["history"], attempt, answer)
        return {self.state: json.dumps(state)}

    def finish(self, row: dict) -> dict:
        if is_rejected(row) or not row.get(self.state):
            return row
        state = json.loads(row[self.state])
        done = cap.caption_fields(row, state["caption"], RUNNER, self.cfg.engine.model_id,
                                  self.version)
        if state["caption"] is not None:
            return done
        reason, detail = cap.caption_failure(state["history"])
        return reject(done, cap.STAGE, reason, detail)


# -------------------------------------------------------------------------------- prompts
class PromptPasses:
    """The prompt stage's attempts as passes: per attempt, the motion then the object prompt
    (the actor stage asks both in one engine call, with the same sampling parameters)."""

    state = "_llm_prompts"

    def __init__(self, cfg: pr.PromptConfig) -> None:
        self.cfg = cfg
        self.templates = {"motion": load_template(cfg.motion_template),
                          "local": load_template(cfg.local_template)}
        self.parsers = {t: pr.prompt_parser(cfg, t) for t in pr.TASKS}
        self.passes = [(attempt, t) for attempt in range(cfg.max_attempts) for t in pr.TASKS]

    @staticmethod
    def _load(text: str) -> dict[str, pr.PromptTask]:
        tasks = {t: pr.PromptTask(**d) for t, d in json.loads(text).items()}
        if tasks["local"].done:  # objects travel as dicts
            tasks["local"].value = [ObjectPrompt(**o) for o in tasks["local"].value]
        return tasks

    @staticmethod
    def _dump(tasks: dict[str, pr.PromptTask]) -> str:
        out = {t: dict(vars(task)) for t, task in tasks.items()}
        if tasks["local"].done:
            out["local"]["value"] = [o.as_dict() for o in tasks["local"].value]
        return json.dumps(out, ensure_ascii=False)

    def ask(self, row: dict, attempt: int, task: str) -> tuple[Updates, Request | None]:
        if is_rejected(row):
            return {}, None
        if attempt == 0 and task == pr.TASKS[0]:
            missing = pr.missing_caption_reason(row)
            if missing:
                return reject(row, pr.STAGE, "stage_error", missing), None
            caption = row["caption"].strip()
            tasks = {t: pr.PromptTask(self.templates[t].format(caption=caption))
                     for t in pr.TASKS}
        else:
            tasks = self._load(row[self.state])
        if tasks[task].done:
            return {}, None
        temperature, seed = self.cfg.engine.sampling_for(attempt)
        return {self.state: self._dump(tasks)}, {
            "messages": chat_messages(tasks[task].prompt),
            "sampling_params": sampling_params(self.cfg.engine, temperature, seed)}

    def record(self, row: dict, attempt: int, task: str, answer: str | EngineError) -> Updates:
        tasks = self._load(row[self.state])
        pr.prompt_attempt(tasks[task], attempt, answer, self.parsers[task])
        return {self.state: self._dump(tasks)}

    def finish(self, row: dict) -> dict:
        if is_rejected(row) or not row.get(self.state):
            return row
        tasks = self._load(row[self.state])
        return pr.finish_prompts(row, tasks["motion"], tasks["local"], RUNNER,
                                 self.cfg.engine.model_id, self.templates["motion"].tag,
                                 self.templates["local"].tag)


Passes = CaptionPasses | PromptPasses


# ----------------------------------------------------------------- the processor functions
def _keep(row: dict, passes: Passes) -> dict:
    """The pipeline's columns and the progress column: no processor intermediates."""
    return {k: row.get(k) for k in (*COLUMNS, passes.state)}


def preprocess_fn(passes: Passes, attempt: int, task: str) -> Callable[[dict], dict]:
    """``preprocess`` of one pass: the request's ``messages`` and ``sampling_params``, or the
    bypass mark. ``__inference_error__`` is always set: a row whose struct lacks it reads as
    None, which ray.data.llm would take for an error."""
    def preprocess(row: dict) -> dict:
        updates, request = passes.ask(row, attempt, task)
        if request is None:
            return {**updates, ERROR: BYPASS}
        return {**updates, **request, ERROR: ""}
    return preprocess


def postprocess_fn(passes: Passes, attempt: int, task: str) -> Callable[[dict], dict]:
    """``postprocess`` of one pass (rows the engine answered): parse and record the answer."""
    def postprocess(row: dict) -> dict:
        answer = (row.get("generated_text") or "").strip()  # what VllmEngine answers too
        return {**_keep(row, passes), **passes.record(row, attempt, task, answer)}
    return postprocess


def settle_fn(passes: Passes, attempt: int, task: str) -> Callable[[dict], dict]:
    """After a pass: rows the library passed over (bypassed, or failed in the engine, which
    skip ``postprocess``) get their columns back; an engine failure is recorded as one."""
    def settle(row: dict) -> dict:
        error = row.get(ERROR) or ""
        out = _keep(row, passes)
        if error and error != BYPASS:
            out.update(passes.record(out, attempt, task, EngineError(RUNNER, error)))
        return out
    return settle


def _finish_batch(batch: pa.Table, passes: Passes, name: str) -> pa.Table:
    return to_table([passes.finish(r) for r in batch.to_pylist()], stage=name)


def apply_passes(ds: Any, name: str, passes: Passes, engine: EngineConfig,
                 resources: StageResources | None, has_image: bool) -> Any:
    """``ds`` through every pass of one stage, then its final fields or rejects."""
    config = processor_config(engine, resources, has_image)
    for attempt, task in passes.passes:
        processor = build_processor(config, preprocess_fn(passes, attempt, task),
                                    postprocess_fn(passes, attempt, task))
        ds = processor(ds).map(settle_fn(passes, attempt, task))
    return ds.map_batches(_finish_batch, fn_kwargs={"passes": passes, "name": name},
                          batch_format="pyarrow")


def caption_processor(ds: Any, cfg: cap.CaptionConfig,
                      resources: StageResources | None = None) -> Any:
    """The caption stage on ``ds`` through ray.data.llm (the frames go in as images)."""
    return apply_passes(ds, cap.STAGE, CaptionPasses(cfg), cfg.engine, resources, True)


def prompts_processor(ds: Any, cfg: pr.PromptConfig,
                      resources: StageResources | None = None) -> Any:
    """The prompt stage on ``ds`` through ray.data.llm (text only)."""
    return apply_passes(ds, pr.STAGE, PromptPasses(cfg), cfg.engine, resources, False)


__all__ = ["BYPASS", "RUNNER", "CaptionPasses", "PromptPasses", "apply_passes",
           "caption_processor", "processor_config", "prompts_processor"]
