"""Checkpoints: what makes a resume exact, how it reaches storage, and the final export.

A checkpoint is one folder in Ray Train's storage (``<storage>/<run>/step_XXXXXXXX``)::

    ds/...                      DeepSpeed's files (weights, optimizer shards, lr schedule,
                                client state: step, data position, run metadata)
    rng/rank_XXXXX.pt           each rank's RNG states (python, numpy, torch, CUDA and the
                                loop's own generator for noise / t / condition dropout)
    meta.json                   step, dataset version, config hash, MLflow run id, world size
    probe.safetensors           (last checkpoint) one batch in, the engine's output out

Every rank writes its own files into a local temp folder and reports it; Ray merges the
folders of all ranks into one in storage, so a multi-node run needs no shared scratch disk.
Restoring reads the merged folder back on every rank.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.models.export import load_exported, write_export
from ttm_ray.training.data import DataPosition

if TYPE_CHECKING:
    from ttm_ray.training.config import TrainConfig

log = logging.getLogger(__name__)

TAG = "ds"  # DeepSpeed's sub-folder; fixed so a checkpoint folder needs no 'latest' lookup
META = "meta.json"
PROBE = "probe.safetensors"
_COND_FIELDS = ("visual", "text", "text_mask", "local_text", "local_text_ids", "token_ids")


# ---------------------------------------------------------------------------- train state
@dataclass
class TrainState:
    """What the loop carries from step to step besides the engine.

    ``generator`` drives every random draw of the loop (noise, t, condition dropout, data
    augmentation); it is per rank so ranks see different noise, and saved per rank so a
    resumed run draws exactly the numbers the uninterrupted one would have.
    """

    step: int
    position: DataPosition
    generator: torch.Generator

    @classmethod
    def fresh(cls, seed: int, rank: int) -> TrainState:
        return cls(0, DataPosition(), torch.Generator().manual_seed(rank_seed(seed, rank)))


def rank_seed(seed: int, rank: int) -> int:
    """A well-mixed 63-bit seed per (run seed, rank): nearby seeds give unrelated streams."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Global RNGs (model init, any dropout). The same on all ranks before the model is built,
    so every rank starts from identical weights (ZeRO-3 partitions each rank's own copy)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- save / restore
def save_and_report(engine: Any, state: TrainState, meta: dict[str, Any],
                    metrics: dict[str, float], probe: Probe | None = None) -> None:
    """Save on every rank into a local folder and report it (Ray merges ranks in storage).

    Must be called by all ranks at the same step: DeepSpeed's save and ``ray.train.report``
    are both collective.
    """
    import ray.train

    rank = engine.global_rank
    with tempfile.TemporaryDirectory(prefix="ttm-ckpt-") as tmp:
        folder = Path(tmp)
        client_state = {"step": state.step, "position": state.position.state_dict(),
                        "meta": meta}
        engine.save_checkpoint(str(folder), tag=TAG, client_state=client_state)
        (folder / "rng").mkdir()
        torch.save(rng_state(state.generator), folder / "rng" / f"rank_{rank:05d}.pt")
        if rank == 0:
            (folder / META).write_text(json.dumps({**meta, "step": state.step}, indent=2))
            if probe is not None:
                probe.save(folder / PROBE)
        # SYNC upload (the default): the folder is copied before report returns.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{state.step:08d}")


def restore(engine: Any, folder: str | Path, seed: int, rank: int, world_size: int
            ) -> tuple[TrainState, dict[str, Any]]:
    """Load weights, optimizer, lr schedule and this rank's RNGs; returns (state, meta).

    A checkpoint written with another number of workers still resumes (same global batch,
    so the data position holds), but the per-rank noise streams cannot be mapped: they are
    re-seeded from (seed, rank, step) and the run is no longer bit-identical to an
    uninterrupted one.
    """
    folder = Path(folder)
    load_path, client = engine.load_checkpoint(str(folder), tag=TAG)
    if load_path is None:
        raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint under tag {TAG!r}")
    meta = client["meta"]
    state = TrainState(client["step"], DataPosition.from_state(client["position"]),
                       torch.Generator())
    rng_file = folder / "rng" / f"rank_{rank:05d}.pt"
    if meta.get("world_size") == world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True), state.generator)
    else:
        log.warning("checkpoint from %s workers, now %s: re-seeding the per-rank RNGs "
                    "(resume is not bit-exact)", meta.get("world_size"), world_size)
        seed_everything(rank_seed(seed, rank) + state.step)
        state.generator.manual_seed(rank_seed(seed + state.step, rank))
    return state, meta


def read_meta(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META).read_text())


def latest_meta(run_storage: str) -> dict[str, Any] | None:
    """``meta.json`` of the newest ``step_*`` checkpoint under a run's storage folder (local
    path or URI), or None: what a resubmission of the same run name resumes from."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(run_storage if "://" in run_storage
                                        else str(Path(run_storage).resolve()))
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    steps = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("step_"))
    for name in reversed(steps):  # a folder without meta.json is an interrupted upload
        path = f"{root}/{name}/{META}"
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
    return None


# ---------------------------------------------------------------------------- probe
@dataclass
class Probe:
    """One model call recorded from the trained engine: the export must reproduce it."""

    x_t: torch.Tensor
    t: torch.Tensor
    cond: ModelConditioning
    out: torch.Tensor

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"x_t": self.x_t, "t": self.t, "out": self.out}
        for name in _COND_FIELDS:
            value = getattr(self.cond, name)
            if value is not None:
                tensors[f"cond.{name}"] = value
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        from safetensors.torch import load_file

        t = load_file(str(path))
        cond = ModelConditioning(**{n: t.get(f"cond.{n}") for n in _COND_FIELDS})
        return cls(t["x_t"], t["t"], cond, t["out"])


# ---------------------------------------------------------------------------- export
def export_weights(checkpoint_dir: str | Path, out_dir: str | Path, cfg: TrainConfig,
                   info: dict[str, Any] | None = None) -> Path:
    """Consolidate a (ZeRO-2 or ZeRO-3) checkpoint into an export folder
    (:mod:`ttm_ray.models.export`: fp32 weights, the model, encoder and diffusion configs)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=TAG)
    return write_export(out_dir, state, cfg.model, encoders=cfg.encoders,
                        diffusion=cfg.diffusion, info=info)


def verify_export(export_dir: str | Path, probe: Probe, atol: float) -> float:
    """Max |export(probe inputs) - engine output|; RuntimeError if above ``atol`` (a bf16
    engine's output is only approximated by the fp32 export: pass a looser tolerance)."""
    model = load_exported(export_dir)
    with torch.no_grad():
        out = model(probe.x_t.float(), probe.t, probe.cond.to("cpu", torch.float32))
    diff = (out.float() - probe.out.float()).abs().max().item()
    if not diff <= atol:
        raise RuntimeError(f"{export_dir}: exported weights differ from the trained engine "
                           f"(max |diff| {diff:.3g} > {atol:.3g})")
    return diff
