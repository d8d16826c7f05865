"""Config validation refuses a model folder the configured engine cannot serve (issue 16.6).

The folders are tiny: just a ``config.json`` naming an architecture, written in tmp_path. The
check reads nothing else, and runs only where the folder exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.config import PrepConfig
from data_prep.engines.config import EngineConfig
from ttm_ray.config import ConfigError, from_dict, load_config
from ttm_ray.model_folders import VLLM_ARCHITECTURES, servable_problem

REPO = Path(__file__).resolve().parents[2]


def model_dir(tmp_path: Path, name: str, arch: str | None, vision: bool = True) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    config: dict = {"model_type": "x"}
    if arch is not None:
        config["architectures"] = [arch]
    if vision:
        config["vision_config"] = {}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def prep(engine: dict) -> PrepConfig:
    return from_dict(PrepConfig, {"caption": {"engine": engine}})


def test_mllama_under_vllm_is_a_clear_config_error(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "Llama-3.2-11B-Vision-Instruct",
                       "MllamaForConditionalGeneration")
    with pytest.raises(ConfigError) as err:
        prep({"kind": "vllm", "model_path": str(folder)})
    text = str(err.value)
    # Names the field, the folder, what was found and both fixes.
    assert "caption.engine: model_path" in text
    assert str(folder) in text
    assert "MllamaForConditionalGeneration" in text
    assert "Qwen2.5-VL" in text and "transformers" in text


def test_qwen2_5_vl_under_vllm_passes(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "Qwen2.5-VL-7B-Instruct", "Qwen2_5_VLForConditionalGeneration")
    cfg = prep({"kind": "vllm", "model_path": str(folder)})
    assert cfg.caption.engine.model_path == str(folder)


def test_shipped_list_keeps_qwen_and_drops_mllama() -> None:
    assert "Qwen2_5_VLForConditionalGeneration" in VLLM_ARCHITECTURES
    assert "MllamaForConditionalGeneration" not in VLLM_ARCHITECTURES


def test_transformers_engine_accepts_mllama(tmp_path: Path) -> None:
    # transformers' AutoModelForImageTextToText maps mllama -> MllamaForConditionalGeneration,
    # which is what TransformersEngine loads a vision folder with.
    folder = model_dir(tmp_path, "Llama-3.2-11B-Vision-Instruct",
                       "MllamaForConditionalGeneration")
    cfg = prep({"kind": "transformers", "model_path": str(folder)})
    assert cfg.caption.engine.kind == "transformers"


def test_transformers_engine_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "mystery", "MysteryForVideoThings")
    problem = servable_problem("model_path", str(folder), "transformers")
    assert problem and "MysteryForVideoThings" in problem
    assert "AutoModelForImageTextToText" in problem


def test_missing_config_json_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty-model"
    folder.mkdir()
    with pytest.raises(ConfigError) as err:
        prep({"kind": "vllm", "model_path": str(folder)})
    text = str(err.value)
    assert "caption.engine: model_path" in text and "config.json does not exist" in text


def test_config_without_architectures_is_a_clear_error(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "noarch", None)
    problem = servable_problem("model_path", str(folder), "vllm")
    assert problem and "names no architectures" in problem


def test_paths_that_do_not_exist_here_are_not_checked() -> None:
    # Production folders exist only on the cluster; validation must still pass on a laptop.
    cfg = EngineConfig(kind="vllm", model_path="/mnt/models/does-not-exist-here")
    cfg.validate()
    assert servable_problem("model_path", "s3://bucket/model", "vllm") is None


def test_prompt_engine_is_checked_too(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "weird-llm", "NotAServableLM", vision=False)
    with pytest.raises(ConfigError, match=r"prompts\.engine: model_path"):
        from_dict(PrepConfig, {"prompts": {"engine": {"kind": "vllm",
                                                      "model_path": str(folder)}}})


def test_production_captioner_is_servable_by_vllm() -> None:
    cfg = load_config(PrepConfig, REPO / "jobs/configs/prep/production.yaml")
    engine = cfg.caption.engine
    assert engine.kind == "vllm"
    assert Path(engine.model_path).name == "Qwen2.5-VL-7B-Instruct"
    assert engine.engine_kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
