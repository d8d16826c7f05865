"""Job-level configs of the curation side (each YAML under jobs/configs/ has a ``kind``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.resources import StageResources
from data_prep.sources import SourceConfig
from data_prep.stages.caption import CaptionConfig
from data_prep.stages.clip import ClipConfig
from data_prep.stages.ingest import IngestConfig
from data_prep.stages.prompts import PromptConfig
from ttm_ray.config import RunConfig, constrained


@dataclass
class SynthConfig:
    """``ttm-ray synth``: the generated quickstart corpus."""

    kind: Literal["synth"] = "synth"
    out: str = constrained("runs/corpus", nonempty=True, help="output folder")
    videos: int = constrained(20, ge=1, help="number of valid videos")
    corrupt: int = constrained(0, ge=0, help="number of broken inputs added")
    seed: int = constrained(0, ge=0)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class ResourcesConfig:
    cpu: StageResources = field(default_factory=StageResources)
    caption: StageResources = field(default_factory=StageResources)
    prompts: StageResources = field(default_factory=StageResources)


@dataclass
class OutputConfig:
    dir: str | None = constrained(None, help="output folder; null: <run.root>/<run.name>/prep")
    rows_per_file: int = constrained(2000, gt=0, help="rows per Parquet part file")


@dataclass
class PrepConfig:
    """``ttm-ray prep``: raw videos -> clips -> captions -> motion and object prompts."""

    kind: Literal["prep"] = "prep"
    run: RunConfig = field(default_factory=RunConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    max_input_blocks: int = constrained(
        200, gt=0, help="inputs are split into at most this many blocks for the first stages"
    )

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else self.run.out_dir / "prep"

    @property
    def cpu_stages(self) -> StageResources:
        return self.resources.cpu
