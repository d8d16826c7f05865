"""``UNetConfig``: the AnimateDiff-style U-Net's shape, where its weights come from, and the
named sizes.

Sizes are entries of :data:`UNET_SIZES` (``unet-1.4b`` for the paper, ``unet-tiny`` for tests
and CPU smoke runs); a run picks one by name and overrides single fields through
``ModelConfig.overrides`` (e.g. ``{pretrained_unet: /models/sd15, motion_adapter: /models/mm}``).

Parameter budget of ``unet-1.4b`` (counted on the meta device by ``tests/models/test_unet.py``;
``count_parameters`` reports these components), with 4 latent channels (the SD1.5 VAE):

======================  =============  =================================================
component               parameters     what
======================  =============  =================================================
``unet_spatial``          859,520,964  the SD1.5 ``UNet2DConditionModel`` (text 768-wide)
``motion_modules``        417,137,600  AnimateDiff V3 motion modules (no mid-block one)
``conv_in_widening``           25,920  zero-initialised input weights, 2C+1 = 9 channels
``masked_layers``          32,688,320  stage 2: a masked self- (4 D^2) and cross-attention
                                       (2 D^2 + 2 * 768 D) in each of the 6 encoder
                                       transformer blocks, D = 320, 320, 640, 640, 1280,
                                       1280 (no biases; RMSNorm q/k)
total, stage 1          1,276,684,484
total, stage 2          1,309,372,804  the paper's "~1.4B": 6.5% under, inside +/- 7%
======================  =============  =================================================

``unet-tiny`` (16/32/32 channels, one layer per level): 545,380 parameters in stage 2; a
16-frame 8x8-latent training step takes well under a second on one CPU thread.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ttm_ray.config import constrained


@dataclass
class UNetConfig:
    """Shape of :class:`~ttm_ray.models.unet.model.TTMUNet` (torchtitan style: config + build).

    The spatial part follows ``diffusers.UNet2DConditionModel`` (SD1.5 by default), the motion
    part ``diffusers.MotionAdapter``; ``UNetMotionModel`` joins them. Channel counts are latent
    channels: ``in_channels`` is ``x_t``, ``visual_channels`` the condition latents
    concatenated to it (``cond.visual``), which widen the input convolution.
    """

    block_out_channels: tuple[int, ...] = constrained(
        (320, 640, 1280, 1280), nonempty=True, help="channels of each resolution level"
    )
    attention_levels: tuple[bool, ...] = constrained(
        (True, True, True, False), nonempty=True,
        help="per level: has spatial transformer blocks (self- and text cross-attention); "
             "SD1.5: all but the deepest",
    )
    layers_per_block: int = constrained(2, gt=0, help="resnets (and transformers) per level")
    attention_heads: int = constrained(
        8, gt=0, help="heads of the spatial attention (SD1.5's 'attention_head_dim: 8')"
    )
    norm_num_groups: int = constrained(32, gt=0, help="GroupNorm groups (resnets, motion)")
    text_dim: int = constrained(768, gt=0, help="text embedding width (CLIP ViT-L: 768)")
    motion_heads: int = constrained(8, gt=0, help="heads of the temporal attention")
    motion_max_seq_length: int = constrained(
        32, gt=0, help="frames the motion modules' positional table covers (V3: 32)"
    )
    use_motion_mid_block: bool = constrained(
        False, help="a motion module in the mid block (AnimateDiff V2: yes, V3: no)"
    )
    in_channels: int = constrained(4, gt=0, help="latent channels of x_t (SD1.5 VAE: 4)")
    visual_channels: int = constrained(
        9, ge=0, help="channels of cond.visual concatenated to x_t (layout.visual_channels)"
    )
    out_channels: int | None = constrained(None, gt=0, help="null: in_channels")
    num_frames: int = constrained(16, gt=0, help="latent frames of x_t (the U-Net's T)")
    masked_blocks: int = constrained(
        6, ge=0,
        help="K: the first K encoder transformer blocks get masked self/cross layers (stage 2)",
    )
    masked_heads: int | None = constrained(
        None, gt=0, help="heads of the masked layers; null: attention_heads"
    )
    masked_qk_norm: bool = constrained(True, help="RMSNorm on the masked layers' q and k")
    honour_text_mask: bool = constrained(
        False,
        help="mask padded text tokens in cross-attention (cond.text_mask). Off by default: "
             "SD1.5 and AnimateDiff were trained attending to all 77 CLIP positions, padding "
             "included, so masking shifts a pretrained U-Net off its training distribution",
    )
    activation_checkpointing: bool = constrained(
        False, help="diffusers gradient checkpointing of every resnet / transformer block"
    )
    pretrained_unet: str | None = constrained(
        None,
        help="local diffusers UNet2DConditionModel folder (or a pipeline folder with unet/); "
             "null: random weights",
    )
    motion_adapter: str | None = constrained(
        None, help="local diffusers MotionAdapter folder; null: random motion modules"
    )

    @property
    def output_channels(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """How much the deepest level is smaller than the latent (H and W)."""
        return 2 ** (self.levels - 1)

    @property
    def encoder_transformer_levels(self) -> list[int]:
        """The level of every encoder transformer block, in forward order (the masked layers go
        into the first ``masked_blocks`` of them)."""
        return [level for level, has in enumerate(self.attention_levels) if has
                for _ in range(self.layers_per_block)]

    def validate(self) -> None:
        if len(self.attention_levels) != self.levels:
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries for "
                             f"{self.levels} block_out_channels")
        for ch in self.block_out_channels:
            for name in ("norm_num_groups", "attention_heads", "motion_heads"):
                if ch % getattr(self, name):
                    raise ValueError(f"block_out_channels {ch} is not divisible by {name} "
                                     f"{getattr(self, name)}")
            if self.masked_heads and ch % self.masked_heads:
                raise ValueError(f"block_out_channels {ch} is not divisible by masked_heads "
                                 f"{self.masked_heads}")
        available = len(self.encoder_transformer_levels)
        if self.masked_blocks > available:
            raise ValueError(f"masked_blocks {self.masked_blocks} exceeds the {available} "
                             "encoder transformer blocks")
        if self.num_frames > self.motion_max_seq_length:
            raise ValueError(f"num_frames {self.num_frames} exceeds motion_max_seq_length "
                             f"{self.motion_max_seq_length} (the motion modules' positions)")
        if self.motion_adapter and not self.pretrained_unet:
            raise ValueError("motion_adapter is set but pretrained_unet is not: the motion "
                             "modules are trained against a spatial U-Net; give both paths")


#: The named sizes. ``unet-1.4b``: SD1.5 + AnimateDiff V3 (see the module docstring for the
#: count); ``unet-tiny``: a few hundred thousand parameters, for tests and CPU smoke runs.
UNET_SIZES: dict[str, UNetConfig] = {
    "unet-1.4b": UNetConfig(),
    "unet-tiny": UNetConfig(
        block_out_channels=(16, 32, 32), attention_levels=(True, True, False),
        layers_per_block=1, attention_heads=2, norm_num_groups=4, text_dim=32,
        motion_heads=2, motion_max_seq_length=32, masked_blocks=2,
    ),
}

#: Field names a run may override per size (``ModelConfig.overrides``).
UNET_FIELDS: frozenset[str] = frozenset(f.name for f in fields(UNetConfig))
