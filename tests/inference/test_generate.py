"""Two-stage generation end to end on CPU with tiny models, for both families: the job's
files and record, determinism for a seed, and each way of skipping a part (given prompts:
no LLM; given masks: no SAM2; given trajectory: no stage 1), plus the full front-end (a
scripted LLM answer, Grounding DINO + SAM2) and bad inputs."""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import STEPS, build_random_sam2
from PIL import Image

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
    [folder] = map(Path, summary["item_dirs"])
    assert folder.parent == out / "generated" and folder.name.startswith("x0-")
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
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    [folder] = map(Path, json.loads(captured.out.strip().splitlines()[-1])["item_dirs"])
    assert folder.parent == out / "given_trajectory"
    record = json.loads((folder / "generation.json").read_text())
    assert record["trajectory_source"] == "annotation" and record["stage1"] is None


def _png(path: Path, image: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(image).save(path)
    return str(path)


def _given(item, image: str, *extra: str) -> list[str]:
    """CLI args for one image with the item's prompts and masks (no LLM, no SAM2)."""
    return ["--image", image, "--prompt", item.prompt, "--motion-prompt", item.motion_prompt,
            *[f"--object={n}={p}" for n, p in item.object_prompts], "--masks", item.annotation,
            *extra]


def _run(tmp_path: Path, exports: dict[int, Path], capsys, *args: str) -> tuple[dict, str]:
    """One successful CLI run into the default item folder: (summary, stderr)."""
    code, _ = _job(tmp_path, exports, *args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def _item_folders(out: Path) -> list[Path]:
    return sorted(p for p in (out / "generated").iterdir() if not p.name.startswith("."))


def test_default_ids_give_each_image_its_own_video_and_a_rerun_skips(sensitive_exports, bench,
                                                                      tmp_path, capsys):
    """The bug: a second image into the default folder exited 0 with the first's video."""
    exports = sensitive_exports  # their clip depends on the image, so the videos must differ
    item = _item(bench)
    pixels = load_pixels(item, 1, None).image
    a = _png(tmp_path / "a.png", pixels)
    b = _png(tmp_path / "b.png", np.ascontiguousarray(pixels[:, ::-1]))  # another image
    first, _ = _run(tmp_path, exports, capsys, *_given(item, a))
    second, err = _run(tmp_path, exports, capsys, *_given(item, b))
    assert first["generated"] == second["generated"] == 1 and second["skipped_done"] == 0
    [folder_a], [folder_b] = (list(map(Path, s["item_dirs"])) for s in (first, second))
    assert str(folder_b) in err  # the user is told where the video went
    out = tmp_path / "out"
    assert _item_folders(out) == sorted([folder_a, folder_b])
    assert re.fullmatch(r"a-[0-9a-f]{10}", folder_a.name), folder_a.name
    assert re.fullmatch(r"b-[0-9a-f]{10}", folder_b.name), folder_b.name
    video_a, video_b = folder_a / "video.mp4", folder_b / "video.mp4"
    assert video_a.read_bytes() != video_b.read_bytes()
    frames = json.loads((folder_a / "generation.json").read_text())["stage2"]["pixels"][0]
    assert not np.array_equal(read_frames(str(video_a), range(frames)),
                              read_frames(str(video_b), range(frames)))

    # The same input again: found finished, skipped, its folder named, nothing rewritten.
    mtime = video_a.stat().st_mtime_ns
    again, err = _run(tmp_path, exports, capsys, *_given(item, a))
    assert again["generated"] == 0 and again["skipped_done"] == 1
    assert again["item_dirs"] == first["item_dirs"] and "already done (batch.overwrite" in err
    assert str(folder_a) in err and video_a.stat().st_mtime_ns == mtime
    assert _item_folders(out) == sorted([folder_a, folder_b])

    # The same image with another prompt is another item; an explicit --id still wins.
    other, _ = _run(tmp_path, exports, capsys,
                    *_given(item, a, "--prompt", item.prompt + " at dusk"))
    assert other["generated"] == 1 and other["item_dirs"] != first["item_dirs"]
    named, _ = _run(tmp_path, exports, capsys, *_given(item, a, "--id", "mine"))
    assert named["generated"] == 1 and named["item_dirs"] == [str(out / "generated" / "mine")]
    assert len(_item_folders(out)) == 4


def test_derived_id_follows_the_inputs_and_the_settings_that_change_the_video(
        tiny_exports, bench, tmp_path):
    from jobs.generate import id_settings
    from jobs.inference_config import GenerateConfig
    from ttm_ray.config import load_config
    from ttm_ray.inference.items import item_from_row

    item = _item(bench)
    image = _png(tmp_path / "cat photo.png", load_pixels(item, 1, None).image)
    masks = tmp_path / "masks.json"
    masks.write_bytes(Path(item.annotation).read_bytes())
    base = {"prompt": item.prompt, "image": image, "motion_prompt": item.motion_prompt,
            "object_prompts": [{"name": n, "prompt": p} for n, p in item.object_prompts],
            "annotation": str(masks)}

    def derived(row: dict | None = None, *overrides: str, family: str = "dit") -> str:
        exports = tiny_exports[family]
        cfg = load_config(GenerateConfig, QUICKSTART, [
            f"generation.stage1.export={exports[1]}", f"generation.stage2.export={exports[2]}",
            *overrides])
        return item_from_row(row or base, id_settings(cfg)).item_id

    ref = derived()
    assert re.fullmatch(r"cat_photo-[0-9a-f]{10}", ref), ref
    assert derived() == ref  # stable: a rerun finds its folder
    # Nothing that reaches the pipeline identically changes it: spacing of the prompt (it is
    # normalised), the device, where the same image lies.
    assert derived({**base, "prompt": "  " + item.prompt.replace(" ", "   ")}) == ref
    assert derived(None, "generation.device=cuda") == ref
    (tmp_path / "elsewhere").mkdir()
    copy = _png(tmp_path / "elsewhere" / "cat photo.png", load_pixels(item, 1, None).image)
    assert derived({**base, "image": copy}) == ref
    # Every input and output-changing setting does.
    others = [
        derived({**base, "prompt": item.prompt + " slowly"}),
        derived({**base, "motion_prompt": "it jumps"}),
        derived({**base, "object_prompts": [{"name": "cat", "prompt": "a cat"}]}),
        derived(None, "generation.seed=7"),
        derived(None, "generation.stage2.steps=4"),
        derived(None, "generation.stage1.scale_text=3.0"),
        derived(family="unet"),  # other models (their export.json)
    ]
    masks.write_text(masks.read_text().replace("{", "{ ", 1))  # same path, other content
    others.append(derived())
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)  # the image overwritten
    others.append(derived())
    assert len({ref, *others}) == len(others) + 1, others
    # An explicit id wins; a manifest row keeps needing one (its ids name the results).
    assert derived({**base, "id": "mine"}) == "mine"
    with pytest.raises(ValueError, match="id: required"):
        item_from_row(base)


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
    notes = out.record["notes"]
    assert {k: notes[k] for k in ("prompt_source", "mask_source")} == {
        "prompt_source": "llm", "mask_source": "sam2"}
    assert notes["name_binding"]["counts"]["exact"] == 1  # SAM2 masks carry c_local's names
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
