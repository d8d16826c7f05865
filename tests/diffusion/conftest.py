"""Toy conditioning batches for the diffusion tests (no models: the tests use oracles)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ttm_ray.conditioning.batch import ModelConditioning

#: latent shape of the toy target [C, T, H, W]
LATENT = (2, 3, 4, 4)
TEXT_LEN, TEXT_DIM, LOCAL_LEN = 5, 6, 4


def make_cond(batch: int, seed: int = 0, spatial: tuple[int, int, int] = (3, 4, 4)
              ) -> ModelConditioning:
    g = torch.Generator().manual_seed(seed)
    t, h, w = spatial
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    mask[:, -1] = False  # one pad token, so mask handling is exercised
    return ModelConditioning(
        visual=torch.randn(batch, 3, t, h, w, generator=g) + 2.0,  # never all-zero by chance
        text=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
        text_mask=mask,
        local_text=torch.randn(batch, LOCAL_LEN, TEXT_DIM, generator=g),
        local_text_ids=torch.randint(0, 2, (batch, LOCAL_LEN), generator=g),
        token_ids=torch.randint(-1, 2, (batch, t, h, w), generator=g),
    )


def make_null() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    mask = torch.zeros(TEXT_LEN, dtype=torch.bool)
    mask[:2] = True  # the empty prompt: BOS/EOS, then padding
    return torch.randn(TEXT_LEN, TEXT_DIM, generator=g), mask


class ToyDenoiser(torch.nn.Module):
    """A tiny nonlinear denoiser that reads every condition, so guidance and dropout matter.

    Not a fake of a TTM model: the diffusion code only needs the ``model(x_t, t, cond)`` call,
    and this one makes each output sample depend on its own x_t, t, visual, text (masked) and
    local text, and on nothing from other samples in the batch.
    """

    def __init__(self, channels: int = LATENT[0], visual_channels: int = 3, seed: int = 0
                 ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv3d(channels + visual_channels, channels, 1)
        self.text = torch.nn.Linear(TEXT_DIM, channels)
        self.local = torch.nn.Linear(TEXT_DIM, channels)
        self.time = torch.nn.Linear(1, channels)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: ModelConditioning
                ) -> torch.Tensor:
        h = self.conv(torch.cat([x_t, cond.visual.to(x_t.dtype)], dim=1))
        mask = (cond.text_mask if cond.text_mask is not None
                else torch.ones(cond.text.shape[:2], dtype=torch.bool))
        text = (cond.text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        local = (cond.local_text * (cond.local_text_ids >= 0)[..., None]).sum(1)
        extra = self.text(text) + self.local(local) + self.time(t.float()[:, None] / 1000)
        return torch.tanh(h + extra[:, :, None, None, None])


@pytest.fixture
def cond_factory() -> Callable[..., ModelConditioning]:
    return make_cond


@pytest.fixture
def null_text() -> tuple[torch.Tensor, torch.Tensor]:
    return make_null()


@pytest.fixture
def toy_denoiser() -> ToyDenoiser:
    return ToyDenoiser()
