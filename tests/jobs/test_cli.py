"""The `ttm-ray` CLI and the job contract (exit codes, JSON summary as the last line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from jobs.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_help_lists_every_command_and_each_has_help() -> None:
    top = cli("--help")
    assert top.returncode == 0
    for name in COMMANDS:
        assert name in top.stdout
        sub = cli(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: ttm-ray" in sub.stdout
    assert cli("nope").returncode == 2


def test_config_validate_and_show() -> None:
    ok = cli("config", "validate", "jobs/configs/prep/production.yaml")
    assert ok.returncode == 0 and "ok (PrepConfig)" in ok.stdout
    bad = cli("config", "validate", "jobs/configs/prep/quickstart.yaml", "--set", "clip.fps=fast",
              "--set", "clip.nmu_frames=3")
    assert bad.returncode == 2
    assert 'clip.fps: expected a positive float or null, got "fast"' in bad.stderr
    assert "clip.nmu_frames: unknown key (did you mean 'num_frames'?)" in bad.stderr
    assert "jobs/configs/prep/quickstart.yaml" in bad.stderr
    shown = cli("config", "show", "--kind", "prep")
    assert shown.returncode == 0 and "omega: 0.955" in shown.stdout


def test_job_exits_2_with_json_on_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kind: prep\nclip: {num_frames: -1}\n")
    out = subprocess.run([sys.executable, "-m", "jobs.build_dataset", "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    summary = last_json(out.stdout)
    assert summary["status"] == "config_error"
    assert "clip.num_frames: expected a positive integer, got -1" in summary["error"]


@pytest.mark.slow
def test_synth_done_when(tmp_path: Path) -> None:
    """Issue 2's check: 20 decodable mp4s, 5 broken files, SA-V masks that decode exactly."""
    out = cli("synth", "--videos", "20", "--corrupt", "5", "--out", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    summary = last_json(out.stdout)
    assert summary["status"] == "succeeded"
    manifest = pq.read_table(summary["manifest"]).to_pylist()
    assert len(manifest) == 25
    root = Path(summary["manifest"]).parent
    valid = [m for m in manifest if not m["corrupt"]]
    broken = [m for m in manifest if m["corrupt"]]
    assert len(valid) == 20 and len(broken) == 5
    for m in valid:
        vr = decord.VideoReader(str(root / m["path"]))
        assert len(vr) == m["num_frames"]
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()  # every frame decodes
        assert frames.shape == (m["num_frames"], m["height"], m["width"], 3)
        ann = json.loads((root / m["annotation"]).read_text())
        assert len(ann["masklet"]) == m["num_frames"]  # stride 1: every frame annotated
        first = np.stack([mask_utils.decode(r) for r in ann["masklet"][0]])
        assert first.shape == (m["num_objects"], m["height"], m["width"])
    kinds = {m["corrupt_kind"] for m in broken}
    assert kinds == {"truncated", "zero_bytes", "text_file", "bad_container", "single_frame"}
    for m in broken:
        if m["corrupt_kind"] == "single_frame":
            assert len(decord.VideoReader(str(root / m["path"]))) == 1
        else:
            with pytest.raises(Exception):  # noqa: B017 - decord raises its own error types
                decord.VideoReader(str(root / m["path"]))
