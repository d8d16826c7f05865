"""Job-level configs of the curation side (each YAML under jobs/configs/ has a ``kind``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.filtering import FilterConfig
from data_prep.publish import PublishConfig
from data_prep.sources import SourceConfig
from data_prep.stages.caption import CaptionConfig
from data_prep.stages.clip import ClipConfig
from data_prep.stages.ground import GroundingConfig
from data_prep.stages.gt_masks import GtMasksConfig
from data_prep.stages.ingest import IngestConfig
from data_prep.stages.prompts import PromptConfig
from data_prep.stages.score import ScoreConfig
from data_prep.stages.segment import SegmentConfig
from ttm_ray.config import RunConfig, constrained
from ttm_ray.config.resources import StageResources


@dataclass
class SynthConfig:
    """``ttm-ray synth``: the generated quickstart corpus."""

    kind: Literal["synth"] = "synth"
    out: str = constrained("runs/corpus", nonempty=True, help="output folder")
    videos: int = constrained(20, ge=1, help="number of valid videos")
    corrupt: int = constrained(0, ge=0, help="number of broken inputs added")
    seed: int = constrained(0, ge=0)
    task: Literal["corpus", "motion"] = constrained(
        "corpus", help="corpus: the quickstart corpus; motion: the learning task of "
                       "data_prep.synthetic_task (prompt-driven motion, colour changes named "
                       "only in local prompts)")
    split: Literal["train", "heldout"] = constrained(
        "train", help="task=motion: train, or heldout (unseen start positions, shape x colour "
                      "combinations and object counts)")
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.task == "motion" and self.corrupt:
            raise ValueError("corrupt: the motion task has no broken inputs (set corrupt=0)")
        if self.task == "corpus" and self.split != "train":
            raise ValueError(f"split: {self.split!r} applies to task=motion only (the quickstart "
                             "corpus has no splits); add task=motion or drop split")


@dataclass
class ResourcesConfig:
    """Placement of every stage (the one place it is configured; see StageResources)."""

    cpu: StageResources = field(default_factory=StageResources)
    caption: StageResources = field(default_factory=StageResources)
    prompts: StageResources = field(default_factory=StageResources)
    ground: StageResources = field(default_factory=StageResources)
    segment: StageResources = field(default_factory=StageResources)
    score: StageResources = field(default_factory=StageResources)


@dataclass
class OutputConfig:
    dir: str | None = constrained(
        None, help="run folder (work/ rows, dataset/ versions), a local or shared POSIX "
        "folder; null: <run.root>/<run.name>")
    flush_rows: int = constrained(
        500, gt=0, help="the work store writes a part every this many finished rows: a kill "
        "loses at most this many (and flush_seconds' worth)")
    flush_seconds: float = constrained(
        30.0, gt=0, help="... or when the oldest unwritten row is this old")

    def validate(self) -> None:
        if self.dir and "://" in self.dir and not self.dir.startswith("file://"):
            raise ValueError(
                f"output.dir is {self.dir!r}, a URI: the work store appends and renames part "
                "files, which object stores cannot do atomically. Use a local or shared POSIX "
                "folder (NFS, FSx, EFS); publish.dataset_root may be s3://")


@dataclass
class FaultConfig:
    """How the pipeline treats faults: retries, crashes and transient rejects."""

    max_attempts: int = constrained(
        3, ge=1, help="runs that may try a row whose reject is transient (engine error, OOM, "
        "remote read, worker crash, stage bug); after that the reject is final")
    task_retries: int = constrained(
        2, ge=0, help="Ray retries of a CPU task or an actor call whose worker died")
    actor_restarts: int = constrained(2, ge=0, help="restarts of a model actor that died")
    max_errored_blocks: int = constrained(
        32, ge=0, help="blocks that may fail after retries before the run stops; their "
        "inputs are re-run one per task, and an input that kills its worker again becomes "
        "a worker_crashed reject")
    isolation_timeout_s: float = constrained(
        900.0, gt=0, help="how long one input may run alone when re-run after a crash")


@dataclass
class PrepConfig:
    """``ttm-ray prep``: raw videos -> clips -> captions -> prompts -> boxes -> mask
    trajectories -> scores -> filter -> a published dataset version."""

    kind: Literal["prep"] = "prep"
    run: RunConfig = field(default_factory=RunConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    mask_source: Literal["sam2", "gt", "none"] = constrained(
        "sam2", help="sam2: Grounding DINO boxes + SAM2 propagation; gt: SA-V-format "
        "annotations given with the input; none: no masks (caption-only datasets)")
    ground: GroundingConfig = field(default_factory=GroundingConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    gt_masks: GtMasksConfig = field(default_factory=GtMasksConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    max_input_blocks: int = constrained(
        200, gt=0, help="inputs are split into at most this many blocks for the first stages"
    )

    def validate(self) -> None:
        if self.mask_source == "none" and self.filter.enabled and self.filter.min_objects > 0:
            raise ValueError(
                "mask_source is 'none' but filter.min_objects is "
                f"{self.filter.min_objects}: every clip would be filtered; set "
                "filter.min_objects: 0 (or choose a mask source)")

    def check_models(self) -> None:
        """Model paths the chosen stages need exist (raises ValueError naming the key).

        Separate from :meth:`validate` so a config can be validated on a laptop for a cluster
        whose model folders exist only there; jobs call this before any work starts.
        """
        if self.mask_source == "sam2":
            self.ground.require_model_path()
            self.segment.require_checkpoint()
        if self.score.enabled and self.score.temporal:
            self.score.require_model_path()

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else self.run.out_dir

    @property
    def work_dir(self) -> Path:
        """Per-clip rows of every run so far (the resume/incremental state)."""
        return self.output_dir / "work"

    @property
    def dataset_root(self) -> str | Path:
        """A folder (``Path``) or an object-store URI (``str``, e.g. ``s3://bucket/ds``)."""
        root = self.publish.dataset_root
        if root is None:
            return self.output_dir / "dataset"
        return root if "://" in root and not root.startswith("file://") else Path(
            root.removeprefix("file://"))

    @property
    def cpu_stages(self) -> StageResources:
        return self.resources.cpu
