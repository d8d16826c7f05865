"""The encoded-latent cache format: a dataset version of frozen-encoder outputs, per clip.

Written by ``ttm-ray encode`` (:mod:`ttm_ray.encoding`) from one published dataset version,
read by training when ``data.encoded`` is set (:mod:`ttm_ray.training.data`). It lives here,
in the format room both sides share, so the trainer never needs the encoding job's code.

Why: the encoders are frozen and the data fixed, so decoding video, rendering the trajectory
and running the autoencoder and text encoder on every training step repeats the same work
every epoch on the training GPUs. An encoded version does it once.

An encoded version is an ordinary dataset version (``versions/<name>/``, ``manifest.json``,
``_SUCCESS``, ``latest``, ``card/README.md``) under its own root (default
``<source root>-encoded/<encoding hash>``). Table ``data``, one row per clip
(:data:`ENCODED_SCHEMA_VERSION`):

=====================  ==========================================================
column                 what
=====================  ==========================================================
clip_id                string, the source row's clip_id
caption, c_motion      string (previews, audits)
local_ids              list<int64>: each local prompt's colour index (object id)
<tensor>               binary: the tensor's bytes, C order (bfloat16 as raw 16 bit)
<tensor>_dtype         string: torch dtype name (float32, bfloat16, bool, int16, ...)
<tensor>_shape         list<int32>
=====================  ==========================================================

Tensors (:data:`TENSORS`): ``x`` E(video) ``[C, T, h, w]``; ``s`` E(trajectory video)
``[C, T, h, w]``; ``x0`` / ``s0`` the first frames' latents ``[C, 1, h, w]``;
``caption_emb`` / ``caption_mask`` and ``motion_emb`` / ``motion_mask`` the text encoder's
``[L, D]`` embeddings and ``[L]`` masks of the caption and the motion prompt; ``local_emb``
``[M, D]`` every local prompt's real tokens concatenated (each prompt encoded on its own, as
:meth:`TextEncoder.encode_objects` does) and ``local_token_ids`` ``[M]`` the object id of each;
``token_ids`` ``[t, h, w]`` (int16) the trajectory masks on the model's token grid (stage 2).
Latents and embeddings keep the encoder's output dtype, so training turns them into exactly
the float32 tensors on-the-fly encoding gives.

Table ``rejects``: ``clip_id``, ``reason`` for source rows that could not be encoded.
File ``encoded/null_text.safetensors``: the empty prompt's ``emb [L, D]`` and ``mask [L]``
(guidance dropout without a text encoder). Lineage (``manifest.json``): ``kind: encoded``,
``source`` (dataset root + version), ``encoders`` (the ``encoders:`` section as written),
``geometry`` (pixel clip, latent and token grids, mask rule, local-token cap), ``encoding_hash``
(of encoders + geometry: what makes rows reusable) and ``reused_from``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch

ENCODED_SCHEMA_VERSION = "ttm-encoded/1"
NULL_TEXT_FILE = "encoded/null_text.safetensors"
TENSORS = ("x", "s", "x0", "s0", "caption_emb", "caption_mask", "motion_emb", "motion_mask",
           "local_emb", "local_token_ids", "token_ids")


def tensor_columns(name: str) -> tuple[str, str, str]:
    return name, f"{name}_dtype", f"{name}_shape"


def encoded_schema() -> pa.Schema:
    fields = [pa.field("clip_id", pa.string()), pa.field("caption", pa.string()),
              pa.field("c_motion", pa.string()), pa.field("local_ids", pa.list_(pa.int64()))]
    for name in TENSORS:
        data, dtype, shape = tensor_columns(name)
        fields += [pa.field(data, pa.binary()), pa.field(dtype, pa.string()),
                   pa.field(shape, pa.list_(pa.int32()))]
    return pa.schema(fields, metadata={"schema": ENCODED_SCHEMA_VERSION})


REJECT_SCHEMA = pa.schema([pa.field("clip_id", pa.string()), pa.field("reason", pa.string())])


def to_record(t: torch.Tensor) -> tuple[bytes, str, list[int]]:
    """A tensor -> ``(bytes, dtype name, shape)`` (exact, bfloat16 included)."""
    t = t.detach().cpu().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return raw.numpy().tobytes(), dtype, list(t.shape)


def from_record(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    """The inverse of :func:`to_record` (a copy: writable, owns its memory)."""
    if dtype == "bfloat16":
        arr = np.frombuffer(data, dtype=np.int16).reshape(shape)
        return torch.from_numpy(arr.copy()).view(torch.bfloat16)
    np_dtype = np.dtype(dtype) if dtype != "bool" else np.bool_
    return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).reshape(shape).copy())


def row_tensor(row: Mapping[str, Any], name: str) -> torch.Tensor:
    data, dtype, shape = (row[c] for c in tensor_columns(name))
    return from_record(data, dtype, list(shape))


def encoding_hash(encoders: Mapping[str, Any], geometry: Mapping[str, Any]) -> str:
    """12 hex digits of the encoders section and the clip geometry: rows of two encoded
    versions with the same hash are interchangeable."""
    blob = json.dumps({"encoders": encoders, "geometry": geometry}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def differing_keys(want: Any, have: Any, prefix: str) -> list[str]:
    """Dotted keys where two config dicts differ (``encoders.text_encoder.path: a != b``)."""
    if isinstance(want, Mapping) and isinstance(have, Mapping):
        out = []
        for key in sorted(set(want) | set(have)):
            out += differing_keys(want.get(key), have.get(key), f"{prefix}.{key}")
        return out
    if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
        want, have = list(want), list(have)
    return [] if want == have else [f"{prefix}: {want!r} (train config) != {have!r} (encoded)"]


def read_null_text(version: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored null prompt ``(emb [L, D], mask [L])`` of an encoded ``DatasetVersion``."""
    from safetensors.torch import load

    tensors = load(version.read_bytes(NULL_TEXT_FILE))
    return tensors["emb"], tensors["mask"]


__all__ = ["ENCODED_SCHEMA_VERSION", "NULL_TEXT_FILE", "REJECT_SCHEMA", "TENSORS",
           "differing_keys", "encoded_schema", "encoding_hash", "from_record", "read_null_text",
           "row_tensor", "tensor_columns", "to_record"]
