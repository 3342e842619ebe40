"""The benchmark's MM-DiT: a tiny SD3 (diffusers' ``SD3Transformer2DModel``, so the engine's glue that
anchors it, ``ela_ext.diffusers_adapter.sample_flow``, is the one that anchors SD3/SD3.5 layouts).

Like SD3: the latent is cut into 2x2 patches (4x16x16 autoencoder latent -> 64 image tokens); text and
image tokens attend in ONE softmax per joint block (text projected by ``context_embedder``); training is
rectified flow, ``x_t = (1 - sigma) x_0 + sigma * noise`` with the velocity ``noise - x_0`` as target
and SD3's logit-normal sigmas (``sigma = sigmoid(u)``, ``u ~ N(mean, std)``, SD3's 0 and 1: most
samples mid-way, where the layout is learnt); sampling is Euler on diffusers'
``FlowMatchEulerDiscreteScheduler``.

Unlike SD3, on purpose: **no pooled text**. SD3 adds a pooled CLIP vector of the whole caption to the
timestep embedding that drives every block's adaLN. That vector is the route this benchmark closed on
the UNet: with informative EOS columns (a caption summary every pixel can read) the UNet read the
caption from them and the entity words' maps never localised, so ``EntityTextEncoder`` blanks every
column from the first EOS on. A pooled caption in the adaLN would reopen it (every image token
modulated by the whole caption, no attention needed), so the adaLN gets zeros: it carries the
timestep only, and the caption reaches the image only through the word columns of the joint stream,
whose maps the engine reads. The text encoder is the UNet model's (same CLIP tokenizer, frozen random
causal encoder, blank EOS columns), so entity columns are SD's.

Also unlike SD3: schedule ``shift`` 1 (SD3's 3.0 makes up for 1024 px images, which keep more signal
at a given sigma; a 16x16 latent is below the resolution the logit-normal was tuned at).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import SD3Transformer2DModel


@dataclass
class MMDiTConfig:
    """Architecture; saved beside exported weights. The text fields are ``ModelConfig``'s, read by
    ``EntityTextEncoder``."""
    text_hidden: int = 64
    text_layers: int = 1
    text_heads: int = 4
    blank_eos: bool = True
    depth: int = 6
    heads: int = 4
    head_dim: int = 32
    patch: int = 2
    qk_norm: str | None = None  # SD3.5's "rms_norm" is available; SD3 medium has none

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def build_transformer(config: MMDiTConfig, latent_shape: tuple[int, int, int]) -> SD3Transformer2DModel:
    channels, size, _ = latent_shape
    return SD3Transformer2DModel(
        sample_size=size, patch_size=config.patch, in_channels=channels, out_channels=channels,
        num_layers=config.depth, attention_head_dim=config.head_dim, num_attention_heads=config.heads,
        joint_attention_dim=config.text_hidden, caption_projection_dim=config.heads * config.head_dim,
        pooled_projection_dim=config.text_hidden, pos_embed_max_size=size // config.patch,
        qk_norm=config.qk_norm)


def flow_scheduler_config(shift: float = 1.0) -> dict:
    """``FlowMatchEulerDiscreteScheduler``'s settings (timestep = 1000 * sigma, as SD3's)."""
    return {"num_train_timesteps": 1000, "shift": shift}


def logit_normal_sigmas(count: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """SD3's training noise levels: ``sigmoid(N(mean, std))``."""
    return torch.sigmoid(mean + std * torch.randn(count, generator=generator))


def velocity(transformer: SD3Transformer2DModel, x_t: torch.Tensor, sigma: torch.Tensor,
             context: torch.Tensor) -> torch.Tensor:
    """The predicted velocity at noise levels ``sigma`` (B,), pooled text zero (module doc)."""
    pooled = context.new_zeros(context.shape[0], transformer.config.pooled_projection_dim)
    return transformer(x_t, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma * 1000).sample


def flow_loss(transformer: SD3Transformer2DModel, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
              context: torch.Tensor) -> torch.Tensor:
    """Rectified flow's MSE between the predicted velocity and ``noise - latents`` at ``sigma``."""
    s = sigma.reshape(-1, 1, 1, 1)
    x_t = (1 - s) * latents + s * noise
    return torch.nn.functional.mse_loss(velocity(transformer, x_t, sigma, context), noise - latents)
