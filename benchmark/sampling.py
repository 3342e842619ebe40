"""Deterministic DDIM sampling with classifier-free guidance for the benchmark model."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler

from .clip_tokenizer import encode
from .model import LATENT_CHANNELS, LATENT_SIZE, decode


@torch.no_grad()
def sample(unet, text_encoder, tokenizer, scheduler_config: dict, prompts: list[str], seed: int = 0,
           steps: int = 20, guidance: float = 5.0, eta: float = 0.0,
           on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    """uint8 (B, 32, 32, 3) images; the same arguments give the same images.

    ``eta`` > 0 adds DDIM's fresh noise (1: DDPM-like ancestral steps) from the same seeded generator;
    it hides some of the small model's accumulated errors, which deterministic DDIM (eta 0) leaves as
    pixel noise early in training. ``on_step(index, timestep)`` is called before each denoising
    forward (e.g. to arm attention hooks); the forward runs the unconditional half first, then the
    conditional half, in one batch."""
    scheduler = DDIMScheduler(**scheduler_config)
    scheduler.set_timesteps(steps)
    ids = encode(tokenizer, list(prompts))
    cond = text_encoder(ids)[0]
    uncond = text_encoder(encode(tokenizer, [""] * len(prompts)))[0]
    context = torch.cat([uncond, cond])
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(prompts), LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i, int(t))
        eps_u, eps_c = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample.chunk(2)
        latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents, eta=eta,
                                 generator=generator).prev_sample
    return decode(latents)
