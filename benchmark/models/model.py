"""The benchmark's tiny text-to-image models: SD's UNet layout (and an SD3-style MM-DiT,
``benchmark.models.mmdit``, named by the weights' JSON ``"backbone"``), loaded as one ``BenchmarkModel``.

Every command takes any benchmark model through ``load_model``, which reads the weights' JSON for the
model's latent (``LATENT_KINDS``). The bundled model's latent is the image itself, pixel-unshuffled:
image 3x32x32 in [-1, 1] -> pixel_unshuffle(2) -> 12x16x16; decoding is the exact inverse, so there is
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
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ela_ext.capture import AttentionCapture, find_cross_attention_layers, run_truncated
from ela_ext.config import ElaConfig
from ela_ext.diffusers_adapter import SampleResult, sample, sample_flow
from ela_ext.diffusers_mmdit import feeding, joint_capture

from .autoencoder import AutoencoderLatent
from .clip_tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, load_tokenizer
from .mmdit import MMDiTConfig, build_transformer, velocity

PIXEL_UNSHUFFLE_SHAPE = (12, 16, 16)  # the bundled design's latent of a 32x32 image
# SD's schedule (scaled_linear, 0.00085..0.012) by default, so that sampling's time course is SD's:
# the layout is decided in the first steps, where ELA acts. DDPM's pixel-space "linear" schedule
# keeps so little signal mid-way (alpha_bar(600) = 0.03 against SD's 0.18) that the layout forms late.
# clip_sample (x0 estimate clipped to [-1, 1] while sampling; training ignores it) keeps the first,
# nearly pure-noise DDIM steps from derailing: without it the linear schedule's samples ended as noise.
# It is for image-valued latents only: a learned latent has unit variance and no [-1, 1] range, and SD
# samples its latents unclipped.
SCHEDULES = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}


def scheduler_config(beta_schedule: str = "scaled_linear", clip_sample: bool = True) -> dict:
    start, end = SCHEDULES[beta_schedule]
    return {"num_train_timesteps": 1000, "beta_schedule": beta_schedule, "beta_start": start,
            "beta_end": end, "prediction_type": "epsilon", "clip_sample": clip_sample}


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
    # False: the middle block without cross-attention, text only at the levels' blocks. Tried because
    # without a loss the maps localise only in the middle block; then no layer localises at all
    # (benchmark/README.md, "A second model").
    mid_attention: bool = True

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


def build_unet(config: ModelConfig, latent_shape: tuple[int, int, int] = PIXEL_UNSHUFFLE_SHAPE) -> UNet2DConditionModel:
    channels, size, _ = latent_shape
    n = len(config.block_channels)
    with_attention = n if config.attention_levels is None else config.attention_levels
    down = ("CrossAttnDownBlock2D",) * with_attention + ("DownBlock2D",) * (n - with_attention)
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=config.block_channels, layers_per_block=config.layers_per_block,
        down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if config.mid_attention else "UNetMidBlock2D",
        cross_attention_dim=config.text_hidden, attention_head_dim=config.unet_heads,
        norm_num_groups=16)


def build_model(config: ModelConfig, seed: int = 0, latent_shape: tuple[int, int, int] = PIXEL_UNSHUFFLE_SHAPE
                ) -> tuple[UNet2DConditionModel, EntityTextEncoder]:
    return build_denoiser("unet", config, seed, latent_shape)


def encode_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 12, H/2, W/2) in [-1, 1]: the bundled design's pixel-unshuffled latent."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return F.pixel_unshuffle(x, 2)


def decode_images(latents: torch.Tensor) -> np.ndarray:
    """(B, 12, h, w) pixel-unshuffled latent -> uint8 (B, 2h, 2w, 3) images; exact inverse of ``encode_images``."""
    x = F.pixel_shuffle(latents.detach().float().cpu(), 2)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class LatentCodec(Protocol):
    """A model's way between the judge's images and its latents. ``encode``: uint8 (B, 32, 32, 3) ->
    (B, *shape); ``decode``: the reverse, at the judge's 32 px whatever resolution the latent stands for."""

    shape: tuple[int, int, int]

    def encode(self, images: np.ndarray) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


class PixelUnshuffleLatent:
    """The bundled design's latent: the 32x32 image itself, pixel-unshuffled to 12x16x16 (exact both ways)."""

    shape = PIXEL_UNSHUFFLE_SHAPE

    @classmethod
    def load(cls, entry: dict, state: dict[str, torch.Tensor]) -> "PixelUnshuffleLatent":
        return cls()  # nothing to read: the latent has no weights and no settings

    def encode(self, images: np.ndarray) -> torch.Tensor:
        return encode_images(images)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return decode_images(latents)


# The hook for a new kind of latent: the weights' JSON names it in ``"latent": {"kind": ...}`` (absent:
# the pixel-unshuffle latent, which every file exported before latents had kinds means). A kind maps to
# a loader ``(entry, state) -> LatentCodec``: ``entry`` is that JSON object, ``state`` every tensor of
# the weights file (a learned latent's loader takes its own, e.g. those under ``autoencoder.``).
DEFAULT_LATENT = {"kind": "pixel_unshuffle"}
LATENT_KINDS: dict[str, Callable[[dict, dict[str, torch.Tensor]], LatentCodec]] = {
    "pixel_unshuffle": PixelUnshuffleLatent.load,
    "autoencoder": AutoencoderLatent.load,
}


@dataclass
class BenchmarkModel:
    """A loaded benchmark model, whatever its latent and backbone: what sampling needs (``unet``,
    ``text_encoder``, ``tokenizer``, ``scheduler_config``) and the way between the judge's 32 px images
    and its latents, so that every command takes any benchmark model. ``meta`` is the weights' JSON.
    ``backbone``: ``"unet"`` (SD's layout, DDIM) or ``"mmdit"`` (``benchmark.models.mmdit``, flow
    matching); ``unet`` holds the denoiser of either (the name every command and LoRA file uses)."""

    unet: Any
    text_encoder: EntityTextEncoder
    tokenizer: Any
    scheduler_config: dict
    latent_shape: tuple[int, int, int]
    weights_path: Path
    meta: dict
    latent: LatentCodec
    backbone: str = "unet"

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, *latent_shape) -> uint8 (B, 32, 32, 3) images at the judge's resolution."""
        return self.latent.decode(latents)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, 32, 32, 3) images -> (B, *latent_shape) latents."""
        return self.latent.encode(images)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """One latent per seed, independent of batching: the pairing of off and on rests on it."""
        return torch.stack([torch.randn(*self.latent_shape, generator=torch.Generator().manual_seed(seed))
                            for seed in seeds])

    def sample(self, prompts: Sequence[str], config: ElaConfig, seeds: Sequence[int], **options: Any) -> SampleResult:
        """One image per (prompt, seed) pair from ``initial_noise(seeds)`` through the engine the hosts
        use: DDIM (``ela_ext.diffusers_adapter.sample``) for a UNet, flow-matching Euler
        (``sample_flow``) for an MM-DiT; ``options`` go to it (DDIM's ``step_options`` and
        ``generator`` are the UNet's only)."""
        if self.backbone == "mmdit":
            return sample_flow(self.unet, self.text_encoder, self.tokenizer,
                               FlowMatchEulerDiscreteScheduler(**self.scheduler_config), list(prompts), config,
                               self.initial_noise(seeds), **options)
        return sample(self.unet, self.text_encoder, self.tokenizer, DDIMScheduler(**self.scheduler_config),
                      list(prompts), config, self.initial_noise(seeds), **options)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """The latents at ``timestep`` of 1000 as the model was trained: DDPM's ``alpha_bar`` for a UNet,
        ``sigma = timestep / 1000`` of rectified flow for an MM-DiT (SD3's timestep convention)."""
        if self.backbone == "mmdit":
            sigma = timestep / 1000
            return (1 - sigma) * latents + sigma * noise
        t = torch.full((len(latents),), timestep)
        return DDPMScheduler(**self.scheduler_config).add_noise(latents, noise, t)

    def anchor_maps(self, noisy: torch.Tensor, timestep: int, context: torch.Tensor) -> torch.Tensor:
        """(batch, 77, h, w): the maps the engine anchors with by default (``ElaConfig()``), from one
        conditional pass truncated after the last layer read: the UNet's anchor layers, or the
        MM-DiT's joint blocks through the joint capture the sampler uses."""
        config, latent_hw = ElaConfig(), tuple(noisy.shape[-2:])
        t = torch.full((len(noisy),), float(timestep))
        if self.backbone == "mmdit":
            capture = joint_capture(self.unet, config)
            with feeding(self.unet, capture), capture.capturing(latent_hw):
                return run_truncated(capture, lambda: velocity(self.unet, noisy, t / 1000, context))
        layers = [module for _, module in find_cross_attention_layers(self.unet, config.layers)]
        with AttentionCapture(layers, latent_hw, stop_after_last=True) as capture:
            return run_truncated(capture, lambda: self.unet(noisy, t, encoder_hidden_states=context))


# What the weights' JSON "backbone" names (absent: "unet"): the config class and the denoiser builder.
BACKBONES: dict[str, tuple[type, Callable[[Any, tuple[int, int, int]], nn.Module]]] = {
    "unet": (ModelConfig, lambda config, shape: build_unet(config, shape)),
    "mmdit": (MMDiTConfig, build_transformer),
}


def build_denoiser(backbone: str, config: Any, seed: int, latent_shape: tuple[int, int, int]
                   ) -> tuple[nn.Module, EntityTextEncoder]:
    """The denoiser of ``backbone`` and the text encoder, seeded as ``build_model``."""
    torch.manual_seed(seed)
    return BACKBONES[backbone][1](config, latent_shape), EntityTextEncoder(config)


def load_model(weights_path: Path | str) -> BenchmarkModel:
    """The model in an exported ``.safetensors`` file and the ``.json`` beside it, with the latent the
    JSON names (``LATENT_KINDS``); modules in float32, eval mode, no gradients."""
    weights_path = Path(weights_path)
    meta = json.loads(weights_path.with_suffix(".json").read_text())
    latent_entry = meta.get("latent", DEFAULT_LATENT)
    if latent_entry["kind"] not in LATENT_KINDS:
        raise ValueError(f"{weights_path.with_suffix('.json')}: unknown latent kind {latent_entry['kind']!r} "
                         f"(known: {', '.join(LATENT_KINDS)})")
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    latent = LATENT_KINDS[latent_entry["kind"]](latent_entry, state)
    backbone = meta.get("backbone", "unet")
    config = BACKBONES[backbone][0].from_dict(meta["model_config"])
    unet, text_encoder = build_denoiser(backbone, config, 0, tuple(latent.shape))
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return BenchmarkModel(unet, text_encoder, load_tokenizer(), dict(meta["scheduler_config"]), tuple(latent.shape),
                          weights_path, meta, latent, backbone)
