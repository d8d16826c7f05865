"""Source rows -> encoded rows (:mod:`ttm_ray.dataset.encoded`): the work of one encoder actor.

A plain class over Arrow batches, so tests call it in-process and the job decides placement
(an actor pool, GPUs) from config. The CPU half is training's own
(:func:`~ttm_ray.training.clips.prepare_clip` with the :func:`~ttm_ray.training.data.clip_spec`
of the run's model), the encoders are the run's (:class:`EncodersConfig.build`), so a row
here is what on-the-fly training would compute for that clip. Rows that cannot become a
sample come back as rejects (errors are data), never as an exception that ends the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch

from ttm_ray.conditioning.encoders import Encoders, EncodersConfig, to_model_video
from ttm_ray.dataset.encoded import (
    REJECT_SCHEMA,
    TENSORS,
    encoded_schema,
    tensor_columns,
    to_record,
)
from ttm_ray.models import ModelConfig
from ttm_ray.training.clips import BadClipError, Clip, ClipSpec, prepare_clip
from ttm_ray.training.data import TrainDataConfig, clip_spec

#: Column of the worker's output: null for an encoded clip, the reason for a reject.
REASON = "reject_reason"


def output_schema() -> pa.Schema:
    return encoded_schema().append(pa.field(REASON, pa.string()))


class ClipEncoder:
    """Encode batches of source rows with the run's frozen encoders on ``device``.

    Every clip is prepared for stage 2 (token ids on the model's token grid, local prompts
    required): the stored rows then serve both stages of the model.
    """

    def __init__(self, model: ModelConfig, data: TrainDataConfig, encoders: EncodersConfig,
                 device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.encoders: Encoders = encoders.build(self.device)
        self.data = data
        self.model = model
        self.spec: ClipSpec = clip_spec(
            2, model, data, self.encoders.autoencoder,
            allow_empty_prompt=self.encoders.text.empty_prompt == "null")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        clips: list[Clip] = []
        out: list[dict[str, Any]] = []
        for row in rows:
            try:
                clip = prepare_clip(row, self.spec)
                if not (clip.c_motion.strip() or self.spec.allow_empty_prompt):
                    raise BadClipError(clip.clip_id, "empty c_motion (stage 1 conditions on it)")
                clips.append(clip)
            except BadClipError as exc:
                out.append({"clip_id": row["clip_id"], REASON: str(exc)})
        if clips:
            try:
                out += self.encode(clips)
            except (ValueError, RuntimeError) as exc:  # e.g. a prompt the encoder refuses
                out += [{"clip_id": c.clip_id, REASON: f"encode failed: {exc}"} for c in clips]
        schema = output_schema()
        return pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in out],
                                    schema=schema)

    @torch.no_grad()
    def encode(self, clips: Sequence[Clip]) -> list[dict[str, Any]]:
        """Prepared clips -> encoded rows (tensors in the encoders' output dtypes)."""
        ae, text = self.encoders.autoencoder, self.encoders.text
        video = to_model_video([c.frames for c in clips], self.device)
        trajectory = to_model_video([c.trajectory for c in clips], self.device)
        b = len(clips)
        # The same calls TrainingData.encode makes: first frames of both videos, then both.
        x0, s0 = ae.encode_image(torch.cat([video[:, :, :1], trajectory[:, :, :1]])).split(b)
        x, s = ae.encode(torch.cat([video, trajectory])).split(b)
        names = [f"clip {c.clip_id!r}" for c in clips]
        caption = text.encode([c.caption for c in clips], names=names)
        motion = text.encode([c.c_motion for c in clips], names=names)
        flat = [p for c in clips for p in c.local_prompts]
        objects = text.encode_objects(
            flat, [f"clip {c.clip_id!r} object {i}" for c in clips for i in c.local_ids],
            self.data.local_tokens_per_object)
        rows, start = [], 0
        for i, c in enumerate(clips):
            pieces = objects[start:start + len(c.local_prompts)]
            start += len(c.local_prompts)
            local = (torch.cat(pieces) if pieces
                     else torch.zeros(0, text.dim, dtype=text.dtype))
            local_ids = torch.cat([torch.full((len(p),), oid, dtype=torch.long)
                                   for p, oid in zip(pieces, c.local_ids, strict=True)]) \
                if pieces else torch.zeros(0, dtype=torch.long)
            tensors = {"x": x[i], "s": s[i], "x0": x0[i], "s0": s0[i],
                       "caption_emb": caption[0][i], "caption_mask": caption[1][i],
                       "motion_emb": motion[0][i], "motion_mask": motion[1][i],
                       "local_emb": local, "local_token_ids": local_ids,
                       "token_ids": torch.from_numpy(c.token_ids).to(torch.int16)}
            row: dict[str, Any] = {"clip_id": c.clip_id, "caption": c.caption,
                                   "c_motion": c.c_motion, "local_ids": list(c.local_ids)}
            for name in TENSORS:
                row.update(zip(tensor_columns(name), to_record(tensors[name]), strict=True))
            rows.append(row)
        return rows

    def null_text(self) -> dict[str, torch.Tensor]:
        """The empty prompt's embedding and mask (guidance dropout at train time)."""
        emb, mask = self.encoders.null_text(1)
        return {"emb": emb[0].cpu().contiguous(), "mask": mask[0].cpu().contiguous()}


def split_output(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A worker's output -> ``(encoded rows, rejects)`` in their published schemas."""
    import pyarrow.compute as pc

    bad = pc.is_valid(table.column(REASON))
    good = table.filter(pc.invert(bad)).drop_columns([REASON]).cast(encoded_schema())
    rejects = table.filter(bad).select(["clip_id", REASON]).rename_columns(
        ["clip_id", "reason"]).cast(REJECT_SCHEMA)
    return good, rejects


__all__ = ["REASON", "ClipEncoder", "output_schema", "split_output"]
