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

The masked layers with the block-sparse kernel (``flex`` over object-sorted tokens, see
:mod:`ttm_ray.conditioning.masked_attention`) compute only the 128 x 128 blocks whose object
ids can match: masked self-attention costs about ``sum_l n_l^2`` (object ``l`` with ``n_l``
tokens, background one group), not ``N^2``. :func:`masked_layer_flops` counts that for a given
layout from the very block structure the kernel gets, and :func:`masked_layers_overhead`
reports the masked layers' share of the base forward (dense and block-sparse) for a run's
model on :func:`representative_object_ids`. The totals above keep the dense convention (what
SDPA with a boolean mask, the CPU path, does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ttm_ray.conditioning.masked_attention import BLOCK_SIZE, ObjectLayout
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



def random_example_inputs(cfg: ModelConfig, model: torch.nn.Module, generator: torch.Generator,
                          batch: int = 1, device: torch.device | str = "cpu"):
    """:func:`example_inputs`' shapes with standard-normal floats (drawn on the CPU from
    ``generator``, so a seed gives the same values on any device): ``(x_data, cond)`` for
    timing a training step. Masks and object ids stay as :func:`example_inputs` builds them."""
    import dataclasses

    from ttm_ray.conditioning.batch import ModelConditioning

    x_t, _, zeros = example_inputs(cfg, model, batch=batch, device=device)

    def rand(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not t.is_floating_point():
            return t
        return torch.randn(t.shape, generator=generator).to(device)

    cond = ModelConditioning(**{f.name: rand(getattr(zeros, f.name))
                                for f in dataclasses.fields(zeros)})
    return rand(x_t), cond

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


# ------------------------------------------------------------------ masked layers, block-sparse


def representative_object_ids(grid: tuple[int, int, int], batch: int = 1) -> torch.Tensor:
    """``[B, T, H, W]`` object ids of the masked-layer reports and benchmarks: two box objects
    drifting right over the frames (about 25 % and 12.5 % of the tokens), background (-1)
    elsewhere."""
    t, h, w = grid
    ids = torch.full((batch, t, h, w), -1, dtype=torch.long)
    for f in range(t):
        dx = (f * w) // (2 * t)
        ids[:, f, h // 8: h // 8 + h // 2, dx: dx + w // 2] = 0     # 25 %
        ids[:, f, 5 * h // 8: 5 * h // 8 + h // 4, w // 2: w // 2 + w // 2] = 1  # 12.5 %
    return ids


def representative_local_ids(local_tokens: int = DEFAULT_LOCAL_TOKENS, objects: int = 2,
                             batch: int = 1) -> torch.Tensor:
    """``[B, M]`` local-text ids: ``local_tokens / objects`` tokens per object, in order."""
    per = max(1, local_tokens // objects)
    return (torch.arange(local_tokens) // per).clamp(max=objects - 1).expand(batch, -1).clone()


def masked_layer_flops(token_ids: torch.Tensor, local_ids: torch.Tensor, dim: int,
                       context_dim: int, *, sparse: bool = True,
                       block_size: int = BLOCK_SIZE) -> dict[str, int]:
    """Forward FLOPs of one masked self- plus one masked cross-attention layer (width ``dim``,
    context width ``context_dim``) on one sample: ``token_ids [1, N]``, ``local_ids [1, M]``.

    ``sparse``: attention over the (query, key) pairs of the blocks the block-sparse kernel
    computes (``ObjectLayout.computed_pairs``: block-granular ``sum_l n_l^2`` for self,
    object tokens x text for cross); otherwise dense ``N^2`` / ``N M``. Projections are dense
    either way. Gathering tokens into sorted order is a copy, not counted.
    """
    n, m = token_ids.shape[-1], local_ids.shape[-1]
    if sparse:
        layout = ObjectLayout(token_ids.reshape(1, n).long(), local_ids.reshape(1, m).long(),
                              block_size=block_size)
        self_pairs = int(layout.computed_pairs("self")[0])
        cross_pairs = int(layout.computed_pairs("cross")[0])
    else:
        self_pairs, cross_pairs = n * n, n * m
    masked_self = _attention(n, n, dim, dim, dim)
    masked_cross = _attention(n, m, dim, dim, context_dim)
    return {"projections": masked_self["projections"] + masked_cross["projections"],
            "self_attention": 2 * 2 * self_pairs * dim,
            "cross_attention": 2 * 2 * cross_pairs * dim}


@dataclass
class MaskedOverhead:
    """The masked layers' forward FLOPs of one sample against the base forward (the same
    model without them): ``dense`` (``N^2`` attention, the sdpa backend) and ``sparse`` (the
    block-sparse kernel on the representative layout). ``self_pairs_*``: fractions of the
    ``N^2`` masked self-attention pairs, exact (``sum_l n_l^2 / N^2``) and block-granular."""

    family: str
    size: str
    base: int
    dense: int
    sparse: int
    layers: list[dict] = field(default_factory=list)

    @property
    def dense_ratio(self) -> float:
        return self.dense / self.base

    @property
    def sparse_ratio(self) -> float:
        return self.sparse / self.base

    def as_dict(self) -> dict:
        return {"family": self.family, "size": self.size, "base_flops": self.base,
                "masked_dense_flops": self.dense, "masked_sparse_flops": self.sparse,
                "overhead_dense": self.dense_ratio, "overhead_sparse": self.sparse_ratio,
                "layers": self.layers}


def _layer_entry(token_ids: torch.Tensor, local_ids: torch.Tensor, dim: int, context_dim: int
                 ) -> dict:
    flat = token_ids.reshape(-1)
    n = flat.numel()
    dense = masked_layer_flops(flat[None], local_ids, dim, context_dim, sparse=False)
    sparse = masked_layer_flops(flat[None], local_ids, dim, context_dim)
    counts = torch.unique(flat, return_counts=True)[1].double()
    return {"tokens": n, "dim": dim, "dense": sum(dense.values()),
            "sparse": sum(sparse.values()),
            "self_pairs_exact": float(counts.square().sum()) / n**2,
            "self_pairs_blocks": sparse["self_attention"] / dense["self_attention"]}


def masked_layers_overhead(cfg: ModelConfig, local_tokens: int = DEFAULT_LOCAL_TOKENS,
                           text_tokens: int | None = None) -> MaskedOverhead:
    """:class:`MaskedOverhead` of ``cfg``'s family and size at its latent shape (stage 2's
    masked layers, however ``cfg.stage`` is set), on :func:`representative_object_ids`.

    DiT: K identical layers on the token grid after patchify, base from
    :func:`dit_forward_flops`. U-Net: one layer per masked encoder block, at its level's grid
    (ids downsampled as the model does) and width; base counted on the meta device (a few
    seconds at the paper size)."""
    from dataclasses import replace

    from ttm_ray.conditioning.masks import downsample_token_ids
    from ttm_ray.models.registry import resolve_family_config

    cfg = replace(cfg, stage=2)
    family = resolve_family_config(cfg)
    local = representative_local_ids(local_tokens)
    layers: list[dict] = []
    if cfg.family == "dit":
        pt, ph, pw = family.patch
        grid = (cfg.num_frames // pt, cfg.height // ph, cfg.width // pw)
        text = text_tokens or DEFAULT_TEXT_TOKENS["dit"]
        base = dit_forward_flops(family, grid, text, 0).total
        entry = _layer_entry(representative_object_ids(grid), local, family.dim, family.dim)
        layers = [entry] * family.masked_blocks
    else:
        base = measured_forward_flops(cfg, text_tokens=text_tokens, local_tokens=0).total
        ids = representative_object_ids((cfg.num_frames, cfg.height, cfg.width))
        for level in family.encoder_transformer_levels[:family.masked_blocks]:
            f = 2**level
            grid_ids = downsample_token_ids(ids, factor=(1, f, f)) if level else ids
            layers.append(_layer_entry(grid_ids, local, family.block_out_channels[level],
                                       family.text_dim) | {"level": level})
    return MaskedOverhead(cfg.family, cfg.size, base, sum(e["dense"] for e in layers),
                          sum(e["sparse"] for e in layers), layers)
