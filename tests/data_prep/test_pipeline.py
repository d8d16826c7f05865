"""The whole curation pipeline on a local Ray cluster over the generated corpus."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.config import PrepConfig
from data_prep.pipeline import run_prep, run_sequential
from data_prep.sources import list_inputs
from data_prep.synthetic import generate_corpus
from data_prep.writer import CLIPS_DIR, REJECTS_DIR, read_parts
from ttm_ray.config import from_dict

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
    return generate_corpus(tmp_path_factory.mktemp("corpus"), 12, seed=3, num_corrupt=4)


def prep_config(manifest: Path, out: Path, **extra: dict) -> PrepConfig:
    data = {
        "source": {"kind": "manifest", "path": str(manifest)},
        "caption": {"engine": {"kind": "manifest"}},
        "prompts": {"engine": {"kind": "manifest"}},
        "clip": {"num_frames": 8, "fps": 8.0},
        "output": {"dir": str(out), "rows_per_file": 7},
        **extra,
    }
    return from_dict(PrepConfig, data)


def test_every_input_accounted_for_and_rerun_is_a_no_op(ray_local, corpus: Path,
                                                        tmp_path: Path) -> None:
    cfg = prep_config(corpus, tmp_path / "out")
    first = run_prep(cfg, progress=False)
    clips = read_parts(tmp_path / "out" / CLIPS_DIR).to_pylist()
    rejects = read_parts(tmp_path / "out" / REJECTS_DIR).to_pylist()
    assert first["new_clips"] == len(clips) > 12
    assert first["new_rejects"] == len(rejects)

    manifest = pq.read_table(corpus.with_suffix(".parquet")).to_pylist()
    by_uri = {str((corpus.parent / m["path"]).resolve()): m for m in manifest}
    seen_uris = {Path(r["source_uri"]).resolve().as_posix() for r in clips + rejects}
    assert seen_uris == set(by_uri)  # every input ends as clips or a reject
    for r in rejects:
        m = by_uri[str(Path(r["source_uri"]).resolve())]
        assert m["corrupt"], f"valid video rejected: {r['reject_reason']} {r['reject_detail']}"
        assert r["reject_reason"] == EXPECTED_REASON[m["corrupt_kind"]], m["corrupt_kind"]
    assert len(rejects) == 4
    for c in clips:
        assert c["caption"] and c["c_motion"] and c["c_local"]
        assert len(c["frame_indices"]) == 8
    assert len({c["clip_id"] for c in clips}) == len(clips)  # no duplicates

    second = run_prep(cfg, progress=False)
    assert (second["new_clips"], second["new_rejects"]) == (0, 0)
    assert second["already_done"] == len(clips) + len(rejects)
    assert len(read_parts(tmp_path / "out" / CLIPS_DIR)) == len(clips)


def test_sequential_baseline_matches_ray(ray_local, corpus: Path, tmp_path: Path) -> None:
    cfg = prep_config(corpus, tmp_path / "seq")
    rows = run_sequential(cfg, list_inputs(cfg.source))
    ok = sorted(r["clip_id"] for r in rows if r["status"] == "ok")
    run_prep(cfg, progress=False)
    written = sorted(read_parts(tmp_path / "seq" / CLIPS_DIR).column("clip_id").to_pylist())
    assert ok == written


def test_model_engines_in_actor_pools(ray_local, corpus: Path, tmp_path: Path,
                                      tiny_vlm_dir: Path, tiny_llama_dir: Path) -> None:
    """Tiny random models answer garbage: captions exist, prompts get quarantined, run goes on."""
    cfg = prep_config(
        corpus, tmp_path / "models",
        caption={"engine": {"kind": "transformers", "model_path": str(tiny_vlm_dir),
                            "max_new_tokens": 8}},
        prompts={"engine": {"kind": "transformers", "model_path": str(tiny_llama_dir),
                            "max_new_tokens": 8}, "max_attempts": 2},
        source={"kind": "manifest", "path": str(corpus), "limit": 5},
    )
    summary = run_prep(cfg, progress=False)
    rejects = read_parts(tmp_path / "models" / REJECTS_DIR).to_pylist()
    clips = read_parts(tmp_path / "models" / CLIPS_DIR).to_pylist()
    assert summary["new_clips"] + summary["new_rejects"] == len(clips) + len(rejects) > 0
    for r in rejects:
        assert r["reject_reason"] in {"unparseable_llm_output", "no_objects", "caption_failed",
                                      "unreadable_video", "too_short"}
        if r["reject_reason"] == "unparseable_llm_output":
            assert r["llm_raw_local"] is not None or r["llm_raw_motion"] is not None
            assert r["caption_engine"] == "transformers"
    assert summary["stages"]["caption"]["rows_in"] > 0
