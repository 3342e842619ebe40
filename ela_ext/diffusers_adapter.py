"""ELA inside a plain diffusers denoising loop: a ``UNet2DConditionModel`` (``sample``) or an
SD3-style ``SD3Transformer2DModel`` (``sample_flow``), a CLIP text encoder and tokenizer, and a
scheduler, without the WebUI.

The same ``AnchoringSession`` the WebUI script uses runs here, so scripts, research code, the
tests and the benchmark exercise exactly the extension's engine. diffusers itself is imported
nowhere: the objects passed in are used through their public methods only (``set_timesteps``,
``scale_model_input``, ``step``, ``sigmas`` / ``alphas_cumprod``).

MM-DiT path (SD3 / SD3.5 layouts, and the benchmark's MM-DiT built from the same class): the maps
come from the engine's ``JointAttentionCapture``. ``joint_attention_hooks`` puts a forward PRE-hook
on the attention of each chosen ``transformer_blocks[i]`` that recomputes the queries and keys from
the attention's own inputs (``to_q``/``to_k`` on the image tokens, ``add_q_proj``/``add_k_proj`` on
the text tokens, each with its q/k norm when the model has one, SD3.5's RMSNorm), puts the text
FIRST as the capture expects (diffusers' SD3 processor concatenates image first) and records them;
the attention itself then runs untouched with whatever processor is set, so the output is
bit-identical with the hooks on, as for the UNets' ``AttentionCapture``. SD3.5's second,
image-only attention (``attn2``) is not hooked. Flux's double blocks apply RoPE inside their
processor and are not served here.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .anchoring import SamplerSpace, unanchorable_reason
from .capture import CaptureError
from .config import ElaConfig
from .entities import EntitySpecError, detect_entities, parse_spec
from .joint_attention import JointAttentionCapture, choose_blocks
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


def joint_attentions(transformer: nn.Module) -> list[nn.Module]:
    """The attention module of every joint block of an SD3-layout transformer, in execution order."""
    blocks = getattr(transformer, "transformer_blocks", None)
    attentions = [getattr(block, "attn", None) for block in blocks or []]
    if not attentions or not all(hasattr(a, "add_k_proj") and hasattr(a, "to_k") for a in attentions):
        raise CaptureError(f"{type(transformer).__name__} has no SD3-style joint-attention blocks")
    return attentions


def _heads_first(tokens: torch.Tensor, heads: int) -> torch.Tensor:
    return tokens.reshape(tokens.shape[0], tokens.shape[1], heads, -1).transpose(1, 2)


def _record_joint(capture: JointAttentionCapture, index: int, attn: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of joint block ``index``'s attention: its queries and keys, text first."""
    if not capture.wants(index):
        return
    image = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if text is None:  # an image-only attention
        return
    projected = []
    for tokens, (to_q, to_k, norm_q, norm_k) in (
            (text, (attn.add_q_proj, attn.add_k_proj, attn.norm_added_q, attn.norm_added_k)),
            (image, (attn.to_q, attn.to_k, attn.norm_q, attn.norm_k))):
        query, key = _heads_first(to_q(tokens), attn.heads), _heads_first(to_k(tokens), attn.heads)
        projected.append((norm_q(query) if norm_q is not None else query, norm_k(key) if norm_k is not None else key))
    (text_q, text_k), (image_q, image_k) = projected
    capture.record(index, torch.cat([text_q, image_q], 2), torch.cat([text_k, image_k], 2), text.shape[1],
                   n_image=image.shape[1])


@contextlib.contextmanager
def joint_attention_hooks(transformer: nn.Module, capture: JointAttentionCapture) -> Iterator[JointAttentionCapture]:
    """Feed ``capture`` from the chosen joint blocks (module doc) while inside; every hook is removed
    on exit. The hooks record only inside ``capture.capturing`` (the engine's grad passes)."""
    attentions = joint_attentions(transformer)
    handles = [attentions[index].register_forward_pre_hook(functools.partial(_record_joint, capture, index),
                                                            with_kwargs=True)
               for index in capture.blocks if index < len(attentions)]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def joint_capture(transformer: nn.Module, config: ElaConfig) -> JointAttentionCapture:
    """The engine's capture of the joint blocks ``config.joint_blocks`` names."""
    return JointAttentionCapture(choose_blocks(len(joint_attentions(transformer)), config.joint_blocks))


@torch.no_grad()
def sample_flow(transformer: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, prompts: Sequence[str],
                config: ElaConfig, latents: torch.Tensor, num_steps: int = 25, guidance_scale: float = 5.0,
                entity_specs: Optional[Sequence[str]] = None,
                pooled: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                loop_options: Optional[dict[str, Any]] = None,
                on_step: Optional[Callable[[int, Any], None]] = None) -> SampleResult:
    """Classifier-free guided flow-matching sampling (SD3's: the model predicts the velocity
    ``noise - x_0`` of ``x_t = (1 - sigma) x_0 + sigma * noise``, at timestep ``1000 * sigma``) from
    ``latents`` (unit-variance noise, which is ``x_t`` at sigma 1), anchoring the conditional rows
    in the window as ``sample`` does, in flow space (``SamplerSpace.from_flow_sigma``).

    ``scheduler``: a flow-matching scheduler (diffusers' ``FlowMatchEulerDiscreteScheduler``: Euler
    steps ``x += (sigma_next - sigma) * v``), used through ``set_timesteps``, ``timesteps``,
    ``sigmas`` and ``step``. ``pooled``: the (conditional, unconditional) pooled text vectors for
    the adaLN, SD3's CLIP pooled embeddings; None gives zeros (a model trained without pooled text,
    as the benchmark's). ``entity_specs``, ``loop_options``, ``on_step``: as for ``sample``.
    """
    config = config.validated()
    specs = list(entity_specs) if entity_specs is not None else [config.entities] * len(prompts)
    targets = prompt_targets(tokenizer, prompts, specs) if config.enabled else []
    cond = encode(tokenizer, text_encoder, prompts)
    uncond = encode(tokenizer, text_encoder, [""] * len(prompts))
    if pooled is None:
        zeros = cond.new_zeros(len(prompts), transformer.config.pooled_projection_dim)
        pooled = (zeros, zeros)
    pooled_cond, pooled_uncond = pooled
    capture = joint_capture(transformer, config) if config.enabled else None
    session = AnchoringSession(transformer, config, targets, capture=capture) if config.enabled else None

    def velocity(x: torch.Tensor, context: torch.Tensor, pooled_text: torch.Tensor, t: Any) -> torch.Tensor:
        timestep = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        return transformer(x, encoder_hidden_states=context, pooled_projections=pooled_text, timestep=timestep).sample

    scheduler.set_timesteps(num_steps)
    with joint_attention_hooks(transformer, capture) if capture is not None else contextlib.nullcontext():
        for step_index, timestep in enumerate(scheduler.timesteps):
            if session is not None:
                space = SamplerSpace.from_flow_sigma(float(scheduler.sigmas[step_index]))
                latents = session.maybe_anchor(latents, space, step_index, num_steps,
                                               lambda x, t=timestep: velocity(x, cond, pooled_cond, t),
                                               **(loop_options or {}))
            if on_step is not None:
                on_step(step_index, timestep)
            both = velocity(torch.cat([latents, latents]), torch.cat([cond, uncond]),
                            torch.cat([pooled_cond, pooled_uncond]), timestep)
            v_cond, v_uncond = both.chunk(2)
            guided = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = scheduler.step(guided, timestep, latents).prev_sample
    return SampleResult(latents, session, targets)
