"""``ttm-ray models check``: the models job configs need, whether they are there, how to stage
them (issue 16.9). Tiny models are built in tmp_path; production paths do not exist here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.cli import COMMANDS
from jobs.models_check import main
from ttm_ray.ops.models_check import ModelNeed, check_need, stage_hint

REPO = Path(__file__).resolve().parents[2]
PROD_PREP = str(REPO / "jobs/configs/prep/production.yaml")
QUICK_PREP = str(REPO / "jobs/configs/prep/quickstart.yaml")
TINY_UNET = str(REPO / "jobs/configs/train/unet_stage1_tiny.yaml")


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    rc = main(["check", *args, "--json"], prog="ttm-ray models")
    return rc, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ttm_ray.evaluation.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="module")
def tiny_clip_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ttm_ray.conditioning.tiny import build_tiny_clip_text

    return build_tiny_clip_text(tmp_path_factory.mktemp("models") / "tiny-clip-text")


def test_production_prep_lists_every_model_missing_with_its_field(capsys) -> None:
    rc, out = run_json(capsys, "--config", PROD_PREP)
    assert rc == 1 and out["ok"] is False
    by_field = {m["field"]: m for m in out["models"]}
    assert set(by_field) == {"caption.engine.model_path", "prompts.engine.model_path",
                             "ground.model_path", "segment.checkpoint",
                             "score.clip_model_path"}
    assert all(m["status"] == "missing" and m["config"] == PROD_PREP for m in out["models"])
    caption = by_field["caption.engine.model_path"]
    assert caption["engine"] == "vllm"
    assert ("huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir "
            "/mnt/models/Qwen2.5-VL-7B-Instruct") in caption["stage"]
    sam2 = by_field["segment.checkpoint"]["stage"]
    assert "sam2.1_hiera_large.pt --local-dir /mnt/models" in sam2


def test_production_table_names_fields_and_fixes(capsys) -> None:
    assert main(["check", "--config", PROD_PREP]) == 1
    text = capsys.readouterr().out
    assert "MISSING" in text and "caption.engine.model_path" in text
    assert "5 model(s), 5 missing or wrong" in text


def test_tiny_configs_with_tiny_models_pass(capsys, tiny_clip, tiny_clip_text) -> None:
    rc, out = run_json(capsys, "--config", QUICK_PREP,
                       "--set", f"score.clip_model_path={tiny_clip}")
    assert rc == 0, out
    [clip] = out["models"]
    assert clip["field"] == "score.clip_model_path" and clip["status"] == "ok"
    assert clip["architectures"] == ["CLIPModel"]
    rc, out = run_json(capsys, "--config", TINY_UNET,
                       "--set", f"encoders.text_encoder.path={tiny_clip_text}")
    assert rc == 0, out
    assert {m["field"] for m in out["models"]} >= {"encoders.text_encoder.path"}
    assert all(m["status"] == "ok" for m in out["models"])


def test_wrong_architecture_is_reported(capsys, tiny_clip_text) -> None:
    # A CLIP *text* encoder where the temporal score needs CLIP with a vision tower.
    rc, out = run_json(capsys, "--config", QUICK_PREP,
                       "--set", f"score.clip_model_path={tiny_clip_text}")
    assert rc == 1
    [m] = out["models"]
    assert m["status"] == "wrong" and "CLIPTextModel" in m["detail"]
    assert "score.clip_model_path" in m["detail"]


def test_unservable_captioner_makes_the_config_invalid(capsys, tmp_path) -> None:
    folder = tmp_path / "Llama-3.2-11B-Vision-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["MllamaForConditionalGeneration"], "vision_config": {}}))
    rc, out = run_json(capsys, "--config", QUICK_PREP, "--set", "caption.engine.kind=vllm",
                       "--set", f"caption.engine.model_path={folder}")
    assert rc == 1
    [bad] = out["invalid_configs"]
    assert "MllamaForConditionalGeneration" in bad["detail"]
    assert "caption.engine: model_path" in bad["detail"]


def test_weights_missing_beside_config_json(tmp_path) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"]}))
    report = check_need(ModelNeed("c.yaml", "score.clip_model_path", str(folder), "CLIP"))
    assert report.status == "wrong" and "no weights file" in report.detail


def test_unknown_models_get_a_copy_hint() -> None:
    need = ModelNeed("c.yaml", "model.init_from", "/mnt/models/ttm/mine", "weights", "any")
    assert "no known hub source" in stage_hint(need)


@pytest.mark.parametrize("args", [["check", "--config", "/no/such.yaml"],
                                  ["check", "--config", str(REPO / "jobs/configs/rehearsal")],
                                  ["check"], ["nope"]])
def test_bad_arguments_exit_2(args: list[str], capsys) -> None:
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    assert rc == 2


def test_kind_without_models_is_a_bad_argument(tmp_path, capsys) -> None:
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("kind: synth\n")
    assert main(["check", "--config", str(cfg)]) == 2
    assert "loads no models" in capsys.readouterr().err


def test_help_explains_staging(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "huggingface-cli download" in capsys.readouterr().out
    assert "models" in COMMANDS


def test_ray_data_llm_captioner_is_checked_as_vllm(tmp_path: Path) -> None:
    """The Ray Data LLM processor serves the folder with vLLM: Mllama there is refused too."""
    from ttm_ray.ops.models_check import _engine_needs

    class Engine:
        kind, model_path = "ray_data_llm", str(tmp_path)

    class Section:
        engine = Engine()

    class Cfg:
        caption = Section()

    [(field, path, info)] = _engine_needs(Cfg(), "caption", "caption VLM")
    assert field == "caption.engine.model_path" and path == str(tmp_path)
    assert info["engine"] == "vllm"
