"""A tiny real diffusers UNet with SD's block layout, random weights, built here (no hub).

Three resolution levels; cross-attention in the two upper up-blocks and the middle, none in
``up_blocks.0``, so "the lowest-resolution up-block WITH cross-attention" is ``up_blocks.1`` and a
truncated grad pass skips ``up_blocks.2``, as it skips SD's higher-resolution up-blocks.
Used by the engine tests and the engine speed benchmark.
"""

import torch

CONTEXT_DIM = 32


def build_tiny_unet(seed: int = 0, width: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    return unet.eval()
