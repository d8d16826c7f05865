"""Data prep on real object storage: the corpus and its manifest in ``s3://``, the dataset
published to ``s3://``, and training's row reader on the published version; all against the
loopback S3 server (moto's server mode, :mod:`tests.s3`), nothing mocked.

The job runs in a child process with its own local Ray, started after the S3 fixture set the
environment, so Ray's workers (decoding videos, writing shard groups) reach the same server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from data_prep.config import PrepConfig
from data_prep.synthetic import generate_corpus
from ttm_ray.config import ConfigError, dump_yaml, from_dict
from ttm_ray.dataset.versions import open_version
from ttm_ray.dataset.video import filesystem
from ttm_ray.training.clips import RowReader

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import json, sys
from data_prep.config import PrepConfig
from data_prep.job import run_prep
from ttm_ray.config import load_config
summary = run_prep(load_config(PrepConfig, sys.argv[1]), progress=False, track=False)
print("SUMMARY " + json.dumps(summary, default=str))
"""


def upload(local: Path, uri: str) -> None:
    fs, base = filesystem(uri)
    pafs.copy_files(str(local), base, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def test_prep_from_s3_publishes_to_s3_and_training_reads_it(
        s3_bucket: str, tmp_path: Path, tiny_clip_dir: Path) -> None:
    corpus = generate_corpus(tmp_path / "corpus", 3, seed=5, num_corrupt=1)
    upload(corpus.parent, f"{s3_bucket}/corpus")
    cfg = from_dict(PrepConfig, {
        "source": {"kind": "manifest", "path": f"{s3_bucket}/corpus/{corpus.name}"},
        "caption": {"engine": {"kind": "manifest"}},
        "prompts": {"engine": {"kind": "manifest"}},
        "mask_source": "gt",
        "score": {"clip_model_path": str(tiny_clip_dir), "device": "cpu"},
        "filter": {"omega": 0.0},
        "clip": {"num_frames": 8, "fps": 8.0},
        "output": {"dir": str(tmp_path / "out")},
        "publish": {"dataset_root": f"{s3_bucket}/dataset", "rows_per_file": 4},
        "run": {"num_cpus": 2},
        "resources": {"score": {"num_cpus": 0.5}},
    })
    config = tmp_path / "prep.yaml"
    config.write_text(dump_yaml(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", DRIVER, str(config)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout.split("SUMMARY ", 1)[1])
    assert summary["version_path"].startswith(f"{s3_bucket}/dataset/versions/")

    version = open_version(f"{s3_bucket}/dataset")
    assert version.name == summary["dataset_version"]
    version.verify()
    data = version.read("data")
    assert data.num_rows == summary["kept"] > 0
    assert all(uri.startswith(f"{s3_bucket}/corpus/") for uri in
               data.column("source_uri").to_pylist())  # clips point at the S3 videos
    rejects = version.read("rejects").to_pylist()
    assert [r["reject_reason"] for r in rejects] == ["unreadable_video"]
    assert b"kept clips" in version.read_bytes("card/README.md")

    reader = RowReader(version)  # training's reader, through pyarrow.fs
    assert reader.num_rows == data.num_rows
    assert [reader.row(i)["clip_id"] for i in range(reader.num_rows)] == \
        data.column("clip_id").to_pylist()
    assert not (tmp_path / "out" / "dataset").exists()  # nothing fell back to a local folder
    assert pq.ParquetFile(next((tmp_path / "out" / "work" / "clips").glob("*.parquet")))


def test_s3_work_store_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"output\.dir.*s3://b/run.*POSIX"):
        from_dict(PrepConfig, {"output": {"dir": "s3://b/run"}})
