"""Job configs of ``ttm-ray generate`` and ``ttm-ray evaluate`` (kinds ``generate`` /
``evaluate``).

They compose sections owned by both sides of the house, which is why they live with the
jobs: ``annotate`` (data prep's front-end: LLM prompts, Grounding DINO + SAM2 or GT masks),
``generation`` / ``batch`` / ``resources`` (``ttm_ray.inference``) and ``evaluation``
(``ttm_ray.evaluation``). Declarations only; the work is in those packages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.annotate import AnnotateConfig
from ttm_ray.config import RunConfig, constrained
from ttm_ray.config.resources import StageResources
from ttm_ray.evaluation.config import EvaluationConfig
from ttm_ray.inference.batch import BatchConfig, InferenceResources
from ttm_ray.inference.config import GenerationConfig
from ttm_ray.inference.harness import NEEDS_TRAJECTORY


@dataclass
class ObjectPromptEntry:
    name: str = constrained("", nonempty=True, help="the object's grounding phrase")
    prompt: str = constrained("", nonempty=True, help="its local prompt (what it does)")


@dataclass
class InputConfig:
    """One image (``ttm-ray generate --image ... --prompt ...``) or a manifest of items."""

    manifest: str | None = constrained(
        None, help="items to generate (JSONL / JSON / CSV / Parquet: id, prompt, image or "
                   "reference_video, optional prompts and annotation); overrides image/prompt")
    id: str | None = constrained(
        None, nonempty=True, help="output folder name of the one image; null: <image stem>-<10 "
                                  "hex> derived from the input's content and the settings "
                                  "that change its video (a rerun of the same input skips it)")
    image: str | None = constrained(None, help="input image x0 (png/jpg/webp) or a video "
                                                "(its first frame)")
    prompt: str | None = constrained(None, help="global prompt c")
    motion_prompt: str | None = constrained(
        None, help="c_motion; with object_prompts, the LLM is skipped")
    object_prompts: list[ObjectPromptEntry] | None = field(
        default=None, metadata={"help": "c_local: [{name, prompt}] one per object; with "
                                        "motion_prompt, the LLM is skipped"})
    annotation: str | None = constrained(
        None, help="SA-V-format masks of the objects (one masklet per object_prompts entry, "
                   "in order), read with annotate.mask_source: gt: s0 from its first frame, "
                   "and with batch.variants: [given_trajectory] the whole trajectory (stage 1 "
                   "skipped)")

    def require(self) -> None:
        """Something to generate was given (checked by the job, not at load, so the defaults
        of this kind can be shown)."""
        from ttm_ray.config import ConfigError

        if self.manifest is None and (self.image is None or not (self.prompt or "").strip()):
            raise ConfigError(["input: give input.manifest (--manifest), or input.image and "
                               "input.prompt (--image / --prompt)"])

    def item_row(self) -> dict:
        """The one image as a manifest row."""
        objects = None if self.object_prompts is None else [
            {"name": o.name, "prompt": o.prompt} for o in self.object_prompts]
        return {"id": self.id, "prompt": self.prompt, "image": self.image,
                "motion_prompt": self.motion_prompt, "object_prompts": objects,
                "annotation": self.annotation}


@dataclass
class GenerateConfig:
    """``ttm-ray generate``: two-stage image-to-video from exported models."""

    kind: Literal["generate"] = "generate"
    run: RunConfig = field(default_factory=RunConfig)
    input: InputConfig = field(default_factory=InputConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    resources: InferenceResources = field(default_factory=InferenceResources)
    engine: Literal["auto", "local", "ray"] = constrained(
        "auto", help="local: in this process; ray: Ray Data actor pools; auto: ray for a "
                     "manifest, local for one image")
    out_dir: str | None = constrained(None, help="outputs; null: <run.root>/<run.name>")

    def validate(self) -> None:
        if self.input.annotation and self.annotate.mask_source != "gt":
            raise ValueError("input.annotation is read by the gt mask source: set "
                             "annotate.mask_source: gt")
        _check_variants(self.batch, self.annotate)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else self.run.out_dir


@dataclass
class EvaluateResources(InferenceResources):
    """Section ``resources:`` of the evaluate job: the generate job's pools plus the scorer
    actors (decode + every enabled backbone; GPU nodes in production). ``batch_size`` is how
    many chunks of ``evaluation.video_batch_size`` items an actor takes per call."""

    score: StageResources = field(default_factory=StageResources)


@dataclass
class EvaluateConfig:
    """``ttm-ray evaluate``: generate a benchmark's items under one or more settings and score
    them with the paper's metrics."""

    kind: Literal["evaluate"] = "evaluate"
    run: RunConfig = field(default_factory=RunConfig)
    manifest: str = constrained(
        "", nonempty=True, help="benchmark items (see `ttm-ray generate --help`): id, prompt, "
                                "reference_video, subset, prompts, annotation")
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    resources: EvaluateResources = field(default_factory=EvaluateResources)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    engine: Literal["local", "ray"] = constrained(
        "ray", help="ray: Ray Data actor pools (GPU nodes); local: in this process")
    out_dir: str | None = constrained(None, help="outputs; null: <run.root>/<run.name>")

    def validate(self) -> None:
        _check_variants(self.batch, self.annotate)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else self.run.out_dir


def _check_variants(batch: BatchConfig, annotate: AnnotateConfig) -> None:
    gt = [v for v in batch.expanded() if v in NEEDS_TRAJECTORY]
    if gt and annotate.mask_source != "gt":
        raise ValueError(f"batch.variants {gt} condition on the items' annotations: set "
                         "annotate.mask_source: gt (the front-end then reads s0 from them too)")


__all__ = ["EvaluateConfig", "GenerateConfig", "InputConfig", "ObjectPromptEntry"]
