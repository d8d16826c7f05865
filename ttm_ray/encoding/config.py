"""``EncodeConfig``: one ``ttm-ray encode`` job (``kind: encode``).

Its ``model:``, ``data:`` and ``encoders:`` sections are the train config's sections of the
same names (same dataclasses), so an encode YAML is the train run's sections copied (or the
quickstart builds it from the train config with :meth:`EncodeConfig.from_train`): the clips
are prepared exactly as that run would prepare them, and the training preflight can compare
the two key by key. Of ``data:`` only the source (``dataset_root``, ``version``) and the clip
geometry (``frames/height/width``, ``mask_rule``, ``mask_threshold``,
``local_tokens_per_object``) matter here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ttm_ray.conditioning.encoders import EncodersConfig
from ttm_ray.config import RunConfig, constrained
from ttm_ray.models import ModelConfig
from ttm_ray.training.data import TrainDataConfig


@dataclass
class EncodeOutputConfig:
    dataset_root: str | None = constrained(
        None, help="root of the encoded versions; null: <data.dataset_root>-encoded/<encoding "
                   "hash> (one root per encoders + geometry, so reruns find their rows)")
    rows_per_file: int = constrained(
        128, gt=0, help="encoded clips per Parquet part (one row group each: training reads "
                        "a part at a time, ~2 MB a clip at paper scale)")


@dataclass
class EncodeResourcesConfig:
    """The encoder actor pool (Ray Data ``map_batches`` over actors)."""

    workers: int = constrained(1, gt=0, help="encoder actors")
    batch_size: int = constrained(8, gt=0, help="clips per encoder call")
    num_gpus: float = constrained(0.0, ge=0, help="GPUs per actor (production: 1)")
    num_cpus: float = constrained(1.0, gt=0, help="CPUs per actor (decoding, rendering)")
    device: Literal["auto", "cpu", "cuda"] = constrained(
        "auto", help="where the encoders run: auto = cuda when num_gpus > 0, else cpu")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"


@dataclass
class EncodeConfig:
    """``ttm-ray encode``: a dataset version -> its encoded version (see the module doc)."""

    kind: Literal["encode"] = "encode"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    output: EncodeOutputConfig = field(default_factory=EncodeOutputConfig)
    resources: EncodeResourcesConfig = field(default_factory=EncodeResourcesConfig)

    def validate(self) -> None:
        if self.encoders.autoencoder.posterior == "sample":
            raise ValueError("encoders.autoencoder.posterior: sample draws a new latent every "
                             "step; an encoded cache would freeze one draw: use mode or train "
                             "on the fly")

    @classmethod
    def from_train(cls, train: Any, **changes: Any) -> EncodeConfig:
        """The encode job for a train config's clips (its run, model, data and encoders)."""
        return cls(run=changes.pop("run", train.run), model=train.model, data=train.data,
                   encoders=train.encoders, **changes)


__all__ = ["EncodeConfig", "EncodeOutputConfig", "EncodeResourcesConfig"]
