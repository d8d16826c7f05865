"""Engines: config checks, the real transformers engine on tiny local models, vLLM mappings."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.engines import (
    ChatRequest,
    EngineConfig,
    EngineError,
    EngineLoadError,
    TextEngine,
    build_engine,
)
from data_prep.engines.base import generate_safely, isolate_failures
from data_prep.engines.vllm_engine import (
    VLLM_DEFAULTS,
    VllmEngine,
    _is_vision_model,
    image_data_uri,
    ray_data_llm_processor_config,
    vllm_llm_kwargs,
    vllm_messages,
)
from ttm_ray.config import ConfigError, from_dict
from ttm_ray.config.resources import StageResources


def _image(h: int = 40, w: int = 120, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ config
def test_engine_config_defaults_to_manifest_and_validates():
    cfg = from_dict(EngineConfig, {})
    assert cfg.kind == "manifest" and cfg.model_path is None
    assert cfg.temperature == 0.0 and cfg.max_new_tokens > 0 and cfg.batch_size > 0


@pytest.mark.parametrize(("data", "message"), [
    ({"kind": "transformers"}, "model_path is required when kind is 'transformers'"),
    ({"kind": "vllm", "model_path": "  "}, "model_path is required when kind is 'vllm'"),
    ({"kind": "transformers", "model_path": "s3://bucket/llama"}, "local folder only"),
    ({"kind": "vllm", "model_path": "/m", "engine_kwargs": {"model": "/x"}}, "use model_path"),
    ({"kind": "vllm", "model_path": "/m", "device": "cpu"}, "CUDA only"),
    ({"kind": "openai"}, "kind: expected one of"),
    ({"kind": "vllm", "model_path": "/m", "temperature": -1}, "temperature"),
])
def test_engine_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(EngineConfig, data)


def test_engine_config_model_id_and_retry_sampling():
    cfg = EngineConfig(kind="vllm", model_path="/models/Llama-3.1-8B-Instruct/", seed=5)
    assert cfg.model_id == "Llama-3.1-8B-Instruct"
    assert EngineConfig(kind="vllm", model_path="/m", model_name="llama").model_id == "llama"
    assert cfg.sampling_for(0) == (0.0, 5)  # greedy first
    assert cfg.sampling_for(1) == (cfg.retry_temperature, 6)  # a retry samples, new seed
    assert cfg.sampling_for(2)[1] == 7


def test_build_engine_refuses_manifest():
    with pytest.raises(ValueError, match="stage mode"):
        build_engine(EngineConfig())


# ------------------------------------------------------------------ failure isolation
def test_isolate_failures_retries_one_by_one():
    calls = []

    def run(idx):
        calls.append(list(idx))
        if 1 in idx:
            raise RuntimeError("prompt too long")
        return [f"answer {i}" for i in idx]

    out = isolate_failures("fake", run, [0, 1, 2])
    assert out[0] == "answer 0" and out[2] == "answer 2"
    assert isinstance(out[1], EngineError) and "prompt too long" in str(out[1])
    assert calls == [[0, 1, 2], [0], [1], [2]]


def test_generate_safely_turns_a_raising_engine_into_per_request_errors():
    class Raising:
        name, model_id = "boom", "m"

        def generate(self, requests):
            raise RuntimeError("CUDA error")

    class Short:
        name, model_id = "short", "m"

        def generate(self, requests):
            return ["only one"]

    reqs = [ChatRequest(user="a"), ChatRequest(user="b")]
    out = generate_safely(Raising(), reqs)
    assert len(out) == 2 and all(isinstance(a, EngineError) for a in out)
    assert "CUDA error" in str(out[0])
    assert all(isinstance(a, EngineError) for a in generate_safely(Short(), reqs))
    assert generate_safely(Raising(), []) == []


# --------------------------------------------------------------- transformers: loading
def test_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(EngineLoadError) as exc:
        build_engine(EngineConfig(kind="transformers", model_path=str(missing)))
    assert str(missing) in str(exc.value) and "engine.model_path" in str(exc.value)


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(EngineLoadError, match=r"no config.json.*engine.model_path"):
        build_engine(EngineConfig(kind="transformers", model_path=str(tmp_path)))


def test_broken_model_folder_is_a_clear_error(tmp_path, tiny_llama_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EngineLoadError, match=r"engine.model_path: loading the model"):
        build_engine(EngineConfig(kind="transformers", model_path=str(broken)))


# ------------------------------------------------------------ transformers: text model
@pytest.fixture(scope="module")
def llama_engine(tiny_llama_dir):
    return build_engine(EngineConfig(kind="transformers", model_path=str(tiny_llama_dir),
                                     max_new_tokens=6, batch_size=2, device="cpu"))


def test_text_engine_generates_one_string_per_request(llama_engine):
    assert isinstance(llama_engine, TextEngine)
    assert llama_engine.name == "transformers" and llama_engine.model_id.startswith("tiny_llama")
    assert not llama_engine.vision
    reqs = [ChatRequest(user="A dog chases a ball."),
            ChatRequest(user="The cat jumps onto the table and knocks over the glass.",
                        system="Answer briefly."),
            ChatRequest(user="An eagle flies.", max_new_tokens=3)]
    out = llama_engine.generate(reqs)  # batch_size 2: two model calls
    assert len(out) == 3 and all(isinstance(a, str) and a for a in out)


def test_text_engine_batching_does_not_change_greedy_answers(llama_engine):
    a = ChatRequest(user="A dog chases a ball while a robot runs after it.")
    b = ChatRequest(user="An eagle flies.")
    alone = llama_engine.generate([a])[0]
    assert llama_engine.generate([b, a])[1] == alone  # left padding keeps answers identical


def test_text_engine_applies_the_chat_template(llama_engine):
    captured = {}
    original = llama_engine.tokenizer.apply_chat_template

    def spy(convs, **kwargs):
        captured["text"] = original(convs, tokenize=False, add_generation_prompt=True)
        return original(convs, **kwargs)

    llama_engine.tokenizer.apply_chat_template = spy
    try:
        llama_engine.generate([ChatRequest(user="hello dog", system="be brief")])
    finally:
        llama_engine.tokenizer.apply_chat_template = original
    assert captured["text"] == ["<s><|system|>be brief</s><|user|>hello dog</s><|assistant|>"]


def test_text_engine_sampling_is_seeded(llama_engine):
    req = ChatRequest(user="A dog chases a ball.", temperature=1.0, seed=3, max_new_tokens=8)
    assert llama_engine.generate([req]) == llama_engine.generate([req])


def test_text_engine_rejects_images_per_request(llama_engine):
    out = llama_engine.generate([ChatRequest(user="a", images=[_image()]), ChatRequest(user="b"),
                                 ChatRequest(user="   ")])
    assert isinstance(out[0], EngineError) and "text-only" in str(out[0])
    assert isinstance(out[1], str)
    assert isinstance(out[2], EngineError) and "empty user message" in str(out[2])


# ----------------------------------------------------------- transformers: vision model
@pytest.fixture(scope="module")
def vlm_engine(tiny_vlm_dir):
    return build_engine(EngineConfig(kind="transformers", model_path=str(tiny_vlm_dir),
                                     max_new_tokens=5, device="cpu"))


def test_vlm_engine_takes_images(vlm_engine):
    assert vlm_engine.vision and vlm_engine.processor is not None
    out = vlm_engine.generate([
        ChatRequest(user="Describe the video.", images=[_image()]),
        ChatRequest(user="Describe these frames.", images=[_image(seed=1), _image(32, 32, 2)]),
        ChatRequest(user="No image here."),
    ])
    assert len(out) == 3 and all(isinstance(a, str) and a for a in out)


def test_vlm_engine_bad_image_fails_only_its_request(vlm_engine):
    rgba = np.zeros((8, 8, 4), np.uint8)
    floats = np.zeros((8, 8, 3), np.float32)
    out = vlm_engine.generate([ChatRequest(user="a", images=[_image()]),
                               ChatRequest(user="b", images=[rgba]),
                               ChatRequest(user="c", images=[floats])])
    assert isinstance(out[0], str)
    assert isinstance(out[1], EngineError) and "HxWx3" in str(out[1])
    assert isinstance(out[2], EngineError) and "uint8" in str(out[2])


# ------------------------------------------------------------------------------ vLLM
def test_vllm_llm_kwargs_defaults_and_overrides():
    cfg = EngineConfig(kind="vllm", model_path="/models/llama", dtype="bfloat16", seed=7,
                       engine_kwargs={"max_model_len": 8192, "enforce_eager": True})
    kwargs = vllm_llm_kwargs(cfg)
    assert kwargs["model"] == "/models/llama" and kwargs["dtype"] == "bfloat16"
    assert kwargs["seed"] == 7 and kwargs["enforce_eager"] is True
    assert kwargs["max_model_len"] == 8192  # engine_kwargs win
    assert kwargs["tensor_parallel_size"] == VLLM_DEFAULTS["tensor_parallel_size"]


def test_ray_data_llm_processor_config_mapping():
    cfg = EngineConfig(kind="vllm", model_path="s3://models/llama-3.2-11b-vision",
                       batch_size=16, engine_kwargs={"tensor_parallel_size": 2})
    res = StageResources(num_cpus=2.0, num_gpus=1.0, min_actors=2, max_actors=4,
                         accelerator_type="H100")
    kw = ray_data_llm_processor_config(cfg, res, has_image=True)
    assert kw["model_source"] == "s3://models/llama-3.2-11b-vision"
    assert kw["concurrency"] == (2, 4) and kw["batch_size"] == 16
    assert kw["accelerator_type"] == "H100" and kw["prepare_multimodal_stage"] is True
    assert "model" not in kw["engine_kwargs"] and kw["engine_kwargs"]["tensor_parallel_size"] == 2
    assert kw["placement_group_config"] == {"bundle_per_worker": {"CPU": 2.0, "GPU": 1.0}}
    text_only = ray_data_llm_processor_config(EngineConfig(kind="vllm", model_path="/m"))
    assert "accelerator_type" not in text_only and text_only["prepare_multimodal_stage"] is False


def test_ray_data_llm_processor_config_is_accepted_by_ray():
    llm = pytest.importorskip("ray.data.llm", reason="ray.data.llm not importable here")
    cfg = EngineConfig(kind="vllm", model_path="/models/llama", batch_size=8)
    config = llm.vLLMEngineProcessorConfig(
        **ray_data_llm_processor_config(cfg, StageResources(num_gpus=1), has_image=True))
    assert config.model_source == "/models/llama" and config.batch_size == 8
    assert config.engine_kwargs["max_model_len"] == VLLM_DEFAULTS["max_model_len"]


def test_vllm_messages_carry_images_as_data_uris():
    from PIL import Image

    req = ChatRequest(user="Describe.", system="Be brief.", images=[_image(30, 50)])
    messages = vllm_messages(req)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"] and parts[1]["text"] == "Describe."
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (50, 30)
    assert vllm_messages(ChatRequest(user="hi")) == [{"role": "user", "content": "hi"}]
    assert image_data_uri(_image(4, 4)).startswith("data:image/jpeg")


def test_vllm_engine_without_vllm_or_model_is_a_clear_error(tmp_path, tiny_llama_dir):
    with pytest.raises(EngineLoadError, match=r"does not exist.*engine.model_path"):
        VllmEngine(EngineConfig(kind="vllm", model_path=str(tmp_path / "missing")))
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(EngineLoadError, match="vllm package is not installed"):
            VllmEngine(EngineConfig(kind="vllm", model_path=str(tiny_llama_dir)))


def test_vllm_engine_reads_vision_support_from_the_model_folder(tiny_llama_dir, tiny_vlm_dir):
    assert not _is_vision_model(str(tiny_llama_dir))
    assert _is_vision_model(str(tiny_vlm_dir))
    assert _is_vision_model("s3://bucket/model")


@pytest.mark.gpu
def test_vllm_engine_gpu(tiny_llama_dir: Path):
    """The real vLLM path: runs on a CUDA machine with vllm installed, skips elsewhere."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM engine test needs a CUDA device; none here")
    pytest.importorskip("vllm", reason="vLLM engine test needs the vllm package (GPU images)")
    cfg = EngineConfig(kind="vllm", model_path=str(tiny_llama_dir), max_new_tokens=8,
                       engine_kwargs={"max_model_len": 1024, "gpu_memory_utilization": 0.2,
                                      "enforce_eager": True})
    engine = build_engine(cfg)
    out = engine.generate([ChatRequest(user="A dog chases a ball."),
                           ChatRequest(user="An eagle flies.", temperature=0.8, seed=1),
                           ChatRequest(user="text model", images=[_image()])])
    assert isinstance(out[0], str) and isinstance(out[1], str)
    assert isinstance(out[2], EngineError)  # images to a text-only model: that row only
