"""The caption and prompt stages through ray.data.llm processors (``engine.kind: ray_data_llm``).

Everything that builds without vLLM is real here: Ray's processor config, our preprocess /
postprocess functions, the prompt -> answer -> parse round trip, and (in the Ray test) Ray's
own ``Processor`` with its preprocess/postprocess wrapping and error-row bypass. vLLM is
CUDA-only and never installed in this env, so the one fake is the engine itself: the Ray test
replaces ``build_processor``'s engine stages (chat template, tokenize, vLLM, detokenize) with
one scripted stage. The real engine runs in ``benchmarks/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from data_prep.engines import EngineConfig, EngineError, ray_llm
from data_prep.engines.ray_llm import (
    BYPASS,
    ERROR,
    RUNNER,
    CaptionPasses,
    PromptPasses,
    postprocess_fn,
    preprocess_fn,
    settle_fn,
)
from data_prep.rows import REJECT_REASONS, is_rejected, new_row, reject, to_table
from data_prep.stages.caption import CaptionConfig, CaptionStage, clip_images
from data_prep.stages.prompts import PromptConfig, PromptStage
from ttm_ray.config import ConfigError, from_dict
from ttm_ray.config.resources import StageResources

ENGINE = EngineConfig(kind="ray_data_llm", model_path="/unused/model", model_name="scripted-1")
GOOD_CAPTION = "A red square slides to the right while a ball rolls."
GOOD_MOTION = 'Motion-specific prompt: "The square slides to the right."'
GOOD_LOCAL = "Answer: [[square: A red square slides to the right.] [ball: A ball rolls.]]"

# An answer from what the request says: (user text, has images, attempt) -> answer.
Answerer = Callable[[str, bool, int], "str | EngineError"]


class ScriptedEngine:
    """The actor stages' TextEngine, answering like :func:`run_passes`' engine. Named like the
    processor's runner so both paths write identical rows."""

    name = RUNNER
    model_id = "scripted-1"

    def __init__(self, answer: Answerer, cfg: EngineConfig) -> None:
        self.answer, self.cfg = answer, cfg

    def generate(self, requests):
        answers = [self.answer(r.user, bool(r.images), _attempt(self.cfg, r.temperature, r.seed))
                   for r in requests]
        return [a.strip() if isinstance(a, str) else a for a in answers]  # as VllmEngine


def _attempt(cfg: EngineConfig, temperature: float | None, seed: int | None) -> int:
    return 0 if not temperature else int(seed) - cfg.seed


def _request_answer(answer: Answerer, cfg: EngineConfig, data: dict) -> str | EngineError:
    """What the scripted engine answers to one processor request (messages + sampling)."""
    content = data["messages"][-1]["content"]
    images = not isinstance(content, str)  # parts: a list, or a numpy array after Arrow
    user = list(content)[-1]["text"] if images else content
    sp = data["sampling_params"]
    return answer(user, images, _attempt(cfg, sp["temperature"], sp["seed"]))


def run_passes(passes: CaptionPasses | PromptPasses, rows: list[dict], answer: Answerer,
               ) -> list[dict]:
    """The processor passes in process, row by row, as ray.data.llm wraps them: the
    preprocess output merged into the row; engine-failed and bypassed rows skip postprocess."""
    for attempt, task in passes.passes:
        pre, post = preprocess_fn(passes, attempt, task), postprocess_fn(passes, attempt, task)
        settle = settle_fn(passes, attempt, task)
        out = []
        for row in rows:
            data = {**row, **pre(row)}
            if data[ERROR] == "":
                got = _request_answer(answer, passes.cfg.engine, data)
                if isinstance(got, EngineError):
                    data = {**data, ERROR: str(got).split(": ", 1)[1]}
                else:
                    data = post({**data, "generated_text": got, "prompt": "templated"})
            out.append(settle(data))
        rows = out
    return to_table([passes.finish(r) for r in rows]).to_pylist()


def clip_row(uri: Path | str, n: int = 12, **fields: Any) -> dict:
    return new_row(video_id="v", source_uri=str(uri), clip_id=f"v:{n}",
                   frame_indices=list(range(n)), **fields)


def captioned(caption: str = GOOD_CAPTION, **fields: Any) -> dict:
    return new_row(**{"video_id": "v", "clip_id": "v:0", "caption": caption, **fields})


# --------------------------------------------------------------------------------- config
def test_processor_config_is_rays_and_carries_ours():
    cfg = EngineConfig(kind="ray_data_llm", model_path="/models/qwen", batch_size=16,
                       engine_kwargs={"max_model_len": 8192,
                                      "limit_mm_per_prompt": {"image": 1}})
    res = StageResources(num_cpus=4.0, num_gpus=1.0, min_actors=2, max_actors=8)
    config = ray_llm.processor_config(cfg, res, has_image=True)
    from ray.data.llm import vLLMEngineProcessorConfig

    assert isinstance(config, vLLMEngineProcessorConfig)
    assert config.model_source == "/models/qwen" and config.batch_size == 16
    assert config.concurrency == (2, 8)
    assert config.engine_kwargs["max_model_len"] == 8192
    assert config.engine_kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert config.engine_kwargs["tensor_parallel_size"] == 1 and "model" not in config.engine_kwargs
    assert config.placement_group_config["bundle_per_worker"] == {"CPU": 4.0, "GPU": 1.0}
    assert config.should_continue_on_error is True  # a refused request rejects its row only
    assert config.prepare_multimodal_stage is True
    assert ray_llm.processor_config(cfg, res, has_image=False).prepare_multimodal_stage is False


def test_engine_kind_is_validated_like_vllm(tmp_path: Path):
    with pytest.raises(ConfigError, match="model_path is required"):
        from_dict(CaptionConfig, {"engine": {"kind": "ray_data_llm"}})
    with pytest.raises(ConfigError, match="CUDA only"):
        from_dict(CaptionConfig, {"engine": {"kind": "ray_data_llm", "model_path": "/m",
                                             "device": "cpu"}})
    # A folder vLLM cannot serve is refused before any work, as for kind vllm.
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["NoSuchModelForCausalLM"], "model_type": "x"}))
    with pytest.raises(ConfigError, match="vllm cannot serve"):
        from_dict(PromptConfig, {"engine": {"kind": "ray_data_llm", "model_path": str(tmp_path)}})
    ok = from_dict(PromptConfig, {"engine": {"kind": "ray_data_llm", "model_path": "/m"}})
    assert ok.engine.kind == RUNNER


# ----------------------------------------------------------------------- pre/postprocess
def test_caption_preprocess_builds_the_vllm_request(tiny_video: Path):
    cfg = CaptionConfig(engine=ENGINE)
    passes = CaptionPasses(cfg)
    row = clip_row(tiny_video)
    out = preprocess_fn(passes, 0, "caption")(row)
    assert out[ERROR] == ""
    (message,) = out["messages"]
    assert message["role"] == "user"
    image, text = message["content"]
    assert image["type"] == "image_url" and text == {"type": "text", "text": passes.prompt}
    assert "three frames" in passes.prompt  # the grid layout's text in the template
    url = image["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    from PIL import Image

    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    (grid,) = clip_images(row, cfg)
    # Three 64x48 frames, each fit to 448 px, side by side.
    assert decoded.size == (grid.shape[1], grid.shape[0]) == (3 * 448, 336)
    # Greedy first, as VllmEngine: no seed; the URIs are kept for the retries.
    assert out["sampling_params"] == {"max_tokens": 256, "temperature": 0.0, "seed": None}
    assert json.loads(out[passes.state])["images"] == [url]
    retry = preprocess_fn(passes, 1, "caption")({**row, **out})
    assert retry["messages"] == out["messages"]
    assert retry["sampling_params"] == {"max_tokens": 256, "temperature": 0.7, "seed": 1}


def test_rejected_and_unclipped_rows_bypass_the_engine(tiny_video: Path):
    passes = CaptionPasses(CaptionConfig(engine=ENGINE))
    pre = preprocess_fn(passes, 0, "caption")
    done = reject(clip_row(tiny_video), "clip", "too_short", "x")
    assert pre(done) == {ERROR: BYPASS}
    unclipped = pre(new_row(video_id="v"))
    assert unclipped[ERROR] == BYPASS and unclipped["reject_reason"] == "stage_error"
    unreadable = pre(clip_row(tiny_video.with_name("missing.mp4")))
    assert unreadable[ERROR] == BYPASS and unreadable["status"] == "rejected"
    # settle gives a bypassed row back with exactly the pipeline's columns.
    settled = settle_fn(passes, 0, "caption")({**done, ERROR: BYPASS, "messages": []})
    assert to_table([passes.finish(settled)]).to_pylist() == to_table([done]).to_pylist()


def test_prompt_preprocess_uses_the_appendix_prompts():
    cfg = PromptConfig(engine=ENGINE)
    passes = PromptPasses(cfg)
    assert passes.passes[:2] == [(0, "motion"), (0, "local")]
    out = preprocess_fn(passes, 0, "motion")(captioned())
    assert out["messages"] == [{"role": "user", "content": out["messages"][0]["content"]}]
    assert out["messages"][0]["content"].endswith(
        f'Caption: "{GOOD_CAPTION}"\nMotion-specific prompt:')
    local = preprocess_fn(passes, 0, "local")({**captioned(), **out})
    assert local["messages"][0]["content"].endswith("Answer:")


# ------------------------------------------------ the same rows as the actor stages give
def _caption_answers() -> dict[str, Answerer]:
    return {
        "good": lambda u, im, a: f'"{GOOD_CAPTION}"',
        "empty_then_good": lambda u, im, a: "" if a == 0 else GOOD_CAPTION,
        "always_empty": lambda u, im, a: "  ",
        "engine_down": lambda u, im, a: EngineError(RUNNER, "CUDA error: device lost"),
        "error_then_empty": lambda u, im, a: EngineError(RUNNER, "boom") if a == 0 else "",
    }


@pytest.mark.parametrize("case", sorted(_caption_answers()))
def test_caption_processor_rows_equal_the_actor_stage(tiny_video: Path, case: str):
    answer = _caption_answers()[case]
    cfg = CaptionConfig(engine=ENGINE)
    rows = [clip_row(tiny_video), clip_row(tiny_video, n=6),
            reject(clip_row(tiny_video), "clip", "too_short", "x"), new_row(video_id="w")]
    actor = CaptionStage(cfg, engine=ScriptedEngine(answer, cfg.engine))(rows)
    expected = to_table(actor).to_pylist()
    got = run_passes(CaptionPasses(cfg), rows, answer)
    assert got == expected
    for r in got[:2]:
        assert r["caption_engine"] == RUNNER and r["caption_model"] == "scripted-1"
        if is_rejected(r):
            assert r["reject_reason"] in {"caption_failed", "engine_error"}
    assert got[2]["reject_reason"] == "too_short" and got[3]["reject_reason"] == "stage_error"


def _prompt_answers() -> dict[str, Answerer]:
    def motion(u: str) -> bool:
        return "Motion-specific prompt:" in u
    return {
        "good": lambda u, im, a: GOOD_MOTION if motion(u) else GOOD_LOCAL,
        "motion_retried": lambda u, im, a: (("no idea" if a == 0 else GOOD_MOTION)
                                            if motion(u) else GOOD_LOCAL),
        "unparseable": lambda u, im, a: "I cannot help with that.",
        "no_objects": lambda u, im, a: GOOD_MOTION if motion(u) else "Answer: []",
        "engine_down": lambda u, im, a: EngineError(RUNNER, "engine dead"),
        "local_engine_error": lambda u, im, a: (GOOD_MOTION if motion(u)
                                                else EngineError(RUNNER, "too long")),
    }


@pytest.mark.parametrize("case", sorted(_prompt_answers()))
def test_prompt_processor_rows_equal_the_actor_stage(case: str):
    answer = _prompt_answers()[case]
    cfg = PromptConfig(engine=ENGINE)
    rows = [captioned(), captioned("A dog runs across a lawn.", clip_id="v:1"),
            reject(captioned(), "caption", "caption_failed", "x"), captioned(caption=None)]
    actor = PromptStage(cfg, engine=ScriptedEngine(answer, cfg.engine))(rows)
    expected = to_table(actor).to_pylist()
    got = run_passes(PromptPasses(cfg), rows, answer)
    assert got == expected
    assert got[2]["reject_reason"] == "caption_failed" and got[3]["reject_reason"] == "stage_error"
    for r in got[:2]:
        assert r["prompts_engine"] == RUNNER
        assert not is_rejected(r) or r["reject_reason"] in REJECT_REASONS
    if case == "good":
        assert got[0]["c_local"] == [
            {"name": "square", "prompt": "A red square slides to the right."},
            {"name": "ball", "prompt": "A ball rolls."}]
        assert got[0]["llm_attempts"] == 1


# -------------------------------------------------------------------- in a Ray pipeline
def _scripted_build_processor(answer: Answerer, cfg: EngineConfig) -> Callable[..., Any]:
    """``build_processor`` with vLLM's engine stages replaced by one scripted stage; the
    Processor, its preprocess/postprocess wrapping and error-row bypass are Ray's own.
    Defined in a function so Ray pickles the classes by value (this module is not importable
    in the workers)."""
    from ray.llm._internal.batch.processor.base import Processor
    from ray.llm._internal.batch.stages.base import StatefulStage, StatefulStageUDF

    class ScriptedUDF(StatefulStageUDF):
        async def udf(self, batch: list[dict]):
            for row in batch:
                got = _request_answer(answer, cfg, row)
                out = {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN],
                       "generated_text": "", "__inference_error__": ""}
                if isinstance(got, EngineError):
                    out["__inference_error__"] = str(got).split(": ", 1)[1]
                else:
                    out["generated_text"] = got
                yield out

    class ScriptedEngineStage(StatefulStage):
        fn: Any = ScriptedUDF

        def get_required_input_keys(self) -> dict[str, str]:
            return {"messages": "chat", "sampling_params": "sampling"}

    def build(config: Any, preprocess: Callable, postprocess: Callable) -> Any:
        stage = ScriptedEngineStage(map_batches_kwargs={"concurrency": 1, "num_cpus": 0.1})
        return Processor(config, [stage], preprocess=preprocess, postprocess=postprocess)

    return build


def test_pipeline_runs_ray_data_llm_stages_as_processors(ray_local, tiny_video: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    from data_prep.config import PrepConfig
    from data_prep.pipeline import build_pipeline, stage_specs
    from data_prep.work_index import DoneIndex

    llm = {"kind": "ray_data_llm", "model_path": "/unused/model", "model_name": "scripted-1"}
    cfg = from_dict(PrepConfig, {
        "source": {"kind": "manifest", "path": "/unused.parquet"},
        "caption": {"engine": llm, "max_attempts": 2},
        "prompts": {"engine": llm, "max_attempts": 1},
        "mask_source": "none", "filter": {"min_objects": 0}, "score": {"enabled": False},
    })
    specs = {s.name: s for s in stage_specs(cfg, DoneIndex())}
    assert specs["caption"].processor is ray_llm.caption_processor
    assert specs["prompts"].processor is ray_llm.prompts_processor
    assert specs["ingest"].processor is None

    answer = _prompt_answers()["good"]
    caption_answer = _caption_answers()["empty_then_good"]

    def both(u: str, im: bool, a: int) -> str | EngineError:
        return caption_answer(u, im, a) if im else answer(u, im, a)

    import ray

    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    monkeypatch.setattr(ray_llm, "build_processor", _scripted_build_processor(both, ENGINE))
    # Only the model stages: the rows come in clipped (ingest/clip have their own tests).
    monkeypatch.setattr("data_prep.pipeline.stage_specs",
                        lambda *a, **k: [s for s in stage_specs(*a, **k)
                                         if s.name in ("caption", "prompts")])
    rejected = reject(clip_row(tiny_video, n=4), "clip", "too_short", "short")
    inputs = to_table([clip_row(tiny_video), clip_row(tiny_video, n=8), rejected])
    rows = sorted(build_pipeline(cfg, inputs, DoneIndex()).take_all(), key=lambda r: r["clip_id"])
    by_id = {r["clip_id"]: r for r in rows}
    assert len(rows) == 3
    assert by_id["v:4"] == to_table([rejected]).to_pylist()[0]  # passed through untouched
    for cid in ("v:12", "v:8"):
        r = by_id[cid]
        assert r["status"] == "ok", r.get("reject_detail")
        assert r["caption"] == GOOD_CAPTION and r["caption_engine"] == RUNNER
        assert r["c_motion"] == "The square slides to the right." and len(r["c_local"]) == 2
        assert set(r) == set(to_table([r]).column_names)  # no processor columns left
