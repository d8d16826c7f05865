"""Two-stage generation end to end on CPU with tiny models, for both families: the job's
files and record, determinism for a seed, and each way of skipping a part (given prompts:
no LLM; given masks: no SAM2; given trajectory: no stage 1), plus the full front-end (a
scripted LLM answer, Grounding DINO + SAM2) and bad inputs."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import STEPS, build_random_sam2

from data_prep.annotate import AnnotateConfig, ImageAnnotator
from jobs.generate import main as generate_main
from ttm_ray.dataset.video import read_frames
from ttm_ray.inference import GenerationConfig, StageModelConfig, TwoStageGenerator
from ttm_ray.inference.annotation import generation_input
from ttm_ray.inference.generate import fit_masks
from ttm_ray.inference.items import annotation_request, load_items, load_pixels

QUICKSTART = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "generate" / \
    "quickstart.yaml"


def _item(bench: Path, index: int = 0):
    return load_items(str(bench))[index]


def _gen_cfg(exports: dict[int, Path], seed: int = 0) -> GenerationConfig:
    return GenerationConfig(stage1=StageModelConfig(export=str(exports[1])),
                            stage2=StageModelConfig(export=str(exports[2])), device="cpu",
                            seed=seed)


def _annotated(bench: Path, frames: int, index: int = 0, **annotate) -> tuple:
    item = _item(bench, index)
    pixels = load_pixels(item, frames, 8.0)
    cfg = AnnotateConfig(mask_source="gt", **annotate)
    [response] = ImageAnnotator(cfg)([annotation_request(item, pixels.frame_indices)])
    return item, pixels, response


def _job(tmp_path: Path, exports: dict[int, Path], *args: str) -> tuple[int, dict, Path]:
    out = tmp_path / "out"
    code = generate_main(["--config", str(QUICKSTART), "--stage1", str(exports[1]),
                          "--stage2", str(exports[2]), "--out", str(out), "--no-progress",
                          "--steps", "2", *args])
    return code, out


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_generate_job_writes_the_clip_and_its_record(family, tiny_exports, bench, tmp_path,
                                                     capsys):
    item = _item(bench)
    # The input image as a PNG (an image file opens as a one-frame video).
    from PIL import Image

    image = tmp_path / "x0.png"
    Image.fromarray(load_pixels(item, 1, None).image).save(image)
    objects = [f"--object={n}={p}" for n, p in item.object_prompts]
    code, out = _job(tmp_path, tiny_exports[family], "--image", str(image), "--prompt",
                     item.prompt, "--motion-prompt", item.motion_prompt, *objects,
                     "--masks", item.annotation, "--seed", "3")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["status"] == "succeeded" and summary["generated"] == 1
    folder = out / "generated" / "sample"
    record = json.loads((folder / "generation.json").read_text())
    assert record["seed"] == 3 and record["caption"] == item.prompt
    assert record["c_motion"] == item.motion_prompt
    assert [(o["name"], o["prompt"]) for o in record["objects"]] == list(item.object_prompts)
    assert record["trajectory_source"] == "stage1"
    assert record["notes"]["prompt_source"] == "given" and record["notes"]["mask_source"] == "gt"
    for stage in ("stage1", "stage2"):
        assert record[stage]["steps"] == 2  # --steps over the config's 10
        assert (record[stage]["scale_visual"], record[stage]["scale_text"]) == (1.5, 8.5)
        assert record[stage]["model"]["family"] == family
    frames, h, w = record["stage2"]["pixels"]
    for name in ("video.mp4", "trajectory.mp4", "overlay.mp4"):
        assert read_frames(str(folder / name), range(frames)).shape == (frames, h, w, 3)
    assert (folder / "first_frame.png").is_file()
    assert (out / "config.yaml").is_file()  # the effective config beside the outputs


def test_same_seed_same_clip_other_seed_other_clip(tiny_exports, bench):
    gen = TwoStageGenerator(_gen_cfg(tiny_exports["dit"]))
    _, pixels, response = _annotated(bench, gen.stage2.frames)
    a = gen.generate(generation_input(response, pixels.image, seed=1))
    b = gen.generate(generation_input(response, pixels.image, seed=1))
    c = gen.generate(generation_input(response, pixels.image, seed=2))
    assert np.array_equal(a.video, b.video) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.video, c.video)
    assert gen.stage1.describe()["steps"] == STEPS  # the export's own sampler settings
    assert a.stage1_ran and a.video.shape == (gen.stage2.frames, gen.stage2.height,
                                              gen.stage2.width, 3)


def test_given_trajectory_skips_stage_1(tiny_exports, bench):
    gen = TwoStageGenerator(_gen_cfg(tiny_exports["unet"]), load_stage1=False)
    assert gen.stage1 is None
    _, pixels, response = _annotated(bench, gen.stage2.frames)
    inp = generation_input(response, pixels.image, seed=0, use_trajectory=True)
    out = gen.generate(inp)
    assert not out.stage1_ran and out.record["stage1"] is None
    # Stage 2 was conditioned on exactly the given masks, mapped to its pixel grid.
    expected = fit_masks(inp.trajectory, gen.stage2.frames, gen.stage2.height, gen.stage2.width)
    assert np.array_equal(out.masks, expected)
    # Without a trajectory the generator refuses clearly (stage 1 is not loaded).
    with pytest.raises(ValueError, match="stage 1 was not loaded"):
        gen.generate(generation_input(response, pixels.image, seed=0))


def test_trajectory_job_option(tiny_exports, bench, tmp_path, capsys):
    item = _item(bench, 1)
    objects = [f"--object={n}={p}" for n, p in item.object_prompts]
    code, out = _job(tmp_path, tiny_exports["dit"], "--image", item.reference_video,
                     "--prompt", item.prompt, *objects, "--trajectory", item.annotation)
    assert code == 0, capsys.readouterr().err[-2000:]
    record = json.loads((out / "given_trajectory" / "sample" / "generation.json").read_text())
    assert record["trajectory_source"] == "annotation" and record["stage1"] is None


class ScriptedLlm:
    """A TextEngine answering the Fig. 11 / 12 prompts with fixed, well-formed answers (a
    stand-in for the LLM's weights; the prompt stage's parsing and retries run for real)."""

    name, model_id = "scripted", "scripted-llm"

    def __init__(self, motion: str, local: str) -> None:
        self.motion, self.local = motion, local

    def generate(self, requests):
        return [self.motion if "Motion-specific prompt:" in r.user else self.local
                for r in requests]


def test_llm_prompts_and_sam2_masks_front_end(tiny_exports, bench, tiny_grounding_dino_dir):
    """No given prompts, no given masks: the LLM writes c_motion / c_local, Grounding DINO
    boxes them on the image, SAM2 segments s0; both stages run."""
    from data_prep.engines import EngineConfig
    from data_prep.stages.ground import GroundingConfig
    from data_prep.stages.prompts import PromptConfig

    item = _item(bench)
    [(name, _), *_] = item.object_prompts
    sam2_cfg, predictor = build_random_sam2_cached()
    cfg = AnnotateConfig(
        prompts=PromptConfig(engine=EngineConfig(kind="transformers", model_path="unused")),
        mask_source="sam2",
        ground=GroundingConfig(model_path=str(tiny_grounding_dino_dir), box_threshold=0.0,
                               text_threshold=0.0, device="cpu"),
        segment=sam2_cfg)
    llm = ScriptedLlm("Motion-specific prompt: the object moves to the right.",
                      f"[[{name}: A {name} moves to the right.]]")
    annotator = ImageAnnotator(cfg, engine=llm, sam2_predictor=predictor)
    request = annotation_request(item.__class__(item.item_id, item.prompt,
                                                image=item.reference_video), [0])
    [response] = annotator([request])
    assert response["status"] == "ok", response.get("reject_detail")
    assert response["prompt_source"] == "llm"
    assert response["c_motion"] == "the object moves to the right."
    assert [o["name"] for o in response["c_local"]] == [name]
    assert response["mask_source"] == "sam2" and len(response["masks"][0]["rle"]) == 1
    gen = TwoStageGenerator(_gen_cfg(tiny_exports["dit"]))
    pixels = load_pixels(item, 1, None)
    out = gen.generate(generation_input(response, pixels.image, seed=0))
    assert out.record["notes"] == {"prompt_source": "llm", "mask_source": "sam2"}
    assert out.video.shape[0] == gen.stage2.frames


_SAM2: list = []


def build_random_sam2_cached():
    if not _SAM2:
        _SAM2.append(build_random_sam2())
    return _SAM2[0]


def test_unparseable_llm_answer_fails_the_item_with_its_reason(tiny_exports, bench, tmp_path,
                                                               capsys):
    """The real transformers engine path with a tiny random Llama: its answer does not parse,
    so the item fails as unparseable_llm_output, recorded with the raw answers; exit 1."""
    from tiny_llm import build_tiny_llama  # tests/data_prep/tiny_llm.py (on sys.path)

    llama = build_tiny_llama(tmp_path / "llama")
    item = _item(bench)
    code, out = _job(tmp_path, tiny_exports["dit"], "--image", item.reference_video,
                     "--prompt", item.prompt, "--masks", item.annotation,
                     "--set", "annotate.prompts.engine.kind=transformers",
                     "--set", f"annotate.prompts.engine.model_path={llama}",
                     "--set", "annotate.prompts.engine.max_new_tokens=8",
                     "--set", "annotate.prompts.max_attempts=1")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and summary["status"] == "failed" and "failures.jsonl" in summary["error"]
    [failure] = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["reason"] == "unparseable_llm_output" and failure["variant"] == "generated"
    assert "attempts" in failure["detail"]  # the raw answers are kept


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a cat"], "input.image and input.prompt"),
    (["--image", "/nonexistent.png", "--prompt", "a cat", "--motion-prompt", "up",
      "--object", "cat=a cat"], "unreadable_input"),
    (["--image", "x.png", "--prompt", "a", "--object", "no-equals-sign"], "NAME=PROMPT"),
])
def test_bad_input_is_a_clear_error(args, message, tiny_exports, tmp_path, capsys):
    code, _ = _job(tmp_path, tiny_exports["dit"], *args)
    captured = capsys.readouterr()
    assert code != 0
    assert message in captured.out + captured.err + (
        (tmp_path / "out" / "failures.jsonl").read_text()
        if (tmp_path / "out" / "failures.jsonl").is_file() else "")


def test_missing_export_is_a_config_error(tmp_path, capsys):
    code = generate_main(["--config", str(QUICKSTART), "--image", "x.png", "--prompt", "a",
                          "--stage1", str(tmp_path / "nope1"), "--stage2", str(tmp_path),
                          "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 2
    assert "generation.stage1.export" in out.err and "holds no model.yaml" in out.err


def test_stage_mismatch_is_named(tiny_exports):
    cfg = GenerationConfig(stage1=StageModelConfig(export=str(tiny_exports["dit"][2])),
                           stage2=StageModelConfig(export=str(tiny_exports["dit"][2])),
                           device="cpu")
    with pytest.raises(ValueError, match=r"stage-2 model; generation\.stage1 needs stage 1"):
        TwoStageGenerator(cfg)


def test_annotator_factory_is_picklable_for_ray(tmp_path):
    import pickle

    factory = partial(ImageAnnotator, AnnotateConfig(mask_source="gt"))
    assert isinstance(pickle.loads(pickle.dumps(factory))(), ImageAnnotator)
