"""Scoring on Ray Data actor pools (ttm_ray/evaluation/scoring.py): the actors decode and
score, the driver only aggregates; the numbers equal the in-process path's; a file that does
not decode becomes a reject, not a failed run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from ttm_ray.config import from_dict
from ttm_ray.config.resources import StageResources
from ttm_ray.evaluation import tiny
from ttm_ray.evaluation.benchmark import eval_items, evaluate_variants
from ttm_ray.evaluation.config import EvaluationConfig
from ttm_ray.evaluation.scoring import (
    DECODE_FAILED,
    ScoreWorker,
    collect,
    plan_chunks,
    score_local,
    score_ray,
)
from ttm_ray.inference.items import load_items, load_pixels

REPO = Path(__file__).resolve().parents[2]
FRAMES, FPS, VARIANT = 8, 8.0, "generated_manual"
# Per-item values: the actor runs torch with Ray's thread count, the driver with its own, and
# a chunk that lost a rejected item batches differently: float32 reductions may round
# differently (measured: equal to 1e-16 on the same chunks, benchmarks/results/
# eval_driver_memory.md). FVD: float64 from the features.
ITEM_RTOL, ITEM_ATOL, FVD_RTOL = 1e-6, 1e-9, 1e-6


def write_generated(items: list, out: Path, broken: tuple[str, ...] = ()) -> None:
    """Stand-in generated outputs: each item's sampled reference clip at half size, with the
    record evaluation reads; ``broken`` items get a video file that does not decode."""
    from ttm_ray.dataset.video import resize_center_crop, write_video

    for item in items:
        folder = out / VARIANT / item.item_id
        folder.mkdir(parents=True, exist_ok=True)
        if item.item_id in broken:
            (folder / "video.mp4").write_bytes(b"not a video")
        else:
            ref = load_pixels(item, FRAMES, FPS).reference
            h, w = ref.shape[1:3]
            small = resize_center_crop(ref, h // 4 * 2, w // 4 * 2)
            write_video(folder / "video.mp4", np.ascontiguousarray(small[::-1]), FPS)
        (folder / "generation.json").write_text(json.dumps({"objects": [1]}))


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path, EvaluationConfig]:
    from data_prep.synthetic import generate_corpus, write_benchmark_manifest

    root = tmp_path_factory.mktemp("scoring")
    manifest = write_benchmark_manifest(generate_corpus(root / "corpus", 5, seed=3),
                                        root / "manifest.jsonl")
    items = load_items(str(manifest))
    out = root / "out"
    write_generated(items, out, broken=(items[1].item_id,))
    cfg = from_dict(EvaluationConfig, {
        "device": "cpu", "video_batch_size": 2, "benchmark": "test",
        "clip": {"path": str(tiny.build_tiny_clip(root / "clip"))},
        "viclip": {"path": str(tiny.build_tiny_xclip(root / "xclip"))},
        "fvd": {"weights": str(tiny.build_tiny_fvd_weights(root / "fvd")), "num_frames": 4,
                "size": 16},
        "flow": {"backend": "lucas_kanade"},
        "score": {"progress_every": 2},
    })
    return items, out, cfg


def test_plan_holds_paths_not_frames(bench) -> None:
    items, out, _ = bench
    missing: list[str] = []
    rows = plan_chunks([*items, items[0].__class__("absent", "x", reference_video="r.mp4")],
                       out / VARIANT, 2, missing)
    assert missing == ["absent"]
    entries = [e for r in rows for e in json.loads(r["payload"])]
    assert [e["video_id"] for e in entries] == [i.item_id for i in items]
    assert [len(json.loads(r["payload"])) for r in rows] == [2, 2, 1]
    assert all(set(e) == {"index", "video_id", "video", "reference_video", "caption",
                          "subset"} for e in entries)


def _assert_same(a, b) -> None:
    """Two EvaluationResults: same items, per-item values and subset aggregates."""
    assert [r["video_id"] for r in a.per_video] == [r["video_id"] for r in b.per_video]
    for ra, rb in zip(a.per_video, b.per_video, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], abs=ITEM_ATOL, rel=ITEM_RTOL), (k, ra, rb)
            else:
                assert ra[k] == rb[k]
    assert a.subsets.keys() == b.subsets.keys()
    for subset, va in a.subsets.items():
        vb = b.subsets[subset]
        assert va["n_videos"] == vb["n_videos"]
        for m in a.metrics:
            if va[m] is None or vb[m] is None:
                assert va[m] is vb[m] is None, (subset, m)
            elif m == "fvd":
                assert va[m] == pytest.approx(vb[m], rel=FVD_RTOL), (subset, va, vb)
            else:
                assert va[m] == pytest.approx(vb[m], abs=ITEM_ATOL, rel=ITEM_RTOL), (subset, m)


def test_local_engine_equals_the_old_driver_path_and_rejects_bad_files(bench) -> None:
    items, out, cfg = bench
    evaluator = cfg.build()
    broken = items[1].item_id
    good = [i for i in items if i.item_id != broken]
    # The old path: every item decoded in this process, Evaluator.evaluate over them.
    old = evaluator.evaluate(list(eval_items(good, out / VARIANT, FRAMES, FPS, [])))
    rejected: dict[str, list] = {}
    new, missing = evaluate_variants(evaluator, items, out, [VARIANT], FRAMES, FPS,
                                     engine="local", evaluation=cfg, rejected=rejected)
    assert missing == {VARIANT: []}
    assert [(r["video_id"], r["reason"]) for r in rejected[VARIANT]] == [
        (broken, DECODE_FAILED)]
    # The broken item shifts the chunks, so compare with the old path on the same chunks.
    rows = plan_chunks(good, out / VARIANT, evaluator.video_batch_size, [])
    same_chunks = collect(evaluator, score_local(evaluator, rows, FRAMES, FPS), len(good))
    for a, b in ((old, same_chunks.results), (old, new[VARIANT])):
        _assert_same(a, b)
    # Same chunks in the same process: bit-identical.
    assert old.per_video == same_chunks.results.per_video
    assert old.subsets == same_chunks.results.subsets


def test_ray_engine_scores_in_actors_and_equals_the_local_path(bench, ray_local) -> None:
    items, out, cfg = bench
    evaluator = cfg.build()
    rows = plan_chunks(items, out / VARIANT, evaluator.video_batch_size, [])
    local = collect(evaluator, score_local(evaluator, rows, FRAMES, FPS), len(items))
    actors = StageResources(num_cpus=1, max_actors=1)
    remote = collect(evaluator, score_ray(cfg, rows, FRAMES, FPS, actors, progress=False,
                                          capacity_timeout_s=60), len(items))
    # Every item was decoded and scored in an actor process, not in this driver.
    assert remote.pids and os.getpid() not in remote.pids
    assert local.pids == {os.getpid()}
    assert remote.rejected_by_reason == local.rejected_by_reason == {DECODE_FAILED: 1}
    assert remote.results is not None and local.results is not None
    _assert_same(remote.results, local.results)
    assert remote.results.subsets["all"]["fvd"] is not None


def test_worker_runs_without_ray_over_rows(bench) -> None:
    """The stage is a plain callable over rows (as every pipeline stage)."""
    items, out, cfg = bench
    evaluator = cfg.build()
    rows = plan_chunks(items[:2], out / VARIANT, 2, [])
    got = ScoreWorker(evaluator, FRAMES, FPS)(rows)
    assert [(r["video_id"], r["status"]) for r in got] == [
        (items[0].item_id, "scored"), (items[1].item_id, "rejected")]
    assert got[1]["reason"] == DECODE_FAILED and "Error" in got[1]["detail"]


@pytest.mark.slow
def test_evaluate_job_scores_on_ray_and_reports_rejects(bench, ray_local, tmp_path,
                                                        caplog) -> None:
    """``jobs.evaluate`` (generation skipped: the stand-in outputs are "done") scores on the
    actor pool and counts the item that does not decode in the summary, the settings table
    and failures.jsonl."""
    from jobs.evaluate import evaluate
    from jobs.inference_config import EvaluateConfig
    from ttm_ray.config import load_config

    caplog.set_level(logging.INFO, logger="ttm_ray.evaluation.scoring")
    items, out, cfg = bench
    export = tmp_path / "export"  # evaluation reads only the clip length from an export
    export.mkdir()
    (export / "export.json").write_text(json.dumps({"pixel_shape": [FRAMES, 32, 32]}))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(i.as_dict()) + "\n" for i in items))
    job_out = tmp_path / "eval"
    job_out.mkdir()
    (job_out / VARIANT).symlink_to(out / VARIANT)
    sets = [f"manifest={manifest}", f"out_dir={job_out}", f"batch.fps={FPS}",
            f"run.mlflow_tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"generation.stage1.export={export}", f"generation.stage2.export={export}",
            f"batch.variants=[{VARIANT}]", "engine=ray", "evaluation.video_batch_size=2",
            "evaluation.score.engine=ray", "evaluation.score.progress_every=2",
            f"evaluation.clip.path={cfg.clip.path}", f"evaluation.viclip.path={cfg.viclip.path}",
            f"evaluation.fvd.weights={cfg.fvd.weights}", "evaluation.fvd.num_frames=4",
            "evaluation.fvd.size=16"]
    job_cfg = load_config(EvaluateConfig, REPO / "jobs/configs/evaluate/quickstart.yaml", sets)
    summary = evaluate(job_cfg, progress=False, skip_generation=True)
    assert summary["score_engine"] == "ray"
    assert summary["scored"] == {VARIANT: len(items) - 1}
    assert summary["rejected"] == {VARIANT: 1}
    table = (Path(summary["report"]) / "settings.md").read_text()
    assert f"{VARIANT}: 1 {DECODE_FAILED}" in table
    failures = [json.loads(line) for line in (job_out / "failures.jsonl").read_text().splitlines()]
    assert [(f["item_id"], f["stage"], f["reason"]) for f in failures] == [
        (items[1].item_id, "score", DECODE_FAILED)]
    # Progress: a line every 2 items, and one at the end.
    progress = [r.getMessage() for r in caplog.records if "items scored" in r.getMessage()]
    assert progress[-1].startswith(f"scoring {VARIANT}: {len(items)}/{len(items)} items")
    assert len(progress) == 3, progress
