"""Training preflight: every check that needs the filesystem, on the driver, before Ray.

``ttm-ray train --preflight`` runs exactly these checks and stops; ``ttm-ray train`` runs them
first. Every problem is collected and reported in one :class:`ConfigError` (one attempt shows
them all), each line naming the config key and the fix:

* weights: every model/encoder folder holds ``config.json`` and weights, ``init_from`` exists
  and its tensors fit the model (safetensors header only: nothing is loaded);
* the dataset version exists, and its clips have the frame count and resolution the model's
  latent grid needs through the configured autoencoder (read from the version's lineage, or
  its rows for versions published before the lineage carried the clip settings);
* with ``data.encoded``: the encoded version exists and was written with this run's
  ``encoders:`` section and clip geometry (each differing key named);
* a resume is consistent with the checkpointed run.

Whether the cluster can hold the workers is checked when the job connects to it
(:func:`ttm_ray.ops.capacity.ensure_capacity`); that needs Ray, this module does not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ttm_ray.conditioning.autoencoders import AutoencoderGeometry, geometry
from ttm_ray.config import ConfigError
from ttm_ray.dataset.versions import (
    DatasetVersion,
    DatasetVersionError,
    list_versions,
    open_version,
)
from ttm_ray.model_folders import weights_problem
from ttm_ray.training.checkpoint import latest_meta
from ttm_ray.training.config import TrainConfig

log = logging.getLogger(__name__)

#: The data-prep config that builds each family's paper dataset (named in the fix).
PREP_CONFIGS = {"dit": "jobs/configs/prep/dit.yaml", "unet": "jobs/configs/prep/production.yaml"}


@dataclass(frozen=True)
class Preflight:
    """What the driver resolved before starting workers."""

    dataset_version: str  # concrete name (never "latest": a resume must read the same rows)
    run_storage: str  # <storage>/<run.name>: Ray Train's folder for this run
    resume_step: int | None  # step of the checkpoint a resubmission continues from
    pixel_shape: tuple[int, int, int]  # (frames, height, width) of a training clip


def missing_paths(cfg: TrainConfig) -> list[str]:
    """Weights folders and files that are not there, one line per config key.

    Relative paths are checked against the working dir (a worker could never find them);
    absolute ones against this machine, which on the shipped clusters mounts the same model
    store as every node (cluster/README.md). URIs are left to the loader.
    """
    enc, model = cfg.encoders, cfg.model
    problems = []
    # An encoded run never builds the text encoder, and the autoencoder only for previews.
    if not cfg.data.encoded:
        problems.append(weights_problem("encoders.text_encoder.path", enc.text_encoder.path,
                                        f"a {enc.text_encoder.kind} text encoder",
                                        ("text_encoder",)))
    if enc.autoencoder.kind != "pixel" and (not cfg.data.encoded or cfg.logging.sample_every):
        what = ("an AutoencoderKL" if enc.autoencoder.kind == "image_vae"
                else f"an {enc.autoencoder.class_name}")
        problems.append(weights_problem("encoders.autoencoder.path", enc.autoencoder.path,
                                        what, ("vae",)))
    for key, what in (("pretrained_unet", "an SD1.5-style UNet2DConditionModel"),
                      ("motion_adapter", "an AnimateDiff MotionAdapter")):
        if model.overrides.get(key):
            problems.append(weights_problem(f"model.overrides.{key}", model.overrides[key],
                                            what, ("unet",) if key == "pretrained_unet" else ()))
    return [p for p in problems if p]


def needed_clip(cfg: TrainConfig, geo: AutoencoderGeometry) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the pixel clips the model's latent grid needs."""
    m = cfg.model
    frames, height, width = geo.pixel_shape(m.num_frames, m.height, m.width)
    return (cfg.data.frames or frames, cfg.data.height or height, cfg.data.width or width)


def dataset_clip_shape(version: DatasetVersion) -> tuple[int, list[tuple[int, int]] | None]:
    """Frames per clip and the resolutions clips were cut for (None when the version does
    not record them): from the lineage, else the shortest clip of the rows."""
    clip = version.manifest.get("lineage", {}).get("clip")
    if clip and clip.get("mode", "fixed") == "fixed":
        return int(clip["num_frames"]), [(int(r["height"]), int(r["width"]))
                                         for r in clip.get("resolutions") or []]
    import pyarrow.compute as pc

    frames = pc.min(version.read("data", ["num_frames"]).column("num_frames")).as_py()
    sizes = ([(int(r["height"]), int(r["width"])) for r in clip.get("resolutions") or []]
             if clip else None)
    return int(frames or 0), sizes


def dataset_problems(cfg: TrainConfig, version: DatasetVersion,
                     geo: AutoencoderGeometry) -> list[str]:
    """The dataset's clips against what the model needs: too few frames, or no resolution of
    the needed aspect that is at least the needed size (training would upsample)."""
    frames, height, width = needed_clip(cfg, geo)
    have_frames, sizes = dataset_clip_shape(version)
    ae = cfg.encoders.autoencoder
    through = (f"model.num_frames {cfg.model.num_frames} x height {cfg.model.height} x width "
               f"{cfg.model.width} latents through the {ae.kind} autoencoder "
               f"(x{geo.temporal_factor} in time{', causal' if geo.causal else ''}, "
               f"x{geo.spatial_factor} in space; {geo.source})")
    fix = (f"publish a dataset with clip.num_frames {frames} and a {height}x{width} resolution "
           f"({PREP_CONFIGS[cfg.model.family]} builds the paper's) and set data.dataset_root, "
           "or change the model's latent grid")
    problems = []
    if geo.latent_channels is not None and geo.latent_channels != cfg.model.latent_channels:
        problems.append(f"model.latent_channels: {cfg.model.latent_channels}, but the "
                        f"autoencoder gives {geo.latent_channels} ({geo.source}): set "
                        f"model.latent_channels: {geo.latent_channels} or use the matching "
                        "autoencoder")
    if have_frames < frames:
        problems.append(f"data.dataset_root: {version.path} has {have_frames}-frame clips; "
                        f"{through} need {frames} frames: {fix}")
    # Training centre-crops and resizes: a same-aspect size at least as large is exact enough,
    # a smaller one would be upsampled.
    if sizes is not None and not any(h * width == w * height and h >= height
                                     for h, w in sizes):
        cut = ", ".join(f"{h}x{w}" for h, w in sizes) or "no size"
        problems.append(f"data.dataset_root: {version.path} has clips cut for {cut} "
                        f"(clip.resolutions); {through} need {height}x{width}: {fix}")
    return problems


def encoded_problems(cfg: TrainConfig, version: DatasetVersion,
                     geo: AutoencoderGeometry) -> list[str]:
    """An encoded version (``data.encoded``) against the run: written by ``ttm-ray encode``,
    with this run's ``encoders:`` section (every differing key named) and the clip geometry
    this model needs (pixel clip, latent grid; stage 2 also the token grid, mask rule and
    local-token cap)."""
    from ttm_ray.config import to_dict
    from ttm_ray.dataset.encoded import differing_keys
    from ttm_ray.training.data import GEOMETRY_DEFAULTS, encoded_geometry

    lineage = version.manifest.get("lineage", {})
    if lineage.get("kind") != "encoded":
        return [f"data.encoded: {version.path} is not an encoded version (write one with "
                "`ttm-ray encode`)"]
    fix = ("re-encode with this run's sections (`ttm-ray encode`) or point data.encoded at a "
           "matching encoded root")
    problems = [f"{d}: {fix}" for d in differing_keys(to_dict(cfg.encoders),
                                                      lineage.get("encoders", {}), "encoders")]
    want = {**GEOMETRY_DEFAULTS,
            **encoded_geometry(cfg.model, cfg.data, needed_clip(cfg, geo), cfg.model.stage)}
    recorded = lineage.get("geometry", {})
    have = {k: recorded.get(k, GEOMETRY_DEFAULTS.get(k)) for k in want}
    problems += [f"data.encoded geometry {d}: {fix}"
                 for d in differing_keys(want, have, "geometry")]
    return problems


def init_from_problems(cfg: TrainConfig) -> list[str]:
    """``model.init_from`` (a file, or an export folder with model.safetensors) is there and
    its tensors fit the model's parameters (safetensors header only)."""
    if not cfg.model.init_from or "://" in cfg.model.init_from:
        return []
    from ttm_ray.models import check_init_from

    return list(check_init_from(cfg.model))


def preflight(cfg: TrainConfig, errors: list[str] | None = None) -> Preflight:
    """Every filesystem check; raises ConfigError listing every problem (with the ``errors``
    found before paths were resolved), so one attempt shows them all."""
    errors = list(errors or [])
    geo: AutoencoderGeometry | None = None
    try:
        geo = geometry(cfg.encoders.autoencoder)
    except (ValueError, OSError) as exc:
        errors.append(f"encoders.autoencoder: {exc}")
    version: DatasetVersion | None = None
    root, name_key = ((cfg.data.encoded, "data.encoded_version") if cfg.data.encoded
                      else (cfg.data.dataset_root, "data.version"))
    try:
        version = open_version(root, cfg.data.encoded_version if cfg.data.encoded
                               else cfg.data.version)
    except DatasetVersionError as exc:
        errors.append(f"{name_key}: {exc}")
    except OSError as exc:  # an object store that cannot be reached or read
        key = "data.encoded" if cfg.data.encoded else "data.dataset_root"
        errors.append(f"{key}: cannot read {root}: {exc}")
    if version is not None and geo is not None:
        errors += (encoded_problems(cfg, version, geo) if cfg.data.encoded
                   else dataset_problems(cfg, version, geo))
    errors += init_from_problems(cfg)
    run_storage = f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.run.name}"
    meta = latest_meta(run_storage)
    name = version.name if version is not None else None
    if meta is not None and name is not None and meta["dataset_version"] != name:
        if cfg.data.encoded and meta["dataset_version"] not in list_versions(root):
            errors.append(f"data.encoded: run {cfg.run.name!r} was checkpointed on "
                          f"{meta['dataset_version']}, which is not a version of {root} (it "
                          "trained on the fly or on another encoded root); use a new run.name")
        elif (cfg.data.encoded_version if cfg.data.encoded else cfg.data.version) == "latest":
            # The run started on an older version: keep reading it, or the data position
            # would point into different rows.
            log.info("resuming %s on its dataset version %s (latest is now %s)",
                     cfg.run.name, meta["dataset_version"], name)
            name = meta["dataset_version"]
        else:
            errors.append(f"data.version: {name} but run {cfg.run.name!r} was checkpointed "
                          f"on {meta['dataset_version']}; use that version or a new run.name")
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))
    assert name is not None and geo is not None
    return Preflight(name, run_storage, meta["step"] if meta else None, needed_clip(cfg, geo))


def summary(cfg: TrainConfig, pre: Preflight) -> dict[str, Any]:
    """What ``--preflight`` prints when everything passed."""
    frames, height, width = pre.pixel_shape
    return {"run_name": cfg.run.name, "dataset_version": pre.dataset_version,
            "clip": f"{frames}x{height}x{width}", "resume_step": pre.resume_step,
            "run_storage": pre.run_storage, "preflight": "passed"}


__all__ = ["PREP_CONFIGS", "Preflight", "dataset_problems", "encoded_problems",
           "missing_paths", "preflight", "summary"]
