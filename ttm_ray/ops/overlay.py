"""What a rehearsal overlay may change in a shipped production config, and the check.

A rehearsal overlay (``jobs/configs/rehearsal/*.yaml``) names the shipped file first in its
``base:`` list and changes only what a CPU box cannot have as shipped. Every changed key must
match one of :data:`ALLOWED`; anything else (frame counts, resolutions, stage lists, resource
names, filter thresholds, dataset links) is a problem. Roots are stricter than a pattern: a
path under a shipped root may only move to the same place under the rehearsal root, so the
links between jobs (prep writes the dataset training reads, training writes the exports
generation loads) stay exactly as shipped.

The comparison is on the merged YAML mappings before environment references are expanded, so
``${TTM_REHEARSAL_ROOT}`` is compared as written.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttm_ray.config.loader import BASE_KEY, load_merged, read_yaml

#: Shipped roots and where the rehearsal puts them (longest prefix first).
ROOTS = (
    ("/mnt/shared/ttm-ray/", "${TTM_REHEARSAL_ROOT}/"),
    ("/mnt/shared/", "${TTM_REHEARSAL_ROOT}/shared/"),
)
ROOT_KEYS = ("run.root", "checkpoint.storage_path", "data.dataset_root",
             "generation.stage1.export", "generation.stage2.export", "manifest")


@dataclass(frozen=True)
class Allowed:
    pattern: str  # dotted key path, fnmatch-style (``*`` matches one or more levels)
    category: str
    why: str


ALLOWED: tuple[Allowed, ...] = (
    *(Allowed(k, "roots", "same place under the rehearsal root") for k in ROOT_KEYS),
    Allowed("source.kind", "inputs", "the generated corpus stands in for the video bucket"),
    Allowed("source.path", "inputs", "the generated corpus stands in for the video bucket"),
    Allowed("input.manifest", "inputs", "generated items for batch generation"),
    # model folders: tiny models built locally with the libraries' own save format
    Allowed("*.model_path", "model folders", "tiny models built locally"),
    Allowed("*.clip_model_path", "model folders", "tiny models built locally"),
    Allowed("encoders.*.path", "model folders", "tiny models built locally"),
    Allowed("evaluation.*.path", "model folders", "tiny metric backbones built locally"),
    Allowed("evaluation.*.weights", "model folders", "tiny metric backbones built locally"),
    Allowed("evaluation.fvd.backbone", "model folders", "the tiny FVD backbone's format"),
    Allowed("evaluation.flow.backend", "model sizes", "RAFT small: RAFT large on CPU is minutes"),
    Allowed("evaluation.flow.size", "model sizes", "the flow network's input size on CPU"),
    Allowed("model.init_from", "model folders", "a tiny text-to-video DiT built locally"),
    Allowed("model.overrides", "model folders", "the tiny size has no SD1.5 / adapter folders"),
    Allowed("model.overrides.*", "model folders", "tiny size fields"),
    # model sizes
    Allowed("model.size", "model sizes", "the tiny size of the same family"),
    Allowed("model.masked_attention_blocks", "model sizes", "the tiny size has fewer blocks"),
    # counts
    Allowed("scaling.num_workers", "counts", "2 training workers on 2 cores"),
    Allowed("scaling.cpus_per_worker", "counts", "CPUs the fake nodes have"),
    Allowed("batch.*", "counts", "a global batch of 2"),
    Allowed("optim.max_steps", "counts", "a few steps"),
    Allowed("optim.warmup_steps", "counts", "a few steps"),
    Allowed("checkpoint.every_steps", "counts", "a few steps"),
    Allowed("logging.*", "counts", "previews with few sampling steps"),
    Allowed("resources.*.num_cpus", "counts", "CPUs the fake nodes have"),
    Allowed("resources.*.min_actors", "counts", "one actor per pool"),
    Allowed("resources.*.max_actors", "counts", "one actor per pool"),
    Allowed("resources.*.batch_size", "counts", "few rows"),
    Allowed("clip.max_clips_per_video", "counts", "few clips per video"),
    Allowed("source.limit", "counts", "few videos"),
    Allowed("generation.steps", "counts", "few sampling steps"),
    Allowed("evaluation.flow.iterations", "counts", "RAFT refinement iterations (random weights)"),
    Allowed("generation.stage*.steps", "counts", "few sampling steps"),
    # the device: the fake GPUs have no CUDA
    Allowed("*.device", "device", "CPU: the fake GPU nodes have no CUDA"),
    Allowed("*.dtype", "device", "float32 on CPU"),
    Allowed("scaling.use_gpu", "device", "CPU workers on gloo"),
    Allowed("deepspeed.bf16", "device", "fp32 on CPU"),
    Allowed("*.allow_random_weights", "device", "no SAM2 checkpoint on this machine"),
    # stand-ins for models this machine cannot run usefully (reported as a deviation):
    # vLLM has no CPU build and a tiny random LLM answers nothing parseable; random Grounding
    # DINO / SAM2 weights find no objects. The answers and SA-V masks given with the
    # generated corpus stand in, through the same stage code and the same stage list length.
    Allowed("caption.engine", "stand-ins", "no vLLM on CPU: the input's answers"),
    Allowed("caption.engine.*", "stand-ins", "no vLLM on CPU: the input's answers"),
    Allowed("prompts.engine", "stand-ins", "no vLLM on CPU: the input's answers"),
    Allowed("prompts.engine.*", "stand-ins", "no vLLM on CPU: the input's answers"),
    Allowed("annotate.prompts.engine.*", "stand-ins", "no vLLM on CPU: the input's answers"),
    Allowed("mask_source", "stand-ins", "random SAM2 finds nothing: the corpus's SA-V masks"),
    Allowed("annotate.mask_source", "stand-ins", "random SAM2 finds nothing: SA-V masks"),
)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are leaves (they replace as a whole)."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern)


def allowed_for(path: str) -> Allowed | None:
    return next((a for a in ALLOWED if _matches(path, a.pattern)), None)


def moved_root(old: Any, new: Any) -> bool:
    """``new`` is ``old`` with a shipped root replaced by its rehearsal root."""
    if not isinstance(old, str) or not isinstance(new, str):
        return False
    for shipped, rehearsal in ROOTS:
        if (old.rstrip("/") + "/").startswith(shipped):
            return new.rstrip("/") + "/" == rehearsal + (old.rstrip("/") + "/")[len(shipped):]
    return False


def shipped_base(overlay: str | Path) -> Path:
    """The shipped file an overlay names first in ``base:``."""
    path = Path(overlay).resolve()
    bases = read_yaml(path).get(BASE_KEY) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not bases:
        raise ValueError(f"{overlay}: a rehearsal overlay must name the shipped file in base:")
    return (path.parent / bases[0]).resolve()


def changed_keys(overlay: str | Path) -> dict[str, tuple[Any, Any]]:
    """Every key whose effective value differs from the shipped file: path -> (old, new)."""
    shipped = flatten(load_merged(shipped_base(overlay)))
    effective = flatten(load_merged(overlay))
    return {k: (shipped.get(k), v) for k, v in effective.items()
            if k not in shipped or shipped[k] != v} | {
        k: (v, None) for k, v in shipped.items()
        if k not in effective and not any(e.startswith(k + ".") for e in effective)}


def overlay_problems(overlay: str | Path) -> list[str]:
    """Changes outside the allow-list, one line each; [] when the overlay keeps to it."""
    problems = []
    for key, (old, new) in sorted(changed_keys(overlay).items()):
        rule = allowed_for(key)
        if rule is None:
            problems.append(f"{overlay}: {key}: {old!r} -> {new!r} is not a change a "
                            "rehearsal overlay may make (allowed: roots, inputs, model folders "
                            "and sizes, counts, the device, declared stand-ins)")
        elif rule.category == "roots" and not moved_root(old, new):
            problems.append(f"{overlay}: {key}: {old!r} -> {new!r} must stay the shipped path "
                            "under ${TTM_REHEARSAL_ROOT} (links between jobs stay as shipped)")
    return problems


__all__ = ["ALLOWED", "ROOTS", "Allowed", "allowed_for", "changed_keys", "flatten",
           "moved_root", "overlay_problems", "shipped_base"]
