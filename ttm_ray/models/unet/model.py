"""``TTMUNet``: the AnimateDiff V3-style denoiser of both TTM stages, on diffusers'
``UNetMotionModel`` (SD1.5 ``UNet2DConditionModel`` + ``MotionAdapter``).

Contract (``ttm_ray.conditioning.batch``)::

    model(x_t [B, C, T, H, W], t [B] (DDIM integer timesteps), cond) -> [B, C, T, H, W]

Data flow: ``concat(x_t, cond.visual)`` on channels -> the widened input convolution (the
condition channels' weights start at zero) -> ``UNetMotionModel`` with ``cond.text`` (CLIP,
768 wide for SD1.5) as ``encoder_hidden_states``, repeated per frame as diffusers expects.
Stage 2 adds masked self- and cross-attention to the first K encoder transformer blocks
through attention processors (:mod:`ttm_ray.models.unet.processors`); their inputs travel in a
per-call context, never in state kept on the model.

``cond.text_mask``: ``UNetMotionModel.forward`` has no ``encoder_attention_mask`` (its
``attention_mask`` reaches the *self*-attention), so the processors apply the text mask to
cross-attention themselves when ``UNetConfig.honour_text_mask`` is on (off by default: SD1.5
was trained on unmasked, padded CLIP sequences).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from ttm_ray.conditioning.batch import ModelConditioning
from ttm_ray.models.unet.config import UNetConfig
from ttm_ray.models.unet.pretrained import build_motion_unet, load_motion_unet
from ttm_ray.models.unet.processors import (
    AttentionContext,
    LocalConditioning,
    MaskedBlock,
    TTMAttnProcessor,
)
from ttm_ray.models.widening import EXTRA, widen_input

#: Parameter-name prefixes of the stage-2 additions (for reports and for loading a checkpoint
#: without them; ``models.weights.load_weights`` matches the ``masked_`` in them).
MASKED_PREFIXES = ("masked_layers.",)
#: The zero-initialised input weights of the condition channels (``widening.WidenedConv``).
WIDENING_PARAM = f"unet.conv_in.{EXTRA}"


class TTMUNet(nn.Module):
    """The TTM U-Net (see the module docstring); build with :func:`build_unet`.

    Parameters live in ``unet`` (the diffusers model; its ``conv_in`` widened) and
    ``masked_layers`` (one :class:`MaskedBlock` per masked transformer block, stage 2).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        # On the meta device nothing would be read anyway: build the same shapes from cfg
        # (the loader checks that the pretrained shapes equal cfg's when it does load).
        on_meta = torch.empty(()).device.type == "meta"
        self.unet = (load_motion_unet(cfg) if cfg.pretrained_unet and not on_meta
                     else build_motion_unet(cfg))
        # SD1.5's conv_in keeps its key and shape (``unet.conv_in.weight``); the condition
        # channels are a zero-initialised widening, their own parameter (split layout,
        # ttm_ray.models.widening).
        self.unet.conv_in = widen_input(self.unet.conv_in, cfg.visual_channels, split=True)
        heads = cfg.masked_heads or cfg.attention_heads
        self.masked_layers = nn.ModuleList(
            MaskedBlock(cfg.block_out_channels[level], heads, cfg.text_dim, cfg.masked_qk_norm)
            for level in cfg.encoder_transformer_levels[:cfg.masked_blocks])
        self._spatial_attention: list[nn.Module] = []
        self.install_processors()
        self.set_activation_checkpointing(cfg.activation_checkpointing)

    # ------------------------------------------------------------------ structure
    def _transformer_blocks(self) -> Iterator[tuple[int, BasicTransformerBlock]]:
        """(level, block) of every spatial transformer block: encoder blocks first, in
        forward order (the masked layers take the first K), then mid and decoder."""
        unet = self.unet
        last = len(unet.down_blocks) - 1
        parts = [(level, block) for level, block in enumerate(unet.down_blocks)]
        parts.append((last, unet.mid_block))
        parts += [(last - i, block) for i, block in enumerate(unet.up_blocks)]
        for level, part in parts:
            for transformer in getattr(part, "attentions", None) or []:
                for block in transformer.transformer_blocks:
                    yield level, block

    def install_processors(self) -> None:
        """Put a :class:`TTMAttnProcessor` on every spatial self-/cross-attention (the
        motion modules' temporal attention keeps its own). Idempotent; call it again after
        anything that replaced processors (``set_attn_processor``, ``fuse_qkv_projections``)."""
        self._spatial_attention = []
        for index, (level, block) in enumerate(self._transformer_blocks()):
            masked = index if index < len(self.masked_layers) else None
            for role, attn in (("self", block.attn1), ("cross", block.attn2)):
                if attn is None:
                    continue
                base = attn.processor
                if isinstance(base, TTMAttnProcessor):
                    base = base.base
                attn.set_processor(TTMAttnProcessor(base, role=role, level=level,
                                                    masked_index=masked))
                self._spatial_attention.append(attn)

    @property
    def has_masked_layers(self) -> bool:
        return len(self.masked_layers) > 0

    @property
    def max_frames(self) -> int:
        """Frames the motion modules' positional table covers (the loaded adapter's)."""
        return int(self.unet.config.motion_max_seq_length)

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent ``(T, H, W)`` -> the grid ``cond.token_ids`` uses: the latent grid itself
        (coarser levels are derived inside the model)."""
        return frames, height, width

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every resnet / transformer block in backward (diffusers' own)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def component_of(self, name: str) -> str:
        """The report component of a parameter name (see ``count_parameters``)."""
        if name.startswith(MASKED_PREFIXES):
            return "masked_layers"
        if name == WIDENING_PARAM:
            return "conv_in_widening"
        if ".motion_modules." in name:
            return "motion_modules"
        return "unet_spatial"

    # ------------------------------------------------------------------ forward
    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                cond: ModelConditioning) -> torch.Tensor:
        cfg = self.config
        if x_t.shape[1] != cfg.in_channels or cond.visual.shape[1] != cfg.visual_channels:
            raise ValueError(
                f"expected x_t with {cfg.in_channels} and cond.visual with "
                f"{cfg.visual_channels} channels, got {x_t.shape[1]} and {cond.visual.shape[1]}")
        if cond.visual.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"cond.visual {tuple(cond.visual.shape)} and x_t "
                             f"{tuple(x_t.shape)} differ in [T, H, W]")
        batch, _, frames, height, width = x_t.shape
        if frames > self.max_frames:
            raise ValueError(f"{frames} frames exceed the motion modules' {self.max_frames} "
                             "positions (motion_max_seq_length)")
        factor = cfg.downsample_factor
        if height % factor or width % factor:
            raise ValueError(f"latent H, W = {height}, {width} must be divisible by {factor} "
                             f"(the U-Net halves them {cfg.levels - 1} times)")
        stale = [a for a in self._spatial_attention
                 if not isinstance(a.processor, TTMAttnProcessor)]
        if stale:
            raise RuntimeError(f"{len(stale)} spatial attention processors were replaced; "
                               "call install_processors() after changing them")

        ctx = AttentionContext(
            num_frames=frames,
            text_mask=cond.text_mask if cfg.honour_text_mask else None,
            local=self._local(cond, (batch, frames, height, width), x_t.device))
        sample = torch.cat([x_t, cond.visual.to(x_t.dtype)], dim=1)
        text = cond.text.to(x_t.dtype).repeat_interleave(frames, dim=0)
        if t.ndim == 0:
            t = t.expand(batch)
        return self.unet(sample, t, encoder_hidden_states=text,
                         cross_attention_kwargs={"ttm_context": ctx}, return_dict=False)[0]

    def _local(self, cond: ModelConditioning, shape: tuple[int, int, int, int],
               device: torch.device) -> LocalConditioning | None:
        # Without local prompts / token ids (a stage-2 model on a batch that has none, or the
        # text-dropped guidance pass) the masked layers are skipped: the base model's
        # behaviour, the same as their zero-init start.
        if not self.has_masked_layers or not cond.has_local:
            return None
        assert cond.token_ids is not None and cond.local_text is not None
        if tuple(cond.token_ids.shape) != shape:
            raise ValueError(f"cond.token_ids is {tuple(cond.token_ids.shape)}; expected "
                             f"{list(shape)} = [B, T, H, W] on the latent grid (build it with "
                             "conditioning.masks.token_object_ids)")
        if cond.local_text_ids is None:
            raise ValueError("cond.local_text is set but cond.local_text_ids is not")
        # One LocalConditioning per call: it builds each level's ObjectLayout (id sort, block
        # masks) once, for all masked blocks of that level and for recomputation in backward.
        return LocalConditioning(self.masked_layers, cond.token_ids.to(device), cond.local_text,
                                 cond.local_text_ids.to(device))


def build_unet(cfg: UNetConfig) -> TTMUNet:
    """Build the U-Net of ``cfg``: random weights, or ``pretrained_unet`` (+
    ``motion_adapter``) loaded from local folders, then widened and given the masked layers.
    Under ``torch.device("meta")`` nothing is loaded or allocated (parameter counts)."""
    return TTMUNet(cfg)
