"""The whole curation pipeline on a local Ray cluster over the generated corpus: every input
accounted for, published versions, incremental reruns, crash + resume, refilter.

One full run over the corpus (``full_run``) is shared: it is the subject of the accounting
test and the reference of the crash, sequential and refilter tests, which never write into
it (the refilter test works on a copy)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.config import PrepConfig
from data_prep.job import HOLD_ENV, run_prep, run_refilter
from data_prep.pipeline import run_sequential
from data_prep.sources import list_inputs
from data_prep.synthetic import generate_corpus
from ttm_ray.config import from_dict
from ttm_ray.dataset.schema import SHARD_SCHEMA
from ttm_ray.dataset.versions import latest_version, list_versions, open_version

pytestmark = pytest.mark.slow

EXPECTED_REASON = {
    "truncated": "unreadable_video",
    "zero_bytes": "unreadable_video",
    "text_file": "unreadable_video",
    "bad_container": "unreadable_video",
    "single_frame": "too_short",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 valid videos + 5 broken inputs (one of each kind)."""
    return generate_corpus(tmp_path_factory.mktemp("corpus"), 16, seed=3, num_corrupt=5)


@pytest.fixture(scope="module")
def first12(corpus: Path) -> Path:
    """The same corpus minus 4 valid videos: the 'before' of an incremental rebuild."""
    table = pq.read_table(corpus)
    valid = [i for i, c in enumerate(table.column("corrupt").to_pylist()) if not c]
    drop = set(valid[-4:])
    keep = [i for i in range(table.num_rows) if i not in drop]
    path = corpus.with_name("manifest_first12.parquet")
    pq.write_table(table.take(pa.array(keep)), path)
    return path


def prep_config(manifest: Path, out: Path, clip_dir: Path, **extra: dict) -> PrepConfig:
    data = {
        "source": {"kind": "manifest", "path": str(manifest)},
        "caption": {"engine": {"kind": "manifest"}},
        "prompts": {"engine": {"kind": "manifest"}},
        "mask_source": "gt",
        "score": {"clip_model_path": str(clip_dir), "device": "cpu"},
        "filter": {"omega": 0.0},
        "clip": {"num_frames": 8, "fps": 8.0},
        "output": {"dir": str(out), "flush_rows": 7},
        "resources": {"score": {"num_cpus": 0.5}},
        **extra,
    }
    return from_dict(PrepConfig, data)


def sources_of(rows: list[dict]) -> set[str]:
    return {str(Path(r["source_uri"]).resolve()) for r in rows}


@pytest.fixture(scope="module")
def full_run(ray_local, corpus: Path, tmp_path_factory: pytest.TempPathFactory,
             tiny_clip_dir: Path) -> tuple[PrepConfig, dict[str, Any]]:
    """``(config, summary)`` of one ``run_prep`` over the whole corpus (read-only)."""
    cfg = prep_config(corpus, tmp_path_factory.mktemp("full") / "out", tiny_clip_dir)
    return cfg, run_prep(cfg, progress=False, track=False)


def test_every_input_accounted_for_and_rerun_is_a_no_op(
        full_run: tuple[PrepConfig, dict[str, Any]], corpus: Path) -> None:
    cfg, first = full_run
    version = open_version(cfg.dataset_root)
    assert version.name == first["dataset_version"] == latest_version(cfg.dataset_root)
    data = version.read("data")
    assert data.schema.remove_metadata() == SHARD_SCHEMA.remove_metadata()  # as documented
    clips, rejects = data.to_pylist(), version.read("rejects").to_pylist()
    assert first["kept"] == len(clips) > 16 and first["rejected"] == len(rejects) == 5

    manifest = pq.read_table(corpus).to_pylist()
    by_uri = {str((corpus.parent / m["path"]).resolve()): m for m in manifest}
    assert sources_of(clips) | sources_of(rejects) == set(by_uri)  # nothing lost
    for r in rejects:
        m = by_uri[str(Path(r["source_uri"]).resolve())]
        assert m["corrupt"], f"valid video rejected: {r['reject_reason']} {r['reject_detail']}"
        assert r["reject_reason"] == EXPECTED_REASON[m["corrupt_kind"]], m["corrupt_kind"]
    for c in clips:
        assert c["caption"] and c["c_motion"] and c["c_local"] and c["masks"]
        assert len(c["frame_indices"]) == 8
        assert all(len(m["rle"]) == 8 for m in c["masks"])
        assert c["score_temporal_min"] is not None and c["colour_table_version"]
        assert {o["name"] for o in c["c_local"]} == {m["name"] for m in c["masks"]}
    assert len({c["clip_id"] for c in clips}) == len(clips)  # no duplicates
    version.verify()
    assert (version.path / "card" / "README.md").is_file()
    assert (version.path / "card" / "omega.png").stat().st_size > 0

    second = run_prep(cfg, progress=False, track=False)
    assert (second["new_clips"], second["new_rejects"]) == (0, 0)
    assert second["already_done"] == len(clips) + len(rejects)
    assert not second["published"] and list_versions(cfg.dataset_root) == [version.name]


def test_incremental_rebuild_adds_only_new_videos(ray_local, corpus: Path, first12: Path,
                                                  tmp_path: Path, tiny_clip_dir: Path) -> None:
    before = run_prep(prep_config(first12, tmp_path / "inc", tiny_clip_dir),
                      progress=False, track=False)
    after = run_prep(prep_config(corpus, tmp_path / "inc", tiny_clip_dir),
                     progress=False, track=False)
    assert after["already_done"] == before["new_clips"] + before["new_rejects"]
    rows = open_version(tmp_path / "inc" / "dataset").read("data").to_pylist()
    assert len(sources_of(rows)) == 16  # exactly the 16 valid sources
    assert len({r["clip_id"] for r in rows}) == len(rows) == after["kept"]
    assert after["new_clips"] == after["kept"] - before["kept"] > 0
    assert len(list_versions(tmp_path / "inc" / "dataset")) == 2


def test_crash_mid_run_never_publishes_a_partial_version(
        ray_local, corpus: Path, tmp_path: Path, tiny_clip_dir: Path,
        full_run: tuple[PrepConfig, dict[str, Any]]) -> None:
    cfg = prep_config(corpus, tmp_path / "crash", tiny_clip_dir)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_prep(cfg, progress=False, track=False, fail_after_rows=10)
    assert latest_version(cfg.dataset_root) is None  # nothing published, nothing partial
    resumed = run_prep(cfg, progress=False, track=False)
    assert resumed["already_done"] >= 10
    clean_cfg, clean = full_run  # the same corpus in one uninterrupted run
    got = sorted(open_version(cfg.dataset_root).read("data").column("clip_id").to_pylist())
    want = sorted(open_version(clean_cfg.dataset_root).read("data")
                  .column("clip_id").to_pylist())
    assert got == want and resumed["kept"] == clean["kept"]


def test_refilter_changes_kept_set_without_models(
        corpus: Path, tmp_path: Path, tiny_clip_dir: Path,
        full_run: tuple[PrepConfig, dict[str, Any]], monkeypatch) -> None:
    shutil.copytree(full_run[0].output_dir, tmp_path / "refilter")  # a copy to refilter
    cfg = prep_config(corpus, tmp_path / "refilter", tiny_clip_dir)
    assert latest_version(cfg.dataset_root) == full_run[1]["dataset_version"]
    scores = sorted(open_version(cfg.dataset_root).read("data")
                    .column("score_temporal_min").to_pylist())
    omega = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2

    import data_prep.stages.score as score_mod

    def no_model(*_a, **_k):
        raise AssertionError("refilter must not load a model")

    monkeypatch.setattr(score_mod, "load_clip", no_model)
    strict = prep_config(corpus, tmp_path / "refilter", tiny_clip_dir, filter={"omega": omega})
    summary = run_refilter(strict, track=False)
    newer = open_version(cfg.dataset_root)
    assert newer.name == summary["dataset_version"] != summary["refiltered_from"]
    kept = newer.read("data").column("score_temporal_min").to_pylist()
    assert kept and all(s >= omega for s in kept) and len(kept) < len(scores)
    filtered = [r for r in newer.read("rejects").to_pylist() if r["reject_reason"] == "filtered"]
    assert len(filtered) == len(scores) - len(kept)
    # and back: the loose threshold brings every filtered clip back
    back = run_refilter(prep_config(corpus, tmp_path / "refilter", tiny_clip_dir), track=False)
    assert back["kept"] == len(scores)


def test_sequential_baseline_matches_ray(full_run: tuple[PrepConfig, dict[str, Any]]) -> None:
    cfg, _ = full_run
    rows = run_sequential(cfg, list_inputs(cfg.source))  # writes nothing
    ok = sorted(r["clip_id"] for r in rows if r["status"] == "ok")
    written = sorted(open_version(cfg.dataset_root).read("data").column("clip_id").to_pylist())
    assert ok == written


def test_model_engines_in_actor_pools(ray_local, corpus: Path, tmp_path: Path,
                                      tiny_clip_dir: Path, tiny_vlm_dir: Path,
                                      tiny_llama_dir: Path) -> None:
    """Tiny random models answer garbage: captions exist, prompts get quarantined, run goes on."""
    cfg = prep_config(
        corpus, tmp_path / "models", tiny_clip_dir,
        caption={"engine": {"kind": "transformers", "model_path": str(tiny_vlm_dir),
                            "max_new_tokens": 8}},
        prompts={"engine": {"kind": "transformers", "model_path": str(tiny_llama_dir),
                            "max_new_tokens": 8}, "max_attempts": 2},
        source={"kind": "manifest", "path": str(corpus), "limit": 5},
        # Three actor pools on a 2-CPU Ray: fractional CPUs leave room for the CPU tasks.
        resources={"caption": {"num_cpus": 0.25}, "prompts": {"num_cpus": 0.25},
                   "score": {"num_cpus": 0.25}},
    )
    summary = run_prep(cfg, progress=False, track=False)
    version = open_version(cfg.dataset_root)
    rejects = version.read("rejects").to_pylist()
    assert summary["kept"] + summary["rejected"] == version.read("data").num_rows + len(rejects)
    assert summary["new_clips"] + summary["new_rejects"] > 0
    for r in rejects:
        assert r["reject_reason"] in {"unparseable_llm_output", "no_objects", "caption_failed",
                                      "prompts_failed", "unreadable_video", "too_short"}
        if r["reject_reason"] == "unparseable_llm_output":
            assert r["llm_raw_local"] is not None or r["llm_raw_motion"] is not None
            assert r["caption_engine"] == "transformers"
    assert summary["stages"]["caption"]["rows_in"] > 0


def test_preflight_stops_before_work(tmp_path: Path, corpus: Path) -> None:
    from ttm_ray.config import ConfigError

    cfg = from_dict(PrepConfig, {"source": {"kind": "manifest", "path": str(corpus)},
                                 "output": {"dir": str(tmp_path / "x")},
                                 "mask_source": "sam2"})
    with pytest.raises(ConfigError, match=r"ground\.model_path"):
        run_prep(cfg, progress=False, track=False)
    assert not (tmp_path / "x").exists()  # nothing started, nothing written


def test_grounding_and_sam2_in_actor_pools(ray_local, corpus: Path, tmp_path: Path,
                                           tiny_clip_dir: Path,
                                           tiny_grounding_dino_dir: Path) -> None:
    """The sam2 mask source end to end: Grounding DINO and SAM2 load in their actor pools
    from config (random weights: arbitrary boxes and masks) and every clip lands somewhere."""
    cfg = prep_config(
        corpus, tmp_path / "sam2", tiny_clip_dir,
        source={"kind": "manifest", "path": str(corpus), "limit": 2},
        mask_source="sam2",
        ground={"model_path": str(tiny_grounding_dino_dir), "box_threshold": 0.0,
                "text_threshold": 0.0, "device": "cpu"},
        segment={"allow_random_weights": True, "image_size": 256, "device": "cpu"},
        clip={"num_frames": 4, "fps": 4.0, "max_clips_per_video": 1},
        resources={"ground": {"num_cpus": 0.25}, "segment": {"num_cpus": 0.25},
                   "score": {"num_cpus": 0.25}},
    )
    summary = run_prep(cfg, progress=False, track=False)
    assert summary["stages"]["ground"]["rows_in"] == summary["stages"]["segment"]["rows_in"] == 2
    version = open_version(cfg.dataset_root)
    kept = version.read("data").to_pylist()
    rejects = version.read("rejects").to_pylist()
    assert len(kept) + len(rejects) == 2
    for r in rejects:  # random SAM2 weights usually score objects absent -> empty masks
        assert r["reject_reason"] in {"segmentation_failed", "no_object_grounded"}, r
        assert r["boxes"] or r["reject_reason"] == "no_object_grounded"
    for c in kept:
        assert c["mask_source"] == "sam2" and c["masks"]
        assert all(len(m["rle"]) == 4 for m in c["masks"])


def test_embedded_clip_bytes_decode_at_the_target_size(ray_local, corpus: Path, tmp_path: Path,
                                                        tiny_clip_dir: Path) -> None:
    cfg = prep_config(corpus, tmp_path / "embed", tiny_clip_dir,
                      source={"kind": "manifest", "path": str(corpus), "limit": 2},
                      clip={"num_frames": 8, "fps": 8.0,
                            "resolutions": [{"name": "unet", "height": 48, "width": 64}]},
                      publish={"embed_clip_bytes": True})
    run_prep(cfg, progress=False, track=False)
    rows = open_version(cfg.dataset_root).read("data").to_pylist()
    assert rows
    for r in rows:
        path = tmp_path / f"{r['clip_id']}.mp4"
        path.write_bytes(r["clip_bytes"])
        import decord

        frames = decord.VideoReader(str(path)).get_batch(list(range(8))).asnumpy()
        assert frames.shape == (8, 48, 64, 3)


REPO = Path(__file__).resolve().parents[2]


def kept_masks(root: Path) -> dict[str, str]:
    """clip id -> sha256 of its masks, over the latest version's data."""
    table = open_version(root).read("data", columns=["clip_id", "masks"])
    return {r["clip_id"]: hashlib.sha256(json.dumps(r["masks"], sort_keys=True).encode())
            .hexdigest() for r in table.to_pylist()}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the job's process group (the driver and the local Ray it started)."""
    import psutil

    try:
        members = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        members = [proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in members:  # anything that left the group (Ray daemons): by pid, never by name
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(
        ray_local, corpus: Path, tmp_path: Path, tiny_clip_dir: Path,
        full_run: tuple[PrepConfig, dict[str, Any]]) -> None:
    """``ttm-ray prep`` killed with SIGKILL (no finally, no atexit) once rows reached the work
    store; the rerun recomputes exactly what was lost: same kept clips, same masks."""
    from ttm_ray.config import dump_yaml

    cfg = prep_config(corpus, tmp_path / "killed", tiny_clip_dir,
                      # flush_seconds far away: rows past the last part are in the buffer,
                      # lost by the kill, and must be recomputed by the rerun
                      output={"dir": str(tmp_path / "killed"), "flush_rows": 3,
                              "flush_seconds": 3600.0},
                      resources={"score": {"num_cpus": 0.5, "batch_size": 1, "max_actors": 1}},
                      run={"num_cpus": 2, "mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    config = tmp_path / "prep.yaml"
    config.write_text(dump_yaml(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env[HOLD_ENV] = "5"  # the driver stops consuming once 5 rows arrived
    proc = subprocess.Popen([sys.executable, "-m", "jobs.build_dataset", "--config", str(config),
                             "--no-progress"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clips = cfg.work_dir / "clips"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if clips.is_dir() and any(clips.glob("part-*.parquet")):
                break
            time.sleep(0.1)
        time.sleep(2)  # the driver reaches its hold
        assert proc.poll() is None, "the job ended before it could be killed midway"
    finally:
        _kill_group(proc)
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in clips.glob("part-*.parquet"))
    # midway: rows on disk, while the rest (buffered, or computed but never consumed by the
    # held driver) died with it
    assert 0 < written < full_run[1]["kept"]
    assert latest_version(cfg.dataset_root) is None
    resumed = run_prep(cfg, progress=False, track=False)
    assert resumed["already_done"] > 0
    assert kept_masks(cfg.dataset_root) == kept_masks(full_run[0].dataset_root)
    work = [c for p in clips.glob("part-*.parquet")
            for c in pq.read_table(p, columns=["clip_id"]).column("clip_id").to_pylist()]
    assert len(work) == len(set(work))  # nothing computed twice


POISON_DRIVER = """
import json, sys
import ray
from data_prep.config import PrepConfig
from data_prep.job import run_prep
from ttm_ray.config import load_config
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={
    "worker_process_setup_hook": "poison_hook.install",
    "env_vars": {"TTM_POISON_INPUT": sys.argv[2], "PYTHONPATH": sys.argv[3],
                 "TOKENIZERS_PARALLELISM": "false"}})
summary = run_prep(load_config(PrepConfig, sys.argv[1]), progress=False, track=False)
print("SUMMARY " + json.dumps(summary, default=str))
"""


def test_an_input_that_crashes_its_worker_ends_as_a_reject(
        corpus: Path, tmp_path: Path, tiny_clip_dir: Path) -> None:
    """A decoder that aborts natively on one named input: Ray's retries are finite, the
    failed block's inputs are re-run alone, the poison input becomes ``worker_crashed``
    and every other input is processed."""
    from ttm_ray.config import dump_yaml

    manifest = pq.read_table(corpus)
    valid = [m for m in manifest.to_pylist() if not m["corrupt"]][:4]
    shutil.copytree(corpus.parent, tmp_path / "corpus")  # videos and their annotations
    small = tmp_path / "corpus" / "manifest4.parquet"
    pq.write_table(pa.Table.from_pylist(valid, schema=manifest.schema), small)
    poison = Path(valid[1]["path"]).name
    cfg = prep_config(small, tmp_path / "out", tiny_clip_dir,
                      faults={"task_retries": 1, "max_errored_blocks": 8,
                              "isolation_timeout_s": 120})
    config = tmp_path / "prep.yaml"
    config.write_text(dump_yaml(cfg))
    hooks = str(Path(__file__).parent)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")},
           "PYTHONPATH": os.pathsep.join([str(REPO), hooks])}
    out = subprocess.run([sys.executable, "-c", POISON_DRIVER, str(config), poison,
                          os.pathsep.join([str(REPO), hooks])],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.split("SUMMARY ", 1)[1])
    assert summary["isolated_inputs"] >= 1
    version = open_version(cfg.dataset_root)
    rejects = version.read("rejects").to_pylist()
    crashed = [r for r in rejects if r["reject_reason"] == "worker_crashed"]
    assert [Path(r["source_uri"]).name for r in crashed] == [poison]
    assert poison in crashed[0]["reject_detail"]
    kept_sources = {Path(r["source_uri"]).name for r in version.read("data").to_pylist()}
    assert kept_sources == {Path(m["path"]).name for m in valid} - {poison}
