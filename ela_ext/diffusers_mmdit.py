"""ELA inside a plain diffusers flow-matching loop for MM-DiT transformers (``SD3Transformer2DModel``
for SD3 / SD3.5, ``FluxTransformer2DModel`` for Flux), without a WebUI: the MM-DiT counterpart of
``diffusers_adapter``, so a benchmark runs the engine exactly as the hosts do (the same
``JointAttentionCapture`` of the same default blocks, the same truncated grad pass through
``AnchoringSession``), only the q/k tap differs.

Where diffusers' joint attention can be read (diffusers 0.3x-0.4x):

- SD3 / SD3.5 (``JointAttnProcessor2_0``): the image q/k come out of ``attn.norm_q`` / ``norm_k``
  and the text q/k out of ``attn.norm_added_q`` / ``norm_added_k`` as ``(B, heads, L, D)``, exactly
  as they enter the attention (no rotary embedding); without a qk norm (SD3 medium) out of
  ``to_q`` / ``to_k`` / ``add_q_proj`` / ``add_k_proj`` as ``(B, L, heads * D)``. Forward hooks on
  those modules of each block's ``attn`` (never ``attn2``, SD3.5's image-only attention) collect
  them; the processor joins them IMAGE first, the tap hands the capture the text first.
- Flux (``FluxAttnProcessor``): the rotary embedding is applied inside the processor after the
  norms, so the tap replaces the module-level ``dispatch_attention_fn`` of ``transformer_flux``
  for the span of the pass (as the WebUI tap replaces Forge's ``attention``), which receives the
  joint ``(B, L, heads, D)`` q/k, text first, rotary embedding applied. Forward pre-hooks on the
  double blocks tell which block is attending; single blocks are not read (the engine reads
  double blocks only, as in the WebUIs).

The text tokens the engine's ``EntityColumns`` index are the context's columns from 0 on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .anchoring import SamplerSpace
from .config import ElaConfig
from .joint_attention import JointAttentionCapture, choose_blocks
from .session import AnchoringSession
from .tokens import EntityColumns


def family(transformer: nn.Module) -> str:
    """"flux" for a ``FluxTransformer2DModel`` (it has single-stream blocks), else "sd3"."""
    return "flux" if hasattr(transformer, "single_transformer_blocks") else "sd3"


def joint_capture(transformer: nn.Module, config: ElaConfig) -> JointAttentionCapture:
    """The engine's capture of the blocks ``config.joint_blocks`` names among the joint blocks
    (SD3's ``transformer_blocks``, Flux's double-stream ``transformer_blocks``)."""
    return JointAttentionCapture(choose_blocks(len(transformer.transformer_blocks), config.joint_blocks))


@contextlib.contextmanager
def feeding(transformer: nn.Module, capture: JointAttentionCapture) -> Iterator[None]:
    """Inside the block, each wanted joint block's q/k go to ``capture.record`` (text first);
    every hook and the replaced function are removed on exit, whatever happened."""
    handles: list[Any] = []
    restore: Optional[Callable[[], None]] = None
    try:
        if family(transformer) == "flux":
            restore = _tap_flux(transformer, capture, handles)
        else:
            for index, block in enumerate(transformer.transformer_blocks):
                _tap_sd3_block(index, block.attn, capture, handles)
        yield
    finally:
        for handle in handles:
            handle.remove()
        if restore is not None:
            restore()


def _tap_sd3_block(index: int, attn: nn.Module, capture: JointAttentionCapture, handles: list) -> None:
    normed = attn.norm_q is not None
    sources = {"q": attn.norm_q if normed else attn.to_q, "k": attn.norm_k if normed else attn.to_k,
               "text_q": attn.norm_added_q if normed else attn.add_q_proj,
               "text_k": attn.norm_added_k if normed else attn.add_k_proj}
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            if not capture.wants(index):
                return
            seen[name] = output
            if len(seen) == 4:
                query = torch.cat([seen["text_q"], seen["q"]], dim=-2)
                key = torch.cat([seen["text_k"], seen["k"]], dim=-2)
                n_text, n_image = seen["text_q"].shape[-2], seen["q"].shape[-2]
                seen.clear()
                capture.record(index, query, key, n_text, heads=attn.heads, n_image=n_image)
        return hook

    for name, module in sources.items():
        handles.append(module.register_forward_hook(keep(name)))


def _tap_flux(transformer: nn.Module, capture: JointAttentionCapture, handles: list) -> Callable[[], None]:
    from diffusers.models.transformers import transformer_flux

    state: dict[str, Optional[int]] = {"block": None, "n_text": None}
    original = transformer_flux.dispatch_attention_fn

    def double_starts(index: int):
        def hook(_module, args, kwargs):
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            state["block"], state["n_text"] = index, int(context.shape[1])
        return hook

    def single_starts(_module, _args, _kwargs):
        state["block"] = None

    def dispatch(query, key, value, *args, **kwargs):
        block = state["block"]
        if block is not None and capture.wants(block):
            state["block"] = None
            capture.record(block, query.transpose(1, 2), key.transpose(1, 2), state["n_text"],
                           n_image=query.shape[1] - state["n_text"])
        return original(query, key, value, *args, **kwargs)

    for index, block in enumerate(transformer.transformer_blocks):
        handles.append(block.register_forward_pre_hook(double_starts(index), with_kwargs=True))
    for block in transformer.single_transformer_blocks:
        handles.append(block.register_forward_pre_hook(single_starts, with_kwargs=True))
    transformer_flux.dispatch_attention_fn = dispatch
    return lambda: setattr(transformer_flux, "dispatch_attention_fn", original)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 patch packing: (B, C, H, W) -> (B, H/2 * W/2, 4C), row-major tokens."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, packed = tokens.shape
    c = packed // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's image position ids of an (h, w) latent: (h/2 * w/2, 3), (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class Conditioning:
    """One prompt's conditioning: ``context`` (1, text tokens, width), ``pooled`` (1, width); for
    SD3's classifier-free guidance also the empty prompt's (``uncond_*``)."""

    context: torch.Tensor
    pooled: torch.Tensor
    uncond_context: Optional[torch.Tensor] = None
    uncond_pooled: Optional[torch.Tensor] = None


def velocity(transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
             pooled: torch.Tensor, guidance: float) -> torch.Tensor:
    """The transformer's velocity at flow noise level ``sigma`` for latents ``x`` (B, C, H, W)."""
    rows = x.shape[0]
    timestep = sigma.expand(rows).to(x.dtype)
    if family(transformer) == "sd3":
        return transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=timestep * 1000, return_dict=False)[0]
    h, w = x.shape[-2:]
    extra = {}
    if transformer.config.guidance_embeds:
        extra["guidance"] = torch.full((rows,), guidance, dtype=x.dtype, device=x.device)
    out = transformer(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=pooled,
                      timestep=timestep, img_ids=image_ids(h, w, x.device, x.dtype),
                      txt_ids=torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype),
                      return_dict=False, **extra)[0]
    return unpack(out, h, w)


@dataclass
class FlowResult:
    latents: torch.Tensor
    session: Optional[AnchoringSession] = None
    targets: list[EntityColumns] = field(default_factory=list)


@torch.no_grad()
def sample(transformer: nn.Module, conditioning: Conditioning, targets: Sequence[EntityColumns],
           config: ElaConfig, latents: torch.Tensor, sigmas: Sequence[float], guidance: float,
           loop_options: Optional[dict[str, Any]] = None,
           on_step: Optional[Callable[[int, float], None]] = None) -> FlowResult:
    """Euler flow-matching sampling of one image from ``latents`` (unit noise) over ``sigmas``
    (descending to 0), anchoring inside the window before each step's model evaluation, as the
    hosts do. SD3: classifier-free guidance (cond + uncond rows, scale ``guidance``); Flux-dev: one
    conditional row, ``guidance`` into its guidance embedding. ``loop_options`` go to
    ``anchor_latent`` (the benchmark's random-direction control). ``on_step(step_index, timestep)``
    runs before each step's guided forward (after anchoring) with the step's timestep, SD3's
    ``1000 * sigma``, as ``diffusers_adapter.sample``'s gets DDIM's."""
    config = config.validated()
    session = None
    if config.enabled:
        capture = joint_capture(transformer, config)
        session = AnchoringSession(transformer, config, targets, capture=capture)
    cfg = family(transformer) == "sd3"
    steps = len(sigmas) - 1
    x = latents
    for index in range(steps):
        sigma = torch.tensor(float(sigmas[index]))
        if session is not None:
            def forward(z: torch.Tensor, s: torch.Tensor = sigma) -> torch.Tensor:
                with feeding(transformer, capture):
                    return velocity(transformer, z, s, conditioning.context, conditioning.pooled, guidance)
            x = session.maybe_anchor(x, SamplerSpace.from_flow_sigma(float(sigma)), index, steps, forward,
                                     **(loop_options or {}))
        if on_step is not None:
            on_step(index, 1000 * float(sigma))
        if cfg:
            both = velocity(transformer, torch.cat([x, x]), sigma,
                            torch.cat([conditioning.context, conditioning.uncond_context]),
                            torch.cat([conditioning.pooled, conditioning.uncond_pooled]), guidance)
            cond, uncond = both.chunk(2)
            v = uncond + guidance * (cond - uncond)
        else:
            v = velocity(transformer, x, sigma, conditioning.context, conditioning.pooled, guidance)
        x = x + (float(sigmas[index + 1]) - float(sigma)) * v
    return FlowResult(x, session, list(targets))


def shifted_sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """SD3's (and a fixed-shift Flux) schedule: ``shift * s / (1 + (shift - 1) * s)`` of a linear
    1 -> 0 ramp, ending at 0."""
    ramp = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return [float(shift * s / (1 + (shift - 1) * s)) for s in ramp]
