"""ZeRO-3 models are partitioned as they are built (``deepspeed.zero.Init``): each rank holds
about 1/world of the parameters, the weights equal a whole build's from the same seed, and
``init_from`` loads into the partitioned model.

Ranks are local processes in a gloo group (``torch.multiprocessing.spawn``) on DeepSpeed's CPU
accelerator: the real ``build_train_model`` path, no Ray.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ttm_ray.models import ModelConfig, build_model
from ttm_ray.training.model_init import build_partitioned, local_parameter_bytes, parameter_count

#: A DiT small enough for CPU but with every kind of layer the paper one has (stage 2: the
#: masked layers and their zero output projections, the widened patchify, adaLN).
DIT = {"family": "dit", "size": "dit-tiny", "stage": 2, "latent_channels": 48,
       "num_frames": 4, "height": 8, "width": 8}
UNET = {**DIT, "family": "unet", "size": "unet-tiny"}
MODELS = {"dit": DIT, "unet": UNET}
SEED = 0
WORLDS = (2, 4)


def ds_config() -> dict[str, Any]:
    """What ``zero.Init`` reads of the run's DeepSpeed config (fp32: exact comparisons)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": False}, "zero_optimization": {"stage": 3}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two spawns, of 2 and 4 gloo ranks (process start-up is most of the cost), doing every
    build the tests below check; results land in the returned folder."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("zero_init")
    whole = {}
    for name, model in MODELS.items():
        torch.manual_seed(SEED)
        whole[name] = build_model(ModelConfig(**model)).state_dict()
        torch.manual_seed(SEED + 1)  # other weights: a stage-1 checkpoint to start from
        stage1 = build_model(ModelConfig(**{**model, "stage": 1})).state_dict()
        save_file(stage1, str(out / f"{name}-stage1.safetensors"))
    torch.save(whole, out / "whole.pt")
    for world in WORLDS:
        mp.spawn(_rank_main, args=(world, free_port(), out), nprocs=world, join=True)
    return out


def _rank_main(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    (out / f"memory-{world}-{rank}.json").write_text(json.dumps(_memory()))
    if world != 2:
        return
    for name, model in MODELS.items():  # gathered weights, written by rank 0
        for tag, init_from in (("fresh", None), ("loaded", out / f"{name}-stage1.safetensors")):
            state = _gathered(_build({**model, "init_from": init_from and str(init_from)}))
            if rank == 0:
                save_file(state, str(out / f"{name}-{tag}.safetensors"))


def _build(model: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_partitioned(ModelConfig(**model), ds_config())


def _memory() -> dict[str, Any]:
    model = _build(MODELS["dit"])
    params = list(model.parameters())
    return {"local_bytes": local_parameter_bytes(model), "total": parameter_count(model),
            "numels": [p.ds_numel for p in params],
            "materialised": sum(p.data.numel() for p in params)}


def _gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ tests
@pytest.mark.slow
def test_per_rank_parameter_memory_drops_with_world_size(builds: Path) -> None:
    whole = torch.load(builds / "whole.pt")["dit"]
    numels = [v.numel() for v in whole.values()]  # state_dict order = parameter order
    full = 4 * sum(numels)  # fp32 bytes of the whole model (what one rank holds unpartitioned)
    print(f"whole model: {full / 2**20:.2f} MiB of parameters")
    for world in WORLDS:
        # Each parameter split in `world` equal parts (the last one padded).
        expected = 4 * sum(math.ceil(n / world) for n in numels)
        for rank in range(world):
            got = json.loads((builds / f"memory-{world}-{rank}.json").read_text())
            assert got["numels"] == numels and got["total"] == sum(numels)  # via ds_numel
            assert got["materialised"] == 0  # no rank keeps a whole parameter
            assert got["local_bytes"] == expected
        print(f"partitioned over {world}: {expected / 2**20:.2f} MiB per rank "
              f"({expected / full:.3f} of the model)")
        # 1/world of the model, plus at most one padding element per parameter.
        assert full / world <= expected <= full / world + 4 * len(numels)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_partitioned_build_equals_the_whole_one(name: str, builds: Path) -> None:
    """Gathered from two ranks: the seed's weights (the model's own init survives
    partitioning, zero output layers included) and, from ``init_from``, the file's (a
    stage-1 file lacks the masked layers, which keep their init)."""
    whole = torch.load(builds / "whole.pt")[name]
    stage1 = load_file(str(builds / f"{name}-stage1.safetensors"))
    fresh, loaded = (load_file(str(builds / f"{name}-{tag}.safetensors"))
                     for tag in ("fresh", "loaded"))
    assert fresh.keys() == loaded.keys() == whole.keys()
    for key, value in whole.items():
        torch.testing.assert_close(fresh[key], value, rtol=0, atol=0, msg=key)
        expected = value if "masked_" in key else stage1[key]
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0, msg=key)
    zero_out = [k for k in whole if "masked_" in k and k.endswith("to_out.weight")]
    assert zero_out and all(not fresh[k].any() for k in zero_out)
