"""The trained model on a worker: built whole (ZeRO-2) or partitioned as it is built (ZeRO-3).

Under ZeRO-3 the model is constructed inside ``deepspeed.zero.Init``: each module's
parameters are split over the data-parallel ranks as soon as that module's ``__init__``
returns, so a rank only ever holds one module's full weights at a time, never the whole fp32
model (a 4B DiT is 16 GB of fp32 per rank otherwise, before DeepSpeed gets to partition it).
Everything that touches weights after construction must then gather them:

* the model's own init: a parent module that re-initialises its children's weights (the
  DiT's adaLN-Zero / output zeros, the masked layers' zero output projection) must do so
  through ``Module.apply``, which ``zero.Init`` gathers module by module (DeepSpeed's
  ``apply_with_gather``); a direct ``nn.init.zeros_(child.weight)`` would be a silent no-op
  on a partitioned (empty) parameter;
* ``model.init_from``: loaded here module by module under ``GatheredParameters`` (rank 0
  writes, DeepSpeed broadcasts and re-partitions), reading only that module's tensors from
  the safetensors file;
* parameter counts: :func:`parameter_count` (``ds_numel`` of a partitioned parameter);
* exports need nothing: they consolidate the saved checkpoint's shards
  (``deepspeed.utils.zero_to_fp32``), never the live module.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ttm_ray.models import build_model, check_init_from, resolve_family_config
from ttm_ray.models.weights import weights_file
from ttm_ray.models.widening import EXTRA, WidenedConv

if TYPE_CHECKING:
    from ttm_ray.models import ModelConfig
    from ttm_ray.training.config import TrainConfig

log = logging.getLogger(__name__)


def build_train_model(cfg: TrainConfig, ds_config: dict[str, Any],
                      device: torch.device | str) -> nn.Module:
    """The model ``deepspeed.initialize`` gets: partitioned at construction under ZeRO-3
    (``ds_config`` is the dict the engine is initialised with; DeepSpeed places the
    partitions on its accelerator's current device, which Ray Train set to ``device``), built
    whole on ``device`` otherwise. ``model.init_from`` is loaded either way."""
    if cfg.deepspeed.zero_stage != 3:
        return build_model(cfg.model, device=device)
    return build_partitioned(cfg.model, ds_config)


def build_partitioned(model_cfg: ModelConfig, ds_config: dict[str, Any]) -> nn.Module:
    """Build under ``deepspeed.zero.Init`` (parameters on DeepSpeed's device, in the config's
    dtype: bf16 under ``bf16.enabled``), partitioned over all ranks, then load ``init_from``
    with gathering. Needs the distributed group (Ray Train's, or
    ``deepspeed.init_distributed``). Not over a sub-group: DeepSpeed 0.19's gathered
    ``Module.apply`` broadcasts from global rank 0."""
    import deepspeed

    # Import the family's modules (diffusers for the U-Net) before zero.Init: its
    # tensor-constructor patches break torch._dynamo's import-time signature checks.
    resolve_family_config(model_cfg)
    # DeepSpeed's comm over the process group Ray Train made (what deepspeed.initialize does
    # first too): zero.Init reads the world size from it, and would see 1 before.
    deepspeed.init_distributed()
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(replace(model_cfg, init_from=None))
    except (ValueError, RuntimeError) as exc:
        raise RuntimeError(
            f"model {model_cfg.family} {model_cfg.size} (stage {model_cfg.stage}) cannot be "
            f"built partitioned for ZeRO-3 (deepspeed.zero.Init): {exc}. A module that "
            "re-initialises its children's weights in __init__ must do it through "
            "Module.apply (DeepSpeed gathers them there); or train with "
            "deepspeed.zero_stage: 2") from exc
    if model_cfg.init_from:
        load_partitioned(model, model_cfg)
    return model


def load_partitioned(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Load ``model_cfg.init_from`` into a ``zero.Init`` model, one module at a time.

    Accepts and refuses the same files as :func:`ttm_ray.models.load_weights` (the same
    check, on a meta build: every rank runs it, so all raise together and none waits in a
    collective). Rank 0 writes each module's gathered parameters; leaving
    ``GatheredParameters`` broadcasts them and re-partitions. Buffers are not partitioned:
    every rank loads its own.
    """
    import deepspeed
    import deepspeed.comm as dist
    from safetensors import safe_open

    problems = check_init_from(model_cfg)
    if problems:
        raise ValueError(" | ".join(problems))
    file = weights_file(model_cfg.init_from or "")
    writer = dist.get_rank() == 0
    loaded = 0
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        for prefix, module in model.named_modules():
            prefix = f"{prefix}." if prefix else ""
            state = _module_state(f, keys, module, prefix)
            if not state:
                continue
            params = dict(module.named_parameters(prefix=prefix[:-1], recurse=False))
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), \
                    torch.no_grad():
                for key, param in params.items():
                    if writer and key in state:
                        param.copy_(state[key].to(param.dtype))
            for name, buf in module.named_buffers(prefix=prefix[:-1], recurse=False):
                if name in state:
                    buf.copy_(state[name].to(buf.dtype))
            loaded += len(state)
    log.info("model.init_from: %s: %d tensors loaded into the partitioned model", file, loaded)


def _module_state(f: Any, keys: set[str], module: nn.Module, prefix: str
                  ) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors for ``module``'s own parameters and buffers (full keys), in
    the module's layout (a widened input layer adapts a narrow / other-layout weight)."""
    own = [n for n, _ in module.named_parameters(recurse=False)] + \
        [n for n, _ in module.named_buffers(recurse=False)]
    wanted = {prefix + n for n in own}
    if isinstance(module, WidenedConv):
        wanted.add(prefix + EXTRA)  # the split layout's second weight, adapted away below
    state = {k: f.get_tensor(k) for k in sorted(wanted & keys)}
    if isinstance(module, WidenedConv) and state:
        module.adapt_checkpoint(state, prefix)
    return state


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, whole or partitioned (``ds_numel``: a partitioned parameter's
    ``numel()`` is 0 on every rank)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds: its ZeRO-3 partitions (``ds_tensor``),
    or the whole parameters when they are not partitioned."""
    total = 0
    for p in model.parameters():
        part = getattr(p, "ds_tensor", None)
        held = part if part is not None else p.data
        total += held.numel() * held.element_size()
    return total


__all__ = ["build_partitioned", "build_train_model", "load_partitioned",
           "local_parameter_bytes", "parameter_count"]
