"""``TTMDiT``: the MovieGen-style denoiser of both TTM stages.

Contract (``ttm_ray.conditioning.batch``)::

    model(x_t [B, C, T, H, W], t [B] in [0, 1], cond: ModelConditioning) -> [B, C, T, H, W]

Data flow: ``concat(x_t, cond.visual)`` on channels -> Conv3d patchify (kernel = stride =
``patch``; its condition channels widen the text-to-video patchify, see
:mod:`ttm_ray.models.widening`, so a text-to-video checkpoint loads into it) -> tokens
``[B, N, D]`` in (t, h, w) raster order -> blocks (each adds the factorized positional
embedding first) -> final adaLN + linear -> unpatchify.
The text (``cond.text``; stage 2 also ``cond.local_text``) goes through one shared projection
to the model width, so global and local prompts live in the same space.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.conditioning.masked_attention import ObjectLayout
from ttm_ray.models.dit.blocks import DiTBlock, FinalLayer, TimestepEmbedding
from ttm_ray.models.dit.config import DiTConfig
from ttm_ray.models.widening import init_input_weight_, widen_input

#: Parameter-name fragments that mark the stage-2 additions (for reports and for loading a
#: checkpoint without them).
MASKED_PREFIXES = ("masked_self_", "masked_cross_")


class TTMDiT(nn.Module):
    """The TTM DiT (see the module docstring); build with :func:`build_dit`."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.dim
        # The text-to-video patchify over x_t's channels, widened by the condition channels
        # (visual_channels = 0 is the text-to-video model): its checkpoint loads with the
        # condition weights at zero. One joint weight, the layout DiT checkpoints have.
        self.patchify = widen_input(
            nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch, stride=cfg.patch),
            cfg.visual_channels, split=False)
        # Factorized learnable positions: T + H + W rows instead of T * H * W, so a model
        # trained at one grid can run on any smaller one by slicing.
        self.pos_t = nn.Parameter(torch.randn(cfg.max_t_tokens, d) * 0.02)
        self.pos_h = nn.Parameter(torch.randn(cfg.max_h_tokens, d) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(cfg.max_w_tokens, d) * 0.02)
        self.time_embed = TimestepEmbedding(d, cfg.time_freq_dim, cfg.time_scale)
        single = cfg.adaln == "single"
        self.time_modulation = (nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
                                if single else None)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                       nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg, masked=i < cfg.masked_blocks)
                                    for i in range(cfg.depth))
        self.final = FinalLayer(d, cfg.patch_volume * cfg.output_channels, cfg.norm_eps, single)
        self._init_weights()

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        """Xavier linears; adaLN gates and the output layer at zero (adaLN-Zero: the gated
        self-attention and FFN branches start closed and the model predicts 0). The masked
        layers keep ``MaskedAttention``'s own init (output projection zero), so the first
        pass skips them.

        Every pass goes through ``Module.apply`` and touches only the visited module's own
        parameters: under DeepSpeed's ``zero.Init`` (ZeRO-3 built partitioned) children are
        already partitioned here, and ``apply`` is what it gathers module by module. The
        passes keep the order of the random draws (all linears, then the input layer, then
        the timestep MLP), so a seed gives the same weights as before.
        """
        masked = {m for name, m in self.named_modules() if _is_masked(name)}

        def xavier_linear(m: nn.Module) -> None:
            if isinstance(m, nn.Linear) and m not in masked:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        def input_layer(m: nn.Module) -> None:
            # From scratch there is no text-to-video model to preserve: Xavier over all input
            # channels at once, as for one Conv3d (loading a text-to-video checkpoint zeroes
            # the condition channels; see ttm_ray.models.widening).
            if m is self.patchify:
                init_input_weight_(m, lambda w: nn.init.xavier_uniform_(w.view(w.shape[0], -1)))
                nn.init.zeros_(m.bias)

        time_mlp = {self.time_embed.mlp[0], self.time_embed.mlp[2]}
        zero = {self.final.linear}
        if self.time_modulation is not None:
            zero.add(self.time_modulation[1])
        if self.final.modulation is not None:
            zero.add(self.final.modulation[1])
        zero.update(b.modulation[1] for b in self.blocks if b.modulation is not None)
        blocks = set(self.blocks)
        single = self.time_modulation is not None

        def time_and_zeros(m: nn.Module) -> None:
            if m in time_mlp:
                nn.init.normal_(m.weight, std=0.02)
            if m in zero:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
            if single and m in blocks:
                # adaLN-single: the tables stay random (they break symmetry between blocks),
                # but the gate rows start at zero so every block is the identity at init.
                with torch.no_grad():
                    m.modulation_table[2].zero_()
                    m.modulation_table[5].zero_()

        self.apply(xavier_linear)
        self.apply(input_layer)
        self.apply(time_and_zeros)

    # ------------------------------------------------------------------ helpers
    @property
    def has_masked_layers(self) -> bool:
        return self.config.masked_blocks > 0

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent ``(T, H, W)`` -> token grid ``(t', h', w')`` (what ``cond.token_ids`` uses)."""
        pt, ph, pw = self.config.patch
        return frames // pt, height // ph, width // pw

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        cfg = self.config
        if t > cfg.max_t_tokens or h > cfg.max_h_tokens or w > cfg.max_w_tokens:
            raise ValueError(f"token grid {grid} exceeds the positional tables "
                             f"({cfg.max_t_tokens}, {cfg.max_h_tokens}, {cfg.max_w_tokens})")
        pos = (self.pos_t[:t, None, None] + self.pos_h[None, :h, None]
               + self.pos_w[None, None, :w])
        return pos.reshape(t * h * w, -1)

    def set_activation_checkpointing(self, enabled: bool | Iterable[int]) -> None:
        """Recompute blocks in backward: ``True`` all, ``False`` none, or block indices."""
        chosen = (set(range(len(self.blocks))) if enabled is True else
                  set() if enabled is False else {int(i) for i in enabled})
        for i, block in enumerate(self.blocks):
            block.checkpointing = i in chosen

    def component_of(self, name: str) -> str:
        """The report component of a parameter name (see ``count_parameters``): the stage-2
        additions as one ``masked_layers`` entry (what a stage-1 checkpoint lacks), the blocks
        split by sub-layer (``blocks.self_attn``, ``blocks.cross_attn`` with its norm,
        ``blocks.ffn``, ``blocks.adaln``), and the model-level modules by name."""
        if _is_masked(name):
            return "masked_layers"
        head, _, rest = name.partition(".")
        if head == "blocks":
            sub = rest.split(".")[1]  # "<index>.<sub-layer>...."
            return "blocks." + _BLOCK_COMPONENTS.get(sub, sub)
        if head.startswith("pos_"):
            return "pos_embed"
        if head in ("time_embed", "time_modulation"):
            return "time_embed"
        return head

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b = x.shape[0]
        t, h, w = grid
        pt, ph, pw = self.config.patch
        c = self.config.output_channels
        x = x.view(b, t, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, t * pt, h * ph, w * pw)

    # ------------------------------------------------------------------ forward
    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                cond: ModelConditioning) -> torch.Tensor:
        """``x_t [B, C, T, H, W]``, ``t [B]`` (or a scalar) -> prediction like ``x_t``.

        ``cond.token_ids`` (on the token grid) drives the masked self-attention and, with
        ``cond.local_text`` / ``local_text_ids``, the masked cross-attention of the first K
        blocks. A model without masked layers (stage 1) ignores them; a stage-2 model given
        none skips its masked layers, which is exactly the base model's behaviour.
        """
        grid = self._check_inputs(x_t, t, cond)
        x = self.patchify(torch.cat([x_t, cond.visual.to(x_t.dtype)], dim=1))
        x = x.flatten(2).transpose(1, 2)  # [B, N, D], (t, h, w) raster order
        pos = self.position_embedding(grid).to(x.dtype)

        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_embed(t)
        shared_mod = self.time_modulation(temb) if self.time_modulation is not None else None
        text = self.text_proj(cond.text.to(x.dtype))
        token_ids = local_text = local_ids = layout = None
        if self.has_masked_layers and cond.token_ids is not None:
            # Same raster order as x.
            token_ids = cond.token_ids.flatten(1).to(x.device, torch.long)
            if cond.local_text is not None:
                # Same projection as the global prompt: one text space for both.
                local_text = self.text_proj(cond.local_text.to(x.dtype))
                local_ids = cond.local_text_ids.to(x.device, torch.long)
            # One mask plan for the whole forward: the id sort and the block masks are built
            # once (lazily) and shared by all K blocks' masked layers and by recomputation.
            layout = ObjectLayout(token_ids, local_ids)

        text_mask = cond.text_mask.bool() if cond.text_mask is not None else None
        args = (pos, temb, shared_mod, text, text_mask, token_ids, local_text, local_ids,
                layout)
        for block in self.blocks:
            if block.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return self.unpatchify(self.final(x, temb), grid)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, cond: ModelConditioning
                      ) -> tuple[int, int, int]:
        """Shape errors named in terms of the contract, before any compute; returns the
        token grid."""
        cfg = self.config
        if x_t.ndim != 5:
            raise ValueError(f"x_t must be [B, C, T, H, W], got {tuple(x_t.shape)}")
        b, channels, frames, height, width = x_t.shape
        if channels != cfg.in_channels:
            raise ValueError(f"x_t has {channels} channels; this model takes "
                             f"{cfg.in_channels} (latent_channels)")
        if cond.visual.ndim != 5 or cond.visual.shape[1] != cfg.visual_channels:
            raise ValueError(f"cond.visual is {tuple(cond.visual.shape)}; this model takes "
                             f"[B, {cfg.visual_channels}, T, H, W] (layout.visual_channels of "
                             "its stage)")
        if cond.visual.shape[0] != b or cond.visual.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"cond.visual {tuple(cond.visual.shape)} does not match x_t "
                             f"{tuple(x_t.shape)} in batch or [T, H, W]")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
            raise ValueError(f"t must be [B={b}] or a scalar, got {tuple(t.shape)}")
        if cond.text.ndim != 3 or cond.text.shape[0] != b or cond.text.shape[2] != cfg.text_dim:
            raise ValueError(f"cond.text is {tuple(cond.text.shape)}; expected "
                             f"[{b}, L, {cfg.text_dim}] (text_dim)")
        pt, ph, pw = cfg.patch
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent [T, H, W] = {[frames, height, width]} is not divisible "
                             f"by patch {cfg.patch}")
        grid = self.token_grid(frames, height, width)
        if cond.token_ids is not None and tuple(cond.token_ids.shape) != (b, *grid):
            raise ValueError(f"cond.token_ids is {tuple(cond.token_ids.shape)}; expected "
                             f"[{b}, {grid[0]}, {grid[1]}, {grid[2]}], the token grid after "
                             f"patch {cfg.patch} (build it with "
                             "conditioning.masks.token_object_ids)")
        if cond.local_text is not None:
            if cond.local_text_ids is None:
                raise ValueError("cond.local_text is given without cond.local_text_ids")
            m = cond.local_text.shape[1]
            if cond.local_text.shape != (b, m, cfg.text_dim) or \
                    tuple(cond.local_text_ids.shape) != (b, m):
                raise ValueError(f"cond.local_text {tuple(cond.local_text.shape)} / "
                                 f"local_text_ids {tuple(cond.local_text_ids.shape)}; expected "
                                 f"[{b}, M, {cfg.text_dim}] / [{b}, M]")
        return grid


#: Block sub-modules -> report component (``TTMDiT.component_of``).
_BLOCK_COMPONENTS = {"attn": "self_attn", "cross_attn": "cross_attn",
                     "norm_cross": "cross_attn", "ffn": "ffn", "modulation_table": "adaln",
                     "modulation": "adaln"}


def _is_masked(name: str) -> bool:
    return any(p in name for p in MASKED_PREFIXES)


def build_dit(cfg: DiTConfig) -> TTMDiT:
    """Build the DiT of ``cfg`` (on the current default device; use ``torch.device("meta")``
    as a context manager to count a big one without allocating it)."""
    return TTMDiT(cfg)
