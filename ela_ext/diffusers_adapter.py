"""ELA inside a plain diffusers denoising loop: a ``UNet2DConditionModel`` (``sample``) or an
SD3-style ``SD3Transformer2DModel`` (``sample_flow``), a CLIP text encoder and tokenizer, and a
scheduler, without the WebUI.

The same ``AnchoringSession`` the WebUI script uses runs here, so scripts, research code, the
tests and the benchmark exercise exactly the extension's engine. diffusers itself is imported
nowhere: the objects passed in are used through their public methods only (``set_timesteps``,
``scale_model_input``, ``step``, ``sigmas`` / ``alphas_cumprod``).

The MM-DiT path (``sample_flow``) is this module's prompt handling and ``SampleResult`` around
``diffusers_mmdit.sample``, which taps the joint attention and runs the flow loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .anchoring import SamplerSpace, unanchorable_reason
from .config import ElaConfig
from .entities import EntitySpecError, detect_entities, parse_spec
from .diffusers_mmdit import Conditioning, sample as sample_mmdit
from .session import AnchoringSession
from .tokens import EntityColumns, chunks_from_ids, resolve_entities

CHUNK = 77


@dataclass
class SampleResult:
    """Final latents, and the session (loss log, masks, warnings) when anchoring was on."""

    latents: torch.Tensor
    session: Optional[AnchoringSession] = None
    targets: list[EntityColumns] = field(default_factory=list)


def prompt_targets(tokenizer: Any, prompts: Sequence[str], specs: Sequence[str]) -> list[EntityColumns]:
    """Each prompt's entity columns; an empty spec means detect from the prompt. Raises
    EntitySpecError (naming the word or the prompt) where a prompt cannot be anchored."""
    targets = []
    for prompt, spec in zip(prompts, specs):
        phrases = parse_spec(spec) if spec.strip() else detect_entities(prompt)
        ids = tokenizer(prompt, padding="max_length", max_length=CHUNK, truncation=True).input_ids
        target = resolve_entities(phrases, chunks_from_ids(ids),
                                  lambda word: tokenizer(word, add_special_tokens=False).input_ids,
                                  pad_ids=(tokenizer.pad_token_id, tokenizer.eos_token_id))
        reason = unanchorable_reason(target)
        if reason:
            raise EntitySpecError(f"{reason} in {prompt!r}")
        targets.append(target)
    return targets


def encode(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> torch.Tensor:
    """SD-style conditioning: the last hidden state of 77 padded tokens per prompt."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=CHUNK, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0]


def sampler_space(scheduler: Any, step_index: int, timestep: Any) -> SamplerSpace:
    """k-diffusion-style schedulers (Euler, DPM++ with sigmas, ``init_noise_sigma`` > 1) hold
    ``x = z_t / c_in``; DDIM/DDPM/PNDM-style ones hold ``z_t`` at a discrete timestep."""
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0 and hasattr(scheduler, "sigmas"):
        return SamplerSpace.from_sigma(float(scheduler.sigmas[step_index]))
    return SamplerSpace.from_timestep(float(timestep), scheduler.alphas_cumprod)


@torch.no_grad()
def sample(unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, prompts: Sequence[str],
           config: ElaConfig, latents: torch.Tensor, num_steps: int = 25, guidance_scale: float = 5.0,
           entity_specs: Optional[Sequence[str]] = None, generator: Optional[torch.Generator] = None,
           loop_options: Optional[dict[str, Any]] = None, step_options: Optional[dict[str, Any]] = None,
           on_step: Optional[Callable[[int, Any], None]] = None,
           added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None) -> SampleResult:
    """Classifier-free guided sampling from ``latents`` (unit-variance noise), anchoring the
    conditional rows on the first UNet evaluation of each step inside the window.

    ``entity_specs``: one spec per prompt (default: ``config.entities`` for all). ``generator``
    drives an ancestral scheduler's noise; ``loop_options`` go to ``anchor_latent`` (the
    benchmark's random-direction control); ``step_options`` to ``scheduler.step`` (e.g. DDIM's
    ``eta``). ``on_step(step_index, timestep)`` runs before each step's guided UNet forward, whose
    batch is the conditional rows first, then the unconditional ones (e.g. to arm attention hooks).
    ``added_cond_kwargs``: extra UNet conditioning (SDXL's ``text_embeds`` and ``time_ids``), each
    tensor with ``2 * len(prompts)`` rows in the guided batch's order; the grad pass takes the
    conditional rows. Raises the engine's EntitySpecError for a spec that does not fit a prompt,
    before any sampling.
    """
    config = config.validated()
    specs = list(entity_specs) if entity_specs is not None else [config.entities] * len(prompts)
    targets = prompt_targets(tokenizer, prompts, specs) if config.enabled else []
    cond = encode(tokenizer, text_encoder, prompts)
    uncond = encode(tokenizer, text_encoder, [""] * len(prompts))
    session = AnchoringSession(unet, config, targets) if config.enabled else None
    guided_extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    cond_extra = {} if added_cond_kwargs is None else {
        "added_cond_kwargs": {key: value[:len(prompts)] for key, value in added_cond_kwargs.items()}}

    scheduler.set_timesteps(num_steps)
    latents = latents * scheduler.init_noise_sigma
    for step_index, timestep in enumerate(scheduler.timesteps):
        if session is not None:
            def forward(x: torch.Tensor, t: Any = timestep) -> Any:
                return unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=cond, **cond_extra)
            latents = session.maybe_anchor(latents, sampler_space(scheduler, step_index, timestep),
                                           step_index, num_steps, forward, **(loop_options or {}))
        if on_step is not None:
            on_step(step_index, timestep)
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        noise = unet(model_input, timestep, encoder_hidden_states=torch.cat([cond, uncond]), **guided_extra).sample
        noise_cond, noise_uncond = noise.chunk(2)
        guided = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(guided, timestep, latents, generator=generator, **(step_options or {})).prev_sample
    return SampleResult(latents, session, targets)


@torch.no_grad()
def sample_flow(transformer: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, prompts: Sequence[str],
                config: ElaConfig, latents: torch.Tensor, num_steps: int = 25, guidance_scale: float = 5.0,
                entity_specs: Optional[Sequence[str]] = None,
                pooled: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                loop_options: Optional[dict[str, Any]] = None,
                on_step: Optional[Callable[[int, float], None]] = None) -> SampleResult:
    """``sample``'s counterpart for an SD3-layout transformer: classifier-free guided flow-matching
    Euler (the model predicts the velocity ``noise - x_0`` of ``x_t = (1 - sigma) x_0 + sigma * noise``
    at timestep ``1000 * sigma``) from ``latents`` (unit-variance noise: ``x_t`` at sigma 1), over the
    sigmas of ``scheduler`` (diffusers' ``FlowMatchEulerDiscreteScheduler``: ``set_timesteps`` and
    ``sigmas`` only), anchoring the conditional rows in the window in flow space
    (``diffusers_mmdit.sample``, the engine's joint capture). ``pooled``: the (conditional,
    unconditional) pooled text vectors of SD3's adaLN; None gives zeros (a model trained without
    pooled text, as the benchmark's MM-DiT). ``entity_specs``, ``loop_options``: as for ``sample``;
    ``on_step(step_index, timestep)`` too, the timestep being SD3's ``1000 * sigma``.
    """
    config = config.validated()
    specs = list(entity_specs) if entity_specs is not None else [config.entities] * len(prompts)
    targets = prompt_targets(tokenizer, prompts, specs) if config.enabled else []
    cond = encode(tokenizer, text_encoder, prompts)
    uncond = encode(tokenizer, text_encoder, [""] * len(prompts))
    if pooled is None:
        zeros = cond.new_zeros(len(prompts), transformer.config.pooled_projection_dim)
        pooled = (zeros, zeros)
    scheduler.set_timesteps(num_steps)
    sigmas = [float(sigma) for sigma in scheduler.sigmas]
    result = sample_mmdit(transformer, Conditioning(cond, pooled[0], uncond, pooled[1]), targets, config, latents,
                          sigmas, guidance_scale, loop_options=loop_options, on_step=on_step)
    return SampleResult(result.latents, result.session, targets)
