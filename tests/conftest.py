"""Shared fixtures: a tiny real diffusers UNet (random weights, built here, nothing from a hub)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

CONTEXT_DIM = 32


def build_tiny_unet(seed: int = 0):
    """Three resolution levels with cross-attention in the two upper up-blocks, SD's layout
    in small: up_blocks.0 has none, so ``up_lowest`` must pick up_blocks.1 (and the truncated
    pass skips up_blocks.2)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    return unet.eval()


@pytest.fixture(scope="session")
def tiny_unet():
    return build_tiny_unet()


@pytest.fixture
def context():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, 77, CONTEXT_DIM, generator=generator)
