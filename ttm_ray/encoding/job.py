"""``ttm-ray encode``: one published dataset version -> its encoded version, on Ray Data.

    summary = run_encode(load_config(EncodeConfig, "jobs/configs/encode/unet_stage2.yaml"))

Flow: preflight (weights folders, the source version readable, the clip geometry encodes to
the model's latent grid) -> the encoding hash of the ``encoders:`` section + geometry picks
the output root (``<source root>-encoded/<hash>`` unless ``output.dataset_root``) -> rows the
previous encoded version there already holds (same hash) are reused, by reference when a
whole part file is still wanted -> the rest are read from the source's Parquet files by Ray
Data and encoded by an actor pool of :class:`~ttm_ray.encoding.worker.ClipEncoder` (GPUs per
actor from ``resources``) -> the driver streams their output into a
:class:`~ttm_ray.dataset.versions.VersionWriter` (``rows_per_file`` at a time) -> publish
(manifest with lineage, card, ``_SUCCESS``, ``latest``). A source version that was already
encoded with the same hash publishes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ttm_ray.config import ConfigError, absolute_path, to_dict
from ttm_ray.dataset.encoded import (
    ENCODED_SCHEMA_VERSION,
    NULL_TEXT_FILE,
    REJECT_SCHEMA,
    encoded_schema,
    encoding_hash,
)
from ttm_ray.dataset.versions import (
    DatasetVersion,
    DatasetVersionError,
    VersionWriter,
    open_version,
)
from ttm_ray.encoding.config import EncodeConfig
from ttm_ray.encoding.worker import ClipEncoder, split_output
from ttm_ray.training.clips import COLUMNS
from ttm_ray.training.data import encoded_geometry

log = logging.getLogger(__name__)



def resolve(cfg: EncodeConfig) -> EncodeConfig:
    encoders = cfg.encoders.with_absolute_paths()
    data = replace(cfg.data, dataset_root=absolute_path(cfg.data.dataset_root) or "")
    output = replace(cfg.output, dataset_root=absolute_path(cfg.output.dataset_root))
    return replace(cfg, encoders=encoders, data=data, output=output)


def preflight(cfg: EncodeConfig) -> tuple[DatasetVersion, dict[str, Any]]:
    """Every check before Ray starts: weights folders, the source version, the geometry.
    Returns the source version and the geometry; raises ConfigError listing every problem."""
    from ttm_ray.conditioning.autoencoders import geometry
    from ttm_ray.model_folders import weights_problem

    enc = cfg.encoders
    errors = [weights_problem("encoders.text_encoder.path", enc.text_encoder.path,
                              f"a {enc.text_encoder.kind} text encoder", ("text_encoder",))]
    if enc.autoencoder.kind != "pixel":
        errors.append(weights_problem("encoders.autoencoder.path", enc.autoencoder.path,
                                      "an autoencoder", ("vae",)))
    errors = [e for e in errors if e]
    source = geo = None
    try:
        source = open_version(cfg.data.dataset_root, cfg.data.version)
    except (DatasetVersionError, OSError) as exc:
        errors.append(f"data.dataset_root / data.version: {exc}")
    try:
        ae = geometry(enc.autoencoder)
        m = cfg.model
        frames, height, width = ae.pixel_shape(m.num_frames, m.height, m.width)
        pixel = (cfg.data.frames or frames, cfg.data.height or height, cfg.data.width or width)
        geo = encoded_geometry(cfg.model, cfg.data, pixel)
    except (ValueError, OSError) as exc:
        errors.append(f"encoders.autoencoder: {exc}")
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))
    assert source is not None and geo is not None
    return source, geo


def previous_version(root: str, key: str) -> DatasetVersion | None:
    """The latest encoded version under ``root`` if it has the same encoding hash."""
    try:
        prev = open_version(root, "latest")
    except (DatasetVersionError, OSError):
        return None
    lineage = prev.manifest.get("lineage", {})
    if lineage.get("encoding_hash") != key:
        log.warning("%s holds encoded version %s with encoding hash %s, not %s: nothing reused",
                    root, prev.name, lineage.get("encoding_hash"), key)
        return None
    return prev


def reuse_rows(writer: VersionWriter, prev: DatasetVersion, wanted: set[str]) -> set[str]:
    """Carry the previous version's rows of clips still in the source: whole part files by
    reference, partly wanted ones rewritten. Returns the clip ids carried."""
    import pyarrow.parquet as pq

    carried: set[str] = set()
    for entry in prev.manifest["files"]:
        if entry["table"] != "data" or entry["rows"] == 0:
            continue
        location = prev.location(entry)
        with prev.open_input_file(location) as src:
            ids = pq.read_table(src, columns=["clip_id"]).column("clip_id")
        keep = pc.is_in(ids, value_set=pa.array(sorted(wanted), pa.string()))
        kept = {c for c, k in zip(ids.to_pylist(), keep.to_pylist(), strict=True) if k}
        if not kept:
            continue
        if len(kept) == len(ids):
            writer.reuse(entry, prev.name)
        else:
            with prev.open_input_file(location) as src:
                table = pq.read_table(src)
            writer.write_table("data", table.filter(keep))
        carried |= kept
    return carried


def _safetensors_bytes(tensors: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def encode_remaining(cfg: EncodeConfig, source: DatasetVersion, todo: set[str],
                     writer: VersionWriter, progress: bool) -> tuple[int, list[pa.Table]]:
    """Encode the source rows of ``todo`` on the actor pool; stream encoded rows into
    ``writer``. Returns the rows written and the reject tables."""
    import ray

    res = cfg.resources
    files = [str(f) for f in source.files("data")]
    wanted = pa.array(sorted(todo), pa.string())

    def keep_todo(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column("clip_id"), value_set=wanted))

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ds = ray.data.read_parquet(files, columns=list(COLUMNS))
    ds = ds.map_batches(keep_todo, batch_format="pyarrow")
    ds = ds.map_batches(
        ClipEncoder, batch_format="pyarrow", batch_size=res.batch_size,
        fn_constructor_kwargs={"model": cfg.model, "data": cfg.data,
                               "encoders": cfg.encoders, "device": res.resolved_device()},
        compute=ray.data.ActorPoolStrategy(size=res.workers),
        num_gpus=res.num_gpus, num_cpus=res.num_cpus)
    written, rejects, buffer = 0, [], []

    def flush(final: bool = False) -> int:
        nonlocal buffer
        rows = sum(t.num_rows for t in buffer)
        if rows == 0 or (rows < cfg.output.rows_per_file and not final):
            return 0
        table = pa.concat_tables(buffer)
        buffer = []
        writer.write_table("data", table)
        return table.num_rows

    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        good, bad = split_output(batch)
        if bad.num_rows:
            rejects.append(bad)
        if good.num_rows:
            buffer.append(good)
            written += flush()
    written += flush(final=True)
    return written, rejects


def null_text_bytes(cfg: EncodeConfig) -> bytes:
    """The null prompt's embedding, computed where the encoders are allowed to run (a Ray
    task with an actor's resources: the driver may be a small head node)."""
    import ray

    def compute(cfg: EncodeConfig) -> bytes:
        text = cfg.encoders.text_encoder.build(cfg.resources.resolved_device())
        emb, mask = text.null(1)
        return _safetensors_bytes({"emb": emb[0].cpu().contiguous(),
                                   "mask": mask[0].cpu().contiguous()})

    res = cfg.resources
    task = ray.remote(compute).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus)
    return ray.get(task.remote(cfg))


def card(cfg: EncodeConfig, source: DatasetVersion, key: str, counts: dict[str, int]) -> str:
    enc = cfg.encoders
    return "\n".join([
        f"# Encoded version of {source.name}", "",
        f"Source: `{source.uri}`. Encoding hash `{key}` ({ENCODED_SCHEMA_VERSION}).", "",
        f"- autoencoder: {enc.autoencoder.kind} `{enc.autoencoder.path}` "
        f"({enc.autoencoder.dtype})",
        f"- text encoder: {enc.text_encoder.kind} `{enc.text_encoder.path}` "
        f"({enc.text_encoder.dtype}, L={enc.text_encoder.max_length})",
        f"- model grid: {cfg.model.family} {cfg.model.size}, latent "
        f"{cfg.model.latent_channels}x{cfg.model.num_frames}x{cfg.model.height}x"
        f"{cfg.model.width}", "",
        "| rows | count |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in counts.items()), ""])


def log_encode_to_mlflow(cfg: EncodeConfig, source: DatasetVersion, encoded: DatasetVersion,
                         summary: dict[str, Any], only_if_missing: bool = False
                         ) -> str | None:
    """One MLflow run per encoded version: the source version (context ``source``) and the
    encoded one (context ``output``) as dataset inputs, ``ttm.*`` tags, the counts.
    ``only_if_missing``: skip when the store already has an encode run for the version (an
    up-to-date rerun; stores that predate this logging get theirs)."""
    import mlflow

    from ttm_ray import lineage as lin
    from ttm_ray.config import config_hash
    from ttm_ray.tracking import code_version, start_mlflow_run

    uri = cfg.run.resolved_mlflow_uri()
    client = lin.client_for(uri)
    root = str(encoded.root)
    if only_if_missing and any(
            lin.tag(r.data.tags, lin.JOB) == "encode" and lin.tag(r.data.tags, lin.DATASET_ROOT)
            == root for r in client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                f"tags.`{lin.DATASET_VERSION}` = '{encoded.name}'")):
        return None
    tags = lin.job_tags("encode", dataset_version=encoded.name, dataset_root=root,
                        source_version=source.name, source_root=source.root,
                        encoding_hash=summary["encoding_hash"], config_hash=config_hash(cfg),
                        code_version=code_version())
    with start_mlflow_run(uri, cfg.run.mlflow_experiment, f"encode-{encoded.name}",
                          tags) as run:
        lin.log_datasets(client, run.info.run_id, [
            (lin.version_dataset(source), lin.CONTEXT_SOURCE),
            (lin.version_dataset(encoded), lin.CONTEXT_OUTPUT)])
        mlflow.log_metrics({k: float(summary[k]) for k in ("encoded", "reused", "rejected")
                            if isinstance(summary.get(k), (int, float))})
        return run.info.run_id


def run_encode(cfg: EncodeConfig, progress: bool = True, track: bool = True
               ) -> dict[str, Any]:
    """Preflight, encode what is new, publish, log to MLflow (``track``); returns the job
    summary."""
    summary = _encode(cfg, progress)
    if track:
        cfg = resolve(cfg)
        source = open_version(cfg.data.dataset_root, summary["source_version"])
        encoded = open_version(summary["dataset_root"], summary["encoded_version"])
        summary["mlflow_run_id"] = log_encode_to_mlflow(cfg, source, encoded, summary,
                                                        only_if_missing=summary["up_to_date"])
    return summary


def _encode(cfg: EncodeConfig, progress: bool) -> dict[str, Any]:
    from ttm_ray.runtime import init_ray
    from ttm_ray.tracking import code_version

    start = time.perf_counter()
    cfg = resolve(cfg)
    source, geo = preflight(cfg)
    encoders = to_dict(cfg.encoders)
    key = encoding_hash(encoders, geo)
    root = cfg.output.dataset_root or f"{cfg.data.dataset_root.rstrip('/')}-encoded/{key}"
    prev = previous_version(root, key)
    summary: dict[str, Any] = {"source_version": source.name, "encoding_hash": key,
                               "dataset_root": root}
    if prev is not None and prev.manifest["lineage"]["source"]["version"] == source.name \
            and prev.manifest["lineage"]["source"]["dataset_root"] == str(source.root):
        log.info("%s already encodes %s with hash %s: nothing to do", prev.name, source.name,
                 key)
        return {**summary, "encoded_version": prev.name, "version_path": str(prev.path),
                "encoded": 0, "reused": prev.manifest["rows"].get("data", 0),
                "rejected": prev.manifest["rows"].get("rejects", 0), "up_to_date": True,
                "seconds": round(time.perf_counter() - start, 1)}
    source_ids = set(source.read("data", ["clip_id"]).column("clip_id").to_pylist())
    writer = VersionWriter(root, rows_per_file=cfg.output.rows_per_file)
    try:
        carried = reuse_rows(writer, prev, source_ids) if prev is not None else set()
        todo = source_ids - carried
        init_ray(cfg.run)
        written, rejects = (encode_remaining(cfg, source, todo, writer, progress)
                            if todo else (0, []))
        if written + len(carried) == 0:
            writer.write_table("data", encoded_schema().empty_table())
        reject_table = pa.concat_tables(rejects) if rejects else REJECT_SCHEMA.empty_table()
        writer.write_table("rejects", reject_table)
        if prev is not None and not todo:
            writer.add_file(NULL_TEXT_FILE, prev.read_bytes(NULL_TEXT_FILE))
        else:
            writer.add_file(NULL_TEXT_FILE, null_text_bytes(cfg))
        counts = {"encoded": written, "reused": len(carried), "rejected": reject_table.num_rows}
        writer.add_file("card/README.md", card(cfg, source, key, counts).encode())
        lineage = {
            "kind": "encoded", "schema": ENCODED_SCHEMA_VERSION,
            "source": {"dataset_root": str(source.root), "version": source.name},
            "encoders": encoders, "geometry": geo, "encoding_hash": key,
            "model": {"family": cfg.model.family, "size": cfg.model.size},
            "reused_from": prev.name if prev is not None else None,
            "counts": counts, "code_version": code_version(),
        }
        version = writer.publish(lineage)
    except BaseException:
        writer.abort()
        raise
    return {**summary, "encoded_version": version.name, "version_path": str(version.path),
            **counts, "up_to_date": False, "seconds": round(time.perf_counter() - start, 1)}


__all__ = ["log_encode_to_mlflow", "preflight", "resolve", "run_encode"]
