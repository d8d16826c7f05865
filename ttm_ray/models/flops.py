"""Forward FLOPs per sample: what the MFU metric, the capacity plan and ``ttm-ray plan model``
divide by.

Convention (the one MFU papers and ``torch.utils.flop_counter`` use): only matrix products
count, 2 FLOPs per multiply-accumulate; attention counts ``Q K^T`` and ``A V`` dense, also for
the masked layers (SDPA with a boolean mask does the dense work). Element-wise work (norms,
activations, softmax) is left out: it is a few percent and is memory-bound anyway.

* DiT: a closed form from :class:`DiTConfig` and the token/text lengths
  (:func:`dit_forward_flops`), per component. ``tests/models/test_flops.py`` checks it against
  ``torch.utils.flop_counter.FlopCounterMode`` on ``dit-tiny``.
* U-Net: convolutions at five resolutions, resnets, motion modules: a closed form would
  restate diffusers' block layout, so :func:`measured_forward_flops` runs
  ``FlopCounterMode`` over a forward on the **meta** device (no memory, no compute; exact for
  the counted ops by construction).

Training costs ``3x`` forward (backward is twice the forward), ``4x`` with activation
checkpointing (the forward runs again in backward): :func:`training_flops_per_sample`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ttm_ray.models.config import ModelConfig

#: Default text lengths the reports assume when a run does not say (T5 prompts of MovieGen-
#: style models are padded to a fixed length; CLIP's is 77).
DEFAULT_TEXT_TOKENS = {"dit": 256, "unet": 77}
#: Local prompts: tokens per object times objects (2 objects of 32 tokens).
DEFAULT_LOCAL_TOKENS = 64


@dataclass
class FlopReport:
    """Forward FLOPs of one sample, by component, plus how they were obtained."""

    total: int
    by_component: dict[str, int] = field(default_factory=dict)
    method: str = "analytic"
    tokens: int = 0  # latent tokens per sample (after patchify for the DiT)

    def training_per_sample(self, activation_checkpointing: bool = False) -> int:
        return self.total * (4 if activation_checkpointing else 3)


def _attention(n_q: int, n_kv: int, dim: int, q_in: int, kv_in: int) -> dict[str, int]:
    """Projections + dense attention of one attention layer (width ``dim``)."""
    return {
        "projections": 2 * n_q * q_in * dim + 2 * n_kv * kv_in * 2 * dim + 2 * n_q * dim * dim,
        "attention": 2 * 2 * n_q * n_kv * dim,  # Q K^T and A V
    }


def dit_forward_flops(cfg, grid: tuple[int, int, int], text_tokens: int,
                      local_tokens: int = 0) -> FlopReport:
    """Closed-form forward FLOPs of :class:`~ttm_ray.models.dit.model.TTMDiT` on one sample.

    ``cfg`` is a resolved ``DiTConfig``; ``grid`` the token grid after patchify; the masked
    layers count only when ``cfg.masked_blocks > 0`` and ``local_tokens > 0`` (the model skips
    them otherwise).
    """
    d = cfg.dim
    n = grid[0] * grid[1] * grid[2]
    parts: dict[str, int] = {}

    def add(key: str, value: int) -> None:
        parts[key] = parts.get(key, 0) + int(value)

    add("patchify", 2 * n * d * (cfg.in_channels + cfg.visual_channels) * cfg.patch_volume)
    text_proj = 2 * (cfg.text_dim * d + d * d)
    add("text_proj", text_proj * (text_tokens + local_tokens))
    add("time_embed", 2 * (cfg.time_freq_dim * d + d * d))
    if cfg.adaln == "single":
        add("time_embed", 2 * d * 6 * d)
    else:
        add("blocks.adaln", cfg.depth * 2 * d * 6 * d)
    for i in range(cfg.depth):
        self_attn = _attention(n, n, d, d, d)
        add("blocks.self_attn", self_attn["projections"] + self_attn["attention"])
        cross = _attention(n, text_tokens, d, d, d)
        add("blocks.cross_attn", cross["projections"] + cross["attention"])
        add("blocks.ffn", 2 * n * 3 * d * cfg.hidden)
        if i < cfg.masked_blocks and local_tokens > 0:
            masked_self = _attention(n, n, d, d, d)
            masked_cross = _attention(n, local_tokens, d, d, d)
            add("masked_layers", sum(masked_self.values()) + sum(masked_cross.values()))
    add("final", 2 * n * d * cfg.patch_volume * cfg.output_channels)
    if cfg.adaln != "single":
        add("final", 2 * d * 2 * d)
    return FlopReport(total=sum(parts.values()), by_component=parts, method="analytic",
                      tokens=n)


def example_inputs(cfg: ModelConfig, model: torch.nn.Module, batch: int = 1,
                   text_tokens: int | None = None, local_tokens: int | None = None,
                   text_dim: int | None = None, device: torch.device | str = "cpu"):
    """A representative ``(x_t, t, cond)`` for ``model`` (zeros; shapes are what matter)."""
    from ttm_ray.conditioning.batch import ModelConditioning
    from ttm_ray.conditioning.layout import visual_channels

    text_tokens = text_tokens or DEFAULT_TEXT_TOKENS[cfg.family]
    local_tokens = DEFAULT_LOCAL_TOKENS if local_tokens is None else local_tokens
    text_dim = text_dim or _text_dim(model)
    shape = (batch, cfg.latent_channels, cfg.num_frames, cfg.height, cfg.width)
    x_t = torch.zeros(shape, device=device)
    t = torch.full((batch,), 0.5, device=device)
    if cfg.family == "unet":
        t = torch.full((batch,), 500, device=device, dtype=torch.long)
    visual = torch.zeros(batch, visual_channels(cfg.stage, cfg.latent_channels),
                         *shape[2:], device=device)
    text = torch.zeros(batch, text_tokens, text_dim, device=device)
    cond = ModelConditioning(visual=visual, text=text,
                             text_mask=torch.ones(batch, text_tokens, dtype=torch.bool,
                                                  device=device))
    if cfg.stage == 2 and local_tokens > 0:
        grid = (model.token_grid(*shape[2:]) if hasattr(model, "token_grid") else shape[2:])
        ids = torch.zeros(batch, *grid, dtype=torch.long, device=device)
        local_ids = torch.zeros(batch, local_tokens, dtype=torch.long, device=device)
        cond = cond.replace(local_text=torch.zeros(batch, local_tokens, text_dim, device=device),
                            local_text_ids=local_ids, token_ids=ids)
    return x_t, t, cond


def _text_dim(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("text_dim", "cross_attention_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the text width of {type(model).__name__}")


def measured_forward_flops(cfg: ModelConfig, model: torch.nn.Module | None = None,
                           text_tokens: int | None = None, local_tokens: int | None = None,
                           device: torch.device | str = "meta") -> FlopReport:
    """Forward FLOPs of one sample counted by ``FlopCounterMode`` (on the meta device by
    default: nothing is allocated, so the paper sizes are counted in seconds)."""
    from ttm_ray.models.registry import build_model

    if model is None:
        model = build_model(cfg, device=device)
    x_t, t, cond = example_inputs(cfg, model, 1, text_tokens, local_tokens, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, counting_attention():
        model(x_t, t, cond)
    by_module = counter.get_flop_counts()
    top = {name: sum(ops.values()) for name, ops in by_module.items()
           if name.count(".") == 1}  # "Global" is the root; "Model.child" the first level
    return FlopReport(total=int(counter.get_total_flops()),
                      by_component={k.split(".", 1)[1]: int(v) for k, v in top.items()},
                      method="flop_counter(meta)" if str(device) == "meta" else "flop_counter",
                      tokens=int(x_t[0, 0].numel()))


def counting_attention():
    """SDPA on the math backend while counting: the fused CPU kernel is invisible to
    ``FlopCounterMode`` (it would count attention as 0), the math path decomposes into the
    matmuls the convention counts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def forward_flops(cfg: ModelConfig, batch: int = 1, text_tokens: int | None = None,
                  local_tokens: int | None = None) -> int:
    """Forward FLOPs of ``batch`` samples of the run's model (analytic for the DiT, counted on
    the meta device for the U-Net)."""
    return forward_flop_report(cfg, text_tokens, local_tokens).total * batch


def forward_flop_report(cfg: ModelConfig, text_tokens: int | None = None,
                        local_tokens: int | None = None) -> FlopReport:
    from ttm_ray.models.registry import resolve_family_config

    if cfg.family == "dit":
        dit = resolve_family_config(cfg)
        pt, ph, pw = dit.patch
        grid = (cfg.num_frames // pt, cfg.height // ph, cfg.width // pw)
        local = (DEFAULT_LOCAL_TOKENS if local_tokens is None else local_tokens) \
            if cfg.stage == 2 else 0
        return dit_forward_flops(dit, grid, text_tokens or DEFAULT_TEXT_TOKENS["dit"], local)
    return measured_forward_flops(cfg, text_tokens=text_tokens,
                                  local_tokens=local_tokens if cfg.stage == 2 else 0)
