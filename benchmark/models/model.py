"""The benchmark's tiny text-to-image model: SD's UNet layout on a pixel-unshuffled 12x16x16 "latent".

Image 3x32x32 in [-1, 1] -> pixel_unshuffle(2) -> 12x16x16; decoding is the exact inverse, so there is
no VAE to train. The UNet has cross-attention at 16x16 and 8x8 in both paths and in the middle block;
the lowest-resolution up-block (``up_blocks.0``, 8x8) has cross-attention, which is where the engine
anchors ("the lowest-resolution up-block with cross-attention").

Text side (the design that makes ELA testable): a causal transformers CLIPTextModel with the real CLIP
tokenizer, 77 columns, BOS at column 0, exactly SD's token mapping. Earlier trials showed that with a
plain causal encoder the EOS/padding columns (which see the whole caption) carry everything, the UNet
reads the caption from them, and the entity words' attention maps do not localise. ``EntityTextEncoder``
therefore replaces every column from the first EOS on with one learned caption-independent vector
(``blank_eos``), so the only way the UNet can learn what to draw where is through the word columns.
The encoder is one causal layer, frozen at its random initialisation (distinct, near-orthogonal word
embeddings; a noun's column still sees its adjective, as in SD). Blank EOS columns alone did not make
the maps localise (own/other 1.00, frozen or trained at 0.1x lr); training adds a grounding loss on
the anchor layers for that (see ``train.grounding_loss``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from .clip_tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, load_tokenizer

LATENT_CHANNELS, LATENT_SIZE = 12, 16
# SD's schedule (scaled_linear, 0.00085..0.012) by default, so that sampling's time course is SD's:
# the layout is decided in the first steps, where ELA acts. DDPM's pixel-space "linear" schedule
# keeps so little signal mid-way (alpha_bar(600) = 0.03 against SD's 0.18) that the layout forms late.
# clip_sample (x0 estimate clipped to [-1, 1] while sampling; training ignores it) keeps the first,
# nearly pure-noise DDIM steps from derailing: without it the linear schedule's samples ended as noise.
SCHEDULES = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}


def scheduler_config(beta_schedule: str = "scaled_linear") -> dict:
    start, end = SCHEDULES[beta_schedule]
    return {"num_train_timesteps": 1000, "beta_schedule": beta_schedule, "beta_start": start,
            "beta_end": end, "prediction_type": "epsilon", "clip_sample": True}


@dataclass
class ModelConfig:
    """Architecture; saved beside exported weights so ``load_model`` can rebuild it."""
    text_hidden: int = 64
    text_layers: int = 1
    text_heads: int = 4
    blank_eos: bool = True
    block_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    unet_heads: int = 8
    # SD's layout keeps cross-attention off its lowest-resolution level (SD 1.x: 64, 32, 16 with
    # attention, 8 without); None: every level has it (the bundled model's two levels).
    attention_levels: int | None = None
    latent_channels: int = LATENT_CHANNELS

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "block_channels" in d:
            d["block_channels"] = tuple(d["block_channels"])
        return cls(**d)


class EntityTextEncoder(nn.Module):
    """CLIPTextModel whose columns from the first EOS on are one learned, caption-independent vector.

    Called like a CLIPTextModel: ``encoder(input_ids)[0]`` is the (B, 77, hidden) context."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.blank_eos = config.blank_eos
        self.clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=config.text_hidden, intermediate_size=4 * config.text_hidden,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", bos_token_id=BOS_ID,
            eos_token_id=EOS_ID, pad_token_id=EOS_ID, projection_dim=config.text_hidden))
        self.eos_column = nn.Parameter(torch.zeros(config.text_hidden))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        hidden = self.clip(input_ids=input_ids).last_hidden_state
        if self.blank_eos:
            after_eos = (input_ids == EOS_ID).int().cumsum(dim=1) > 0
            hidden = torch.where(after_eos[..., None], self.eos_column.to(hidden.dtype), hidden)
        return (hidden,)


def build_unet(config: ModelConfig) -> UNet2DConditionModel:
    n = len(config.block_channels)
    with_attention = n if config.attention_levels is None else config.attention_levels
    down = ("CrossAttnDownBlock2D",) * with_attention + ("DownBlock2D",) * (n - with_attention)
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=config.latent_channels, out_channels=config.latent_channels,
        block_out_channels=config.block_channels, layers_per_block=config.layers_per_block,
        down_block_types=down, up_block_types=up,
        cross_attention_dim=config.text_hidden, attention_head_dim=config.unet_heads,
        norm_num_groups=16)


def build_model(config: ModelConfig, seed: int = 0) -> tuple[UNet2DConditionModel, EntityTextEncoder]:
    torch.manual_seed(seed)
    return build_unet(config), EntityTextEncoder(config)


def encode_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 12, H/2, W/2) in [-1, 1]: the model's latent."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.pixel_unshuffle(x, 2)


def decode(latents: torch.Tensor) -> np.ndarray:
    """(B, 12, h, w) latent -> uint8 (B, 2h, 2w, 3) images; exact inverse of ``encode_images``."""
    x = F.pixel_shuffle(latents.detach().float().cpu(), 2)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def load_model(weights_path: Path | str):
    """(unet, text_encoder, tokenizer, scheduler_config) from an exported ``.safetensors`` file and the
    ``.json`` beside it; modules in float32, eval mode, no gradients."""
    weights_path = Path(weights_path)
    meta = json.loads(weights_path.with_suffix(".json").read_text())
    unet, text_encoder = build_model(ModelConfig.from_dict(meta["model_config"]))
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return unet, text_encoder, load_tokenizer(), dict(meta["scheduler_config"])


def initial_noise(seeds: Sequence[int]) -> torch.Tensor:
    """One latent per seed, independent of batching: the pairing of off and on rests on it."""
    return torch.stack([torch.randn(LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE,
                                    generator=torch.Generator().manual_seed(seed)) for seed in seeds])
