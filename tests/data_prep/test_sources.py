"""data_prep.sources: folders, manifests (Parquet/JSONL/CSV), filesystem URIs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.rows import COLUMNS, REJECT_REASONS, is_rejected, reject_class, to_table
from data_prep.sources import SourceConfig, SourceError, list_inputs, resolve
from data_prep.stages.ingest import IngestStage, uri_video_id
from ttm_ray.config import ConfigError, from_dict

OBJECTS = [{"name": "dog", "prompt": "a dog runs to the left"}]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder of (fake) videos: listing never opens them."""
    for rel in ["a.mp4", "sub/b.MOV", "sub/deeper/c.webm", "notes.txt", ".hidden.mp4",
                "sub/.cache/x.mp4", "sub/d.mkv"]:
        p = tmp_path / "videos" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x00" * 8)
    return tmp_path / "videos"


def entries() -> list[dict]:
    return [
        {"video_id": "ignored", "path": "videos/a.mp4", "caption": "a dog", "motion_prompt":
         "the dog runs left", "object_prompts": OBJECTS, "annotation": "ann/a.json",
         "fps": 24.0, "corrupt": False},
        {"video_id": "x", "path": "/abs/b.mp4", "caption": None, "motion_prompt": None,
         "object_prompts": None, "annotation": None, "fps": 8.0, "corrupt": True},
        {"video_id": "y", "path": "s3://bucket/c.mp4", "caption": "c", "motion_prompt": None,
         "object_prompts": [], "annotation": None, "fps": 8.0, "corrupt": False},
    ]


def write_manifest(folder: Path, fmt: str, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"manifest.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:  # CSV: lists as JSON text, null as an empty cell
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            for r in records:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else ("" if v is None else v)
                            for k, v in r.items()})
    return path


# ----------------------------------------------------------------------------- folders
def test_folder_lists_videos_recursively_sorted(tree):
    rows = list_inputs(SourceConfig(kind="folder", path=str(tree)))
    assert [r["source_uri"] for r in rows] == [
        f"{tree}/a.mp4", f"{tree}/sub/b.MOV", f"{tree}/sub/d.mkv", f"{tree}/sub/deeper/c.webm"]
    assert all(set(r) == set(COLUMNS) and r["status"] == "ok" for r in rows)
    to_table(rows)  # the pipeline's Arrow schema accepts them


def test_folder_extensions_limit_and_relative_paths(tree, monkeypatch):
    rows = list_inputs(SourceConfig(kind="folder", path=str(tree), extensions=[".mp4", ".mkv"]))
    assert [Path(r["source_uri"]).name for r in rows] == ["a.mp4", "d.mkv"]
    rows = list_inputs(SourceConfig(kind="folder", path=str(tree), limit=2))
    assert [Path(r["source_uri"]).name for r in rows] == ["a.mp4", "b.MOV"]
    monkeypatch.chdir(tree.parent)
    rows = list_inputs(SourceConfig(kind="folder", path="videos", limit=1))
    assert rows[0]["source_uri"] == f"{tree}/a.mp4"  # made absolute: workers run elsewhere


@pytest.mark.parametrize("kind", ["folder", "uri"])
def test_missing_or_wrong_folder_is_a_config_error(tmp_path, kind):
    with pytest.raises(ConfigError, match=r"source\.path: folder not found: .*nowhere"):
        list_inputs(SourceConfig(kind=kind, path=str(tmp_path / "nowhere")))
    (tmp_path / "file.mp4").write_bytes(b"")
    with pytest.raises(SourceError, match="not a folder"):
        list_inputs(SourceConfig(kind=kind, path=str(tmp_path / "file.mp4")))


def test_folder_kind_refuses_remote_uris():
    with pytest.raises(SourceError, match=r"source\.kind='uri'"):
        list_inputs(SourceConfig(kind="folder", path="s3://bucket/videos"))


# ----------------------------------------------------------------------------- URIs
def test_file_uri_lists_like_the_folder(tree):
    rows = list_inputs(SourceConfig(kind="uri", path=tree.as_uri() + "/"))
    uris = [r["source_uri"] for r in rows]
    assert uris == [f"{tree.as_uri()}/{rel}" for rel in
                    ["a.mp4", "sub/b.MOV", "sub/d.mkv", "sub/deeper/c.webm"]]
    from ttm_ray.dataset.video import local_path

    assert [local_path(u) for u in uris] == [
        r["source_uri"] for r in list_inputs(SourceConfig(kind="folder", path=str(tree)))]


def test_fsspec_uri_lists():
    import fsspec

    fs = fsspec.filesystem("memory")
    for rel in ["p/a.mp4", "p/q/b.mp4", "p/c.txt"]:
        fs.pipe(f"/ttm-src/{rel}", b"x")
    try:
        rows = list_inputs(SourceConfig(kind="uri", path="memory://ttm-src/p/"))
        assert [r["source_uri"] for r in rows] == ["memory://ttm-src/p/a.mp4",
                                                    "memory://ttm-src/p/q/b.mp4"]
    finally:
        fs.rm("/ttm-src", recursive=True)


# ----------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_manifest_formats_map_columns(tmp_path, fmt):
    path = write_manifest(tmp_path / "corpus", fmt, entries())
    rows = list_inputs(SourceConfig(kind="manifest", path=str(path)))
    assert not any(is_rejected(r) for r in rows)
    a, b, c = rows
    corpus = tmp_path / "corpus"
    assert a["source_uri"] == str(corpus / "videos" / "a.mp4")  # relative to the manifest
    assert a["given_caption"] == "a dog" and a["given_motion_prompt"] == "the dog runs left"
    assert a["given_object_prompts"] == OBJECTS
    assert a["annotation_uri"] == str(corpus / "ann" / "a.json")
    assert a["video_id"] is None  # manifest ids are not trusted: ingest computes them
    assert b["source_uri"] == "/abs/b.mp4" and b["given_caption"] is None
    assert b["given_object_prompts"] is None and b["annotation_uri"] is None
    assert c["source_uri"] == "s3://bucket/c.mp4" and c["given_object_prompts"] == []
    to_table(rows)


def test_manifest_uri_column_and_file_uri_manifest(tmp_path):
    records = [{"uri": "clips/a.mp4", "caption": "x"}, {"uri": "gs://b/c.mp4"}]
    path = write_manifest(tmp_path / "m", "jsonl", records)
    rows = list_inputs(SourceConfig(kind="manifest", path=path.as_uri()))
    assert [r["source_uri"] for r in rows] == [(tmp_path / "m" / "clips" / "a.mp4").as_uri(),
                                                "gs://b/c.mp4"]


def test_bad_manifest_entries_become_rejects(tmp_path):
    path = tmp_path / "manifest.jsonl"
    lines = [json.dumps({"path": "a.mp4"}), "{not json", json.dumps({"path": None}),
             json.dumps({"path": "b.mp4", "object_prompts": [{"name": "dog"}]}),
             json.dumps({"path": "c.mp4", "caption": 3}), json.dumps(["a list"]),
             "", json.dumps({"path": "d.mp4"})]
    path.write_text("\n".join(lines) + "\n")
    rows = list_inputs(SourceConfig(kind="manifest", path=str(path)))
    assert [r["status"] for r in rows] == ["ok"] + ["rejected"] * 5 + ["ok"]
    for r in rows[1:6]:
        assert r["reject_reason"] == "bad_manifest_entry" and r["reject_reason"] in REJECT_REASONS
        assert r["reject_stage"] == "source" and r["reject_detail"]
        assert r["video_id"] == uri_video_id(r["source_uri"])  # rejects have ids too
    assert "not a JSON line" in rows[1]["reject_detail"]
    assert "no path/uri" in rows[2]["reject_detail"]
    assert "name and prompt" in rows[3]["reject_detail"]
    to_table(rows)


def test_manifest_duplicates_and_limit(tmp_path):
    records = [{"path": "a.mp4"}, {"path": "b.mp4"}, {"path": "./a.mp4"}, {"path": "c.mp4"}]
    path = write_manifest(tmp_path, "parquet", records)
    rows = list_inputs(SourceConfig(kind="manifest", path=str(path)))
    assert [Path(r["source_uri"]).name for r in rows] == ["a.mp4", "b.mp4", "a.mp4", "c.mp4"]
    assert [r["reject_reason"] for r in rows] == [None, None, "duplicate_input", None]
    rows = list_inputs(SourceConfig(kind="manifest", path=str(path), limit=2))
    assert len(rows) == 2


def test_duplicate_entries_are_rejects_with_their_own_keys(tmp_path):
    records = [{"path": "a.mp4", "caption": "first"}, {"path": "b.mp4"},
               {"path": "./a.mp4", "caption": "second"}, {"path": "a.mp4", "caption": "first"},
               {"path": "b.mp4"}]
    path = write_manifest(tmp_path, "jsonl", records)
    rows = list_inputs(SourceConfig(kind="manifest", path=str(path)))
    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
    assert [(r["source_uri"], r["status"]) for r in rows] == [
        (a, "ok"), (b, "ok"), (a, "rejected"), (a, "rejected"), (b, "rejected")]
    dups = rows[2:]
    for r in dups:
        assert r["reject_reason"] == "duplicate_input" and r["reject_stage"] == "source"
        assert reject_class(r["reject_reason"]) == "permanent"
    assert [r["video_id"] for r in dups] == [f"{uri_video_id(a)}#dup1", f"{uri_video_id(a)}#dup2",
                                             f"{uri_video_id(b)}#dup1"]
    assert dups[0]["reject_detail"] == (f"entry 2 names {a} again: entry 0 is used (this "
                                        "entry's given_caption differ and are ignored)")
    assert dups[1]["reject_detail"] == f"entry 3 names {a} again: entry 0 is used"
    assert "entry 4 names" in dups[2]["reject_detail"] and "entry 1 is used" in (
        dups[2]["reject_detail"])
    # Work-store keys of whole-video rejects: none equals another's or an original's, whatever
    # id ingest gives the originals (content ids are "v" + hex; a "#" never occurs in them).
    ingested = IngestStage()(rows)
    assert ingested[2:] == dups  # rejects pass ingest untouched
    # The work store's row_key: the clip, else f"video:{video_id}:{source_uri}".
    keys = [r["clip_id"] or f"video:{r['video_id']}:{r['source_uri']}" for r in ingested]
    assert len(set(keys)) == len(keys)
    to_table(rows)


def test_manifest_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"source\.path: manifest not found: .*none\.parquet"):
        list_inputs(SourceConfig(kind="manifest", path=str(tmp_path / "none.parquet")))
    with pytest.raises(SourceError, match="unknown manifest format"):
        list_inputs(SourceConfig(kind="manifest", path=str(tmp_path / "m.xlsx")))
    no_path = write_manifest(tmp_path / "np", "csv", [{"file": "a.mp4", "caption": "x"}])
    with pytest.raises(SourceError, match="no 'path' or 'uri' column"):
        list_inputs(SourceConfig(kind="manifest", path=str(no_path)))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="cannot read manifest"):
        list_inputs(SourceConfig(kind="manifest", path=str(broken)))


def test_resolve():
    assert resolve("a/b.mp4", "/data/m") == "/data/m/a/b.mp4"
    assert resolve("../x.mp4", "/data/m") == "/data/x.mp4"
    assert resolve("/abs.mp4", "/data/m") == "/abs.mp4"
    assert resolve("s3://b/k.mp4", "/data/m") == "s3://b/k.mp4"
    assert resolve("v/a.mp4", "s3://bucket/corpus") == "s3://bucket/corpus/v/a.mp4"


def test_source_config_from_dict():
    cfg = from_dict(SourceConfig, {"kind": "folder", "path": "/x", "limit": 3})
    assert cfg.extensions[0] == ".mp4" and cfg.limit == 3
    with pytest.raises(ConfigError, match="kind"):
        from_dict(SourceConfig, {"kind": "ftp"})
    with pytest.raises(ConfigError, match="extensions must look like"):
        from_dict(SourceConfig, {"extensions": ["mp4"]})
    with pytest.raises(ConfigError, match="limit"):
        from_dict(SourceConfig, {"limit": 0})
