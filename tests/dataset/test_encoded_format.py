"""The encoded-latent cache format: exact tensor round trips (bfloat16 included), the key
diff the training preflight prints, and the hash that makes rows reusable."""

from __future__ import annotations

import pytest
import torch

from ttm_ray.dataset.encoded import (
    TENSORS,
    differing_keys,
    encoded_schema,
    encoding_hash,
    from_record,
    tensor_columns,
    to_record,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.bool,
                                   torch.int16, torch.int64])
def test_tensors_round_trip_exactly(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 4, 5) * 10).to(dtype)
    data, name, shape = to_record(t[:, 1:])  # a non-contiguous view too
    back = from_record(data, name, shape)
    assert back.dtype == dtype and back.shape == (3, 3, 5)
    assert torch.equal(back, t[:, 1:])


def test_schema_has_data_dtype_and_shape_columns_per_tensor() -> None:
    names = encoded_schema().names
    for tensor in TENSORS:
        assert all(c in names for c in tensor_columns(tensor))


def test_differing_keys_name_each_key_and_the_hash_follows_them() -> None:
    a = {"text_encoder": {"path": "/m/t5", "max_length": 128}, "autoencoder": {"kind": "pixel"}}
    b = {"text_encoder": {"path": "/m/t5", "max_length": 64}, "autoencoder": {"kind": "pixel"}}
    assert differing_keys(a, a, "encoders") == []
    assert differing_keys(a, b, "encoders") == [
        "encoders.text_encoder.max_length: 128 (train config) != 64 (encoded)"]
    assert differing_keys({"g": (1, 2)}, {"g": [1, 2]}, "x") == []  # YAML lists vs tuples
    geo = {"pixel_shape": [4, 32, 32]}
    assert encoding_hash(a, geo) == encoding_hash(dict(a), dict(geo))
    assert encoding_hash(a, geo) != encoding_hash(b, geo)
