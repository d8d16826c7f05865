"""Training batches from an encoded version (``data.encoded``): no decoding, no encoders.

:class:`EncodedTrainingData` has :class:`~ttm_ray.training.data.TrainingData`'s interface
(``batch``, ``prefetch``, ``validation_sample``, ``num_rows``, ``group_rows``, ``bad_rows``,
``pixel_shape``, ``version``, ``close``) so the loop and the sampler do not care which one
they hold. A batch is the stored encoder outputs (:mod:`ttm_ray.dataset.encoded`) put
together by :func:`~ttm_ray.conditioning.encoders.assemble_conditions` and the local tokens
by :func:`~ttm_ray.conditioning.text_encoders.pack_local`, the same two functions on-the-fly
encoding ends in, so a step sees the same tensors either way (float tolerance: the encoders
ran on other batches). The null prompt for guidance dropout is stored with the version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.conditioning.encoders import Encoders, assemble_conditions
from ttm_ray.conditioning.text_encoders import pack_local
from ttm_ray.dataset.encoded import read_null_text, row_tensor, tensor_columns
from ttm_ray.dataset.versions import open_version
from ttm_ray.models.config import ModelConfig
from ttm_ray.training.clips import RowReader, validation_index
from ttm_ray.training.data import TrainDataConfig, TrainingData, cache_groups

#: Tensors a stage reads: (target, first-frame latent, trajectory condition, text).
_STAGE_TENSORS = {1: ("s", "x0", "s0", "motion_emb", "motion_mask"),
                  2: ("x", "x0", "s", "caption_emb", "caption_mask", "local_emb",
                      "local_token_ids", "token_ids")}


class EncodedTrainingData:
    """Rows of an encoded version -> training batches on one worker (see the module doc)."""

    def __init__(self, cfg: TrainDataConfig, stage: int, model_cfg: ModelConfig,
                 device: torch.device | str) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if not cfg.encoded:
            raise ValueError("data.encoded is not set")
        self.cfg, self.stage, self.model_cfg = cfg, int(stage), model_cfg
        self.device = torch.device(device)
        version = open_version(cfg.encoded, cfg.encoded_version)
        self.lineage: dict[str, Any] = version.manifest.get("lineage", {})
        if self.lineage.get("kind") != "encoded":
            raise ValueError(f"{version.path} is not an encoded version (`ttm-ray encode` "
                             "writes them); data.encoded must name its root")
        self.version = version.name
        self.names = _STAGE_TENSORS[self.stage]
        columns = ["clip_id", "caption", "c_motion", "local_ids",
                   *(c for n in self.names for c in tensor_columns(n))]
        self._rows = RowReader(version, columns=columns, cache_groups=cache_groups(cfg))
        self.num_rows = self._rows.num_rows
        self.group_rows = self._rows.group_rows
        self.bad_rows: dict[int, str] = {}  # clips that failed encoding are the rejects table
        self._null = read_null_text(version)
        self._validation: tuple[torch.Tensor, ModelConditioning, dict[str, Any]] | None = None

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        frames, height, width = self.lineage["geometry"]["pixel_shape"]
        return int(frames), int(height), int(width)

    @property
    def source_version(self) -> str:
        return str(self.lineage["source"]["version"])

    def null_text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored null prompt, as :meth:`Encoders.null_text` gives it."""
        emb, mask = self._null
        return (emb.to(self.device).expand(batch, -1, -1).clone(),
                mask.to(self.device).expand(batch, -1).clone())

    def prefetch(self, batches: Sequence[Sequence[int]]) -> None:
        """Nothing to prepare ahead: a batch is a row-group read and a few copies."""

    def batch(self, indices: Sequence[int], generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, ModelConditioning]:
        del generator  # deterministic, like TrainingData.batch
        return self.assemble(self._rows.rows([int(i) for i in indices]))

    def assemble(self, rows: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, ModelConditioning]:
        """Stored rows -> ``(x_data [B, C, T, H, W], cond)``, float32 on the device."""
        def stack(name: str) -> torch.Tensor:
            return torch.stack([row_tensor(r, name) for r in rows]).to(self.device)

        target, first, traj, emb, mask = self.names[:5]
        x_data = stack(target).float()
        local = token_ids = None
        if self.stage == 2:
            pieces = []
            for r in rows:
                tokens, ids = row_tensor(r, "local_emb"), row_tensor(r, "local_token_ids")
                pieces.append([(tokens[ids == oid], int(oid)) for oid in r["local_ids"]])
            dim = int(row_tensor(rows[0], "caption_emb").shape[-1])
            local = pack_local(pieces, dim, self.cfg.local_tokens, self.device,
                               row_tensor(rows[0], "local_emb").dtype)
            token_ids = stack("token_ids").long()
        cond = assemble_conditions(self.stage, self.model_cfg.num_frames, stack(first),
                                   stack(traj), (stack(emb), stack(mask)), local, token_ids,
                                   frames=self.model_cfg.condition_frames)
        return x_data, cond

    def validation_index(self) -> int:
        return validation_index(self._rows, self.cfg.validation_clip,
                                f"encoded version {self.version}")

    def validation_sample(self) -> tuple[torch.Tensor, ModelConditioning, dict[str, Any]]:
        """The fixed validation clip (batch of 1): ``(x_data, cond, raw)``; ``raw`` has no
        pixels (the encoded version stores none)."""
        if self._validation is None:
            row = self._rows.rows([self.validation_index()])[0]
            x, cond = self.assemble([row])
            raw = {"clip_id": row["clip_id"], "caption": row["caption"],
                   "c_motion": row["c_motion"], "local_ids": row["local_ids"],
                   "frames": None, "trajectory": None, "stage": self.stage}
            self._validation = (x, cond, raw)
        return self._validation

    def close(self) -> None:
        pass


def open_training_data(cfg: TrainDataConfig, stage: int, model_cfg: ModelConfig,
                       encoders: Encoders | None, device: torch.device | str
                       ) -> TrainingData | EncodedTrainingData:
    """The run's data: the encoded version when ``data.encoded`` is set, else on the fly
    through ``encoders``."""
    if cfg.encoded:
        return EncodedTrainingData(cfg, stage, model_cfg, device)
    if encoders is None:
        raise ValueError("on-the-fly training data needs the encoders")
    return TrainingData(cfg, stage, model_cfg, encoders, device)


__all__ = ["EncodedTrainingData", "open_training_data"]
