"""Batch generation and the failure-case harness: manifests, planning, the Table 5
perturbations, generation on Ray Data actor pools, resuming after an interruption, and
the evaluate job end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ttm_ray.inference.batch import plan
from ttm_ray.inference.harness import (
    TABLE5,
    HarnessConfig,
    drop_words,
    noisy_masks,
    variant_input,
    wrong_prompts,
)
from ttm_ray.inference.items import ManifestError, item_from_row, load_items

REPO = Path(__file__).resolve().parents[2]
GENERATE_CFG = REPO / "jobs" / "configs" / "generate" / "quickstart.yaml"
EVALUATE_CFG = REPO / "jobs" / "configs" / "evaluate" / "quickstart.yaml"


# ---------------------------------------------------------------------------- manifests
def test_manifest_problems_are_listed_with_their_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"id": "a", "prompt": "a cat", "image": "a.png"},
            {"id": "a", "prompt": "again", "image": "b.png"},  # duplicate id
            {"id": "c", "image": "c.png"},  # no prompt
            {"id": "d", "prompt": "x"},  # no image nor reference
            {"id": "e", "prompt": "x", "image": "e.png", "colour": "red"},  # unknown field
            {"id": "f", "prompt": "x", "image": "f.png", "object_prompts": [{"name": "x"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ManifestError) as info:
        load_items(str(path))
    text = str(info.value)
    for n, words in ((2, "duplicate id"), (3, "prompt: required"),
                     (4, "image or reference_video"), (5, "unknown field"),
                     (6, "object_prompts[0] needs")):
        assert f"item {n}: " in text and words in text, (n, text)
    (tmp_path / "bad.jsonl").write_text('{"id": "a"\n')
    with pytest.raises(ManifestError, match="line 1 is not JSON"):
        load_items(str(tmp_path / "bad.jsonl"))


def test_csv_and_parquet_manifests_read_the_same_items(tmp_path, bench):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    items = load_items(str(bench))
    rows = [{**i.as_dict(), "object_prompts": json.dumps(i.as_dict()["object_prompts"])}
            for i in items]
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "m.csv")
    pq.write_table(pa.Table.from_pylist([i.as_dict() for i in items]), tmp_path / "m.parquet")
    assert load_items(str(tmp_path / "m.csv")) == items
    assert load_items(str(tmp_path / "m.parquet")) == items


# ---------------------------------------------------------------------------- harness
def test_mask_noise_strength_and_determinism():
    masks = np.zeros((2, 3, 64, 64), dtype=bool)
    masks[0, :, 20:40, 20:40] = True
    masks[1, :, 5:15, 40:60] = True
    cfg = HarnessConfig()

    def changed(shift, morph, seed=0):
        out = noisy_masks(masks, shift, morph, np.random.default_rng(seed))
        return out, (out != masks).mean()

    mild, d_mild = changed(cfg.mild_shift, cfg.mild_morph)
    _, d_strong = changed(cfg.strong_shift, cfg.strong_morph)
    assert 0 < d_mild < d_strong
    assert np.array_equal(mild, changed(cfg.mild_shift, cfg.mild_morph)[0])  # same seed
    assert np.array_equal(noisy_masks(masks, 0, 0, np.random.default_rng(0)), masks)


def test_prompt_perturbations():
    rng = np.random.default_rng(0)
    text = "a red ball rolls slowly to the left of the blue box"
    dropped = drop_words(text, 0.5, rng)
    assert set(dropped.split()) <= set(text.split()) and len(dropped.split()) < len(text.split())
    assert drop_words("one", 0.99, rng) == "one"  # never empty
    mine = {"item_id": "a", "caption": "A cat.", "c_motion": "jumps",
            "c_local": [{"name": "cat", "prompt": "a cat jumps"},
                        {"name": "dog", "prompt": "a dog sits"}]}
    donor = {"item_id": "b", "caption": "A car.", "c_motion": "drives",
             "c_local": [{"name": "car", "prompt": "a car drives"}]}
    wrong = wrong_prompts(mine, donor)
    assert wrong["caption"] == "A car." and wrong["c_motion"] == "drives"
    # names stay (they pair prompts with masks), prompts are the donor's
    assert wrong["c_local"] == [{"name": "cat", "prompt": "a car drives"},
                                {"name": "dog", "prompt": "a car drives"}]


def test_each_variant_builds_its_setting(bench):
    from data_prep.annotate import AnnotateConfig, ImageAnnotator
    from ttm_ray.inference.items import annotation_request, load_pixels

    items = load_items(str(bench))
    item = items[0]
    pixels = load_pixels(item, 4, 8.0)
    request = annotation_request(item, pixels.frame_indices, want_llm=False)
    [response] = ImageAnnotator(AnnotateConfig(mask_source="gt"))([request])
    donor = {"item_id": "other", "caption": "Other.", "c_motion": "other motion",
             "c_local": [{"name": "z", "prompt": "other prompt"}]}
    cfg = HarnessConfig()
    gt = variant_input("gt_manual", response, pixels.image, 0, cfg)
    assert gt.trajectory is not None and gt.trajectory.shape[1] == len(pixels.frame_indices)
    assert variant_input("generated_manual", response, pixels.image, 0, cfg).trajectory is None
    mild = variant_input("noisy_mild", response, pixels.image, 0, cfg)
    strong = variant_input("noisy_strong", response, pixels.image, 0, cfg)
    assert (mild.trajectory != gt.trajectory).mean() < (strong.trajectory != gt.trajectory).mean()
    dropout = variant_input("gt_dropout", response, pixels.image, 0, cfg)
    assert len(dropout.caption.split()) < len(gt.caption.split())
    wrong = variant_input("gt_wrong", response, pixels.image, 0, cfg, donor)
    assert wrong.caption == "Other." and {o.prompt for o in wrong.objects} == {"other prompt"}
    with pytest.raises(ValueError, match="llm_c_local"):
        variant_input("gt_llm", response, pixels.image, 0, cfg)  # not asked with want_llm
    with pytest.raises(ValueError, match="at least two items"):
        variant_input("gt_wrong", response, pixels.image, 0, cfg)


def test_plan_skips_done_pairs_and_records_impossible_ones(tmp_path):
    items = [item_from_row({"id": "full", "prompt": "p", "image": "a.png",
                            "motion_prompt": "m", "object_prompts": [{"name": "x",
                                                                      "prompt": "y"}],
                            "annotation": "a.json"}),
             item_from_row({"id": "bare", "prompt": "p", "image": "b.png"}),
             item_from_row({"id": "lender", "prompt": "q", "image": "c.png",
                            "object_prompts": [{"name": "z", "prompt": "w"}]})]
    done = tmp_path / "gt_manual" / "full"
    done.mkdir(parents=True)
    (done / "generation.json").write_text("{}")
    work = plan(items, ["generated", *TABLE5], tmp_path)
    assert work.skipped_done == 1
    todo = {r["item_id"]: json.loads(r["payload"])["variants"] for r in work.rows}
    assert todo["full"] == ["generated", *[v for v in TABLE5 if v != "gt_manual"]]
    assert todo["bare"] == ["generated"]
    reasons = {(f["item_id"], f["variant"]): f["reason"] for f in work.failures}
    assert reasons[("bare", "gt_manual")] == "no_annotation"
    assert reasons[("bare", "generated_manual")] == "no_given_prompts"
    # gt_wrong borrows from the next item that has prompts (skipping "bare")
    assert json.loads(work.rows[0]["payload"])["donor"]["item_id"] == "lender"
    assert json.loads(work.rows[2]["payload"])["donor"]["item_id"] == "full"
    assert work.pending == sum(len(v) for v in todo.values())


# ---------------------------------------------------------------------------- Ray Data
def _manifest_with_a_broken_item(bench: Path, tmp_path: Path) -> Path:
    rows = [json.loads(x) for x in bench.read_text().splitlines()]
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    rows.append({**rows[0], "id": "broken", "reference_video": str(broken)})
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.slow
def test_batch_on_ray_data_records_failures_and_skips_done_items(
        ray_local, tiny_exports, bench, tmp_path, capsys):
    from jobs.generate import main as generate_main

    manifest = _manifest_with_a_broken_item(bench, tmp_path)
    args = ["--config", str(GENERATE_CFG), "--manifest", str(manifest),
            "--stage1", str(tiny_exports["unet"][1]), "--stage2", str(tiny_exports["unet"][2]),
            "--out", str(tmp_path / "out"), "--steps", "2", "--no-progress",
            "--set", "engine=ray", "--set", "batch.variants=[generated_manual, gt_manual]"]
    assert generate_main(args) == 1  # the broken item fails; the others are kept
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "2 of 8 items failed" in summary["error"]
    out = tmp_path / "out"
    done = sorted(p.parent.name for p in out.glob("*/*/generation.json"))
    assert done == sorted([i.item_id for i in load_items(str(bench))] * 2)
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert {(f["item_id"], f["reason"]) for f in failures} == {("broken", "unreadable_input")}
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/*/generation.json")}
    assert generate_main(args) == 1  # rerun: only the broken item is tried again
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/generation.json")} == stamp


@pytest.mark.slow
def test_an_interrupted_batch_resumes_where_it_stopped(tiny_exports, bench, tmp_path):
    """A batch killed after its first finished item; the rerun generates only the rest."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.generate", "--config", str(GENERATE_CFG),
            "--manifest", str(bench), "--stage1", str(tiny_exports["dit"][1]),
            "--stage2", str(tiny_exports["dit"][2]), "--out", str(out), "--steps", "2",
            "--no-progress", "--set", "engine=local",
            "--set", "batch.variants=[generated_manual]"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not list(out.glob("generated_manual/*/generation.json")):
            assert proc.poll() is None, "the batch ended before it could be interrupted"
            assert time.monotonic() < deadline, "no item finished in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {p.parent.name for p in out.glob("generated_manual/*/generation.json")}
    assert 1 <= len(first) < 3
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["skipped_done"] == len(first) and summary["generated"] == 3 - len(first)
    assert len(list(out.glob("generated_manual/*/generation.json"))) == 3
    assert not list(out.glob("generated_manual/.*.tmp-*"))  # no half-written folder left


@pytest.mark.slow
def test_evaluate_job_scores_every_setting_and_logs_to_mlflow(tiny_exports, bench, tmp_path,
                                                              capsys):
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import main as evaluate_main
    from ttm_ray.evaluation.tiny import build_tiny_clip, build_tiny_fvd_weights, build_tiny_xclip

    models = tmp_path / "models"
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = evaluate_main([
        "--config", str(EVALUATE_CFG), "--no-progress",
        "--set", f"manifest={bench}", "--set", f"out_dir={tmp_path / 'eval'}",
        "--set", f"run.mlflow_tracking_uri={db}", "--set", "engine=local",
        "--set", f"generation.stage1.export={tiny_exports['dit'][1]}",
        "--set", f"generation.stage2.export={tiny_exports['dit'][2]}",
        "--set", "generation.stage1.steps=2", "--set", "generation.stage2.steps=2",
        "--set", "batch.variants=[gt_manual, generated_manual, gt_wrong]",
        "--set", f"evaluation.clip.path={build_tiny_clip(models / 'clip')}",
        "--set", f"evaluation.viclip.path={build_tiny_xclip(models / 'xclip')}",
        "--set", f"evaluation.fvd.weights={build_tiny_fvd_weights(models / 'fvd')}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, summary
    assert summary["scored"] == {"gt_manual": 3, "generated_manual": 3, "gt_wrong": 3}
    report = Path(summary["report"])
    table = (report / "settings.md").read_text()
    for v in ("gt_manual", "generated_manual", "gt_wrong"):
        assert f"| {v} | 3 |" in table
        assert (report / f"{v}.csv").is_file() and (report / f"{v}_per_video.csv").is_file()
        # the settings' own names bind exactly (name binding is counted in the report)
        binding = summary["name_binding"][v]
        assert binding["exact"] == binding["objects"] > 0 and binding["unbound"] == 0
    assert "Local prompts bound to masks by name" in table
    for v, values in summary["all"].items():
        assert all(values[m] is not None for m in ("fvd", "clipframe", "viclip_t",
                                                  "viclip_v", "ad")), (v, values)
    run = MlflowClient(db).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["eval/gt_wrong/all/n_videos"] == 3
    assert "eval/generated_manual/all/fvd" in run.data.metrics
    assert run.data.tags["ttm.kind"] == "evaluate"
