"""``DiTConfig``: the MovieGen-style transformer's shape, and the named sizes.

Sizes are entries of :data:`DIT_SIZES` (``dit-4b`` for the paper, ``dit-tiny`` for tests and
smoke runs), never if-chains; a run picks one by name and may override single fields through
``ModelConfig.overrides``.

Parameter budget of ``dit-4b`` (counted on the meta device by ``tests/models/test_dit.py``,
which also checks the two totals below; ``count_parameters`` gives the breakdown). With
``D = dim``, ``F = ffn_hidden`` and ``d = head_dim``, one block holds full self-attention
``4 D^2 + 2d`` (fused qkv, out, q/k RMSNorm), cross-attention to the already projected text
``4 D^2 + 2d + D`` (with its RMSNorm), SwiGLU ``3 D F`` and its adaLN-single table ``6 D``;
the rest (patchify, factorized positions, timestep MLP with the shared ``D -> 6D`` modulation,
text projection, final layer) is ~64M. At that width the Llama 8/3 SwiGLU ratio (hidden
6912) would give 4.29B, outside the 4.0B +/- 5% band (and a 3072 width ~6B), so ``dit-4b`` is
2560 wide (20 heads x 128) with SwiGLU hidden 6144 (2.4 D, a multiple of 256):

* stage 1 (the base MovieGen-style model, i.e. the text-to-video initialisation):
  **4,049,717,824** parameters;
* stage 2 adds, in each of the first K = 10 blocks, a masked self- and a masked
  cross-attention (each ``4 D^2 + 2d``) with their RMSNorms (``2 D``): 52,434,432 per block,
  **4,574,062,144** in total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from ttm_ray.config import constrained


@dataclass
class DiTConfig:
    """Shape of :class:`~ttm_ray.models.dit.model.TTMDiT` (torchtitan style: config + build).

    Channel counts are in latent units: ``in_channels`` is the noisy target latent ``x_t``,
    ``visual_channels`` the condition latents concatenated to it before patchify
    (``cond.visual``), ``out_channels`` the prediction (defaults to ``in_channels``).
    ``max_*_tokens`` size the factorized positional tables; they are token counts, i.e. the
    latent grid divided by ``patch``.
    """

    dim: int = constrained(2560, gt=0, help="transformer width D")
    depth: int = constrained(40, gt=0, help="number of blocks")
    heads: int = constrained(20, gt=0, help="attention heads; dim must divide evenly")
    ffn_hidden: int | None = constrained(
        None, gt=0, help="SwiGLU hidden width; null: ffn_multiplier * dim, rounded up to 256"
    )
    ffn_multiplier: float = constrained(8 / 3, gt=0, help="used when ffn_hidden is null")
    patch: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = constrained(16, gt=0, help="latent channels of x_t")
    visual_channels: int = constrained(
        33, ge=0, help="channels of cond.visual concatenated to x_t (layout.visual_channels)"
    )
    out_channels: int | None = constrained(None, gt=0, help="null: in_channels")
    text_dim: int = constrained(4096, gt=0, help="width of the text encoder's embeddings")
    max_t_tokens: int = constrained(16, gt=0, help="temporal positions (latent T / patch_t)")
    max_h_tokens: int = constrained(16, gt=0, help="rows (latent H / patch_h)")
    max_w_tokens: int = constrained(16, gt=0, help="columns (latent W / patch_w)")
    masked_blocks: int = constrained(
        10, ge=0, help="K: the first K blocks get the added masked self/cross layers (stage 2)"
    )
    qk_norm: bool = constrained(True, help="RMSNorm on queries and keys (MovieGen)")
    masked_attention_backend: Literal["auto", "sdpa", "flex", "grouped"] = constrained(
        "auto", help="kernel of the masked layers (conditioning.masked_attention): auto = "
                     "flex on CUDA, sdpa elsewhere"
    )
    adaln: Literal["single", "per_block"] = constrained(
        "single",
        help="single: one shared t -> 6D projection plus a learnable per-block offset "
             "(PixArt adaLN-single); per_block: a 6D^2 projection in every block (DiT), which "
             "costs ~1.6B parameters at dit-4b width",
    )
    norm_eps: float = constrained(1e-6, gt=0)
    time_freq_dim: int = constrained(256, gt=0, help="sinusoidal timestep features")
    time_scale: float = constrained(
        1000.0, gt=0, help="t in [0,1] is multiplied by this before the sinusoids"
    )
    activation_checkpointing: bool = constrained(
        False, help="recompute every block in backward (trades ~1/3 more compute for memory)"
    )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden(self) -> int:
        """The SwiGLU hidden width actually built."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 256 * math.ceil(self.ffn_multiplier * self.dim / 256)

    @property
    def output_channels(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def patch_volume(self) -> int:
        return self.patch[0] * self.patch[1] * self.patch[2]

    def validate(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even")
        if len(self.patch) != 3 or any(int(p) < 1 for p in self.patch):
            raise ValueError(f"patch must be three positive ints (t, h, w), got {self.patch}")
        if self.masked_blocks > self.depth:
            raise ValueError(f"masked_blocks {self.masked_blocks} exceeds depth {self.depth}")


#: The named sizes. ``dit-4b``: the paper's DiT (see the module docstring for the count);
#: ``dit-tiny``: ~1.1M parameters (1.4M in stage 2), for tests and CPU smoke runs.
DIT_SIZES: dict[str, DiTConfig] = {
    "dit-4b": DiTConfig(
        dim=2560, depth=40, heads=20, ffn_hidden=6144, text_dim=4096,
        max_t_tokens=16, max_h_tokens=16, max_w_tokens=16, masked_blocks=10,
    ),
    "dit-tiny": DiTConfig(
        dim=128, depth=4, heads=4, ffn_hidden=256, text_dim=32,
        max_t_tokens=16, max_h_tokens=16, max_w_tokens=16, masked_blocks=2,
    ),
}

#: Field names a run may override per size (``ModelConfig.overrides``).
DIT_FIELDS: frozenset[str] = frozenset(f.name for f in fields(DiTConfig))
