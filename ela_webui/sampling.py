"""Anchoring inside the WebUI's samplers (AUTOMATIC1111 and Forge): the wrapper around
``p.sampler.model_wrap_cfg.forward``.

Why there (host.md "Callbacks"): ``CFGDenoiserParams.x`` is a copy, so changing it moves only this
call's UNet input. The ``x`` the sampler passes to its CFG denoiser is the sampler's own latent on
the first evaluation of each step; writing the anchored latent into it IN PLACE makes both this
step's denoising and the sampler's update continue from it. A sampler object, and so the wrapper,
lives for one batch's pass: nothing is left on the model, and the capture hooks exist only inside
``AnchoringSession.maybe_anchor``. Forge keeps A1111's samplers and CFG denoiser, so the wrapper is
the same in both; only the conditional UNet branch differs (``LdmModel``, ``forge.ForgeModel``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from modules import prompt_parser, sd_samplers_timesteps_impl
from modules.sd_samplers_timesteps import CFGDenoiserTimesteps

from ela_ext.anchoring import SamplerSpace, in_window
from ela_ext.config import ElaConfig
from ela_ext.entities import EntityPhrase, EntitySpecError
from ela_ext.session import AnchoringSession
from ela_webui import debug, mmdit
from ela_webui.embeddings import EmbeddingAwareEncoder
from ela_webui.prompts import Resolved, resolve, resolve_for_model, text_at_step

logger = logging.getLogger("ela")


def first_evaluation_step(denoiser, sampler_func) -> Optional[int]:
    """The sampling step that this denoiser call starts, or None for a later evaluation of a step.

    A write into ``x`` is carried on only at a step's first evaluation (host.md measured it:
    Heun's and PLMS's second calls evaluate a temporary latent). ``denoiser.step`` counts calls;
    second-order k-diffusion samplers (``total_steps = 2 * steps - 1``) make two per step but the
    last, and PLMS's warm-up step makes one extra call (call 1).
    """
    call = denoiser.step
    if denoiser.total_steps != denoiser.steps:
        return None if call % 2 else call // 2
    if sampler_func is sd_samplers_timesteps_impl.plms:
        return None if call == 1 else max(call - 1, 0)
    return call


def sampler_space(denoiser, sigma: float, sd_model) -> SamplerSpace:
    """k-diffusion denoisers get a noise level; DDIM/PLMS/UniPC the UNet timestep (host.md), in
    A1111 and in Forge alike: Forge converts to a sigma only inside its CFGDenoiser. On an MM-DiT
    (flow matching) a k-diffusion sampler's sigma is the flow's, and its latent the model input
    (A1111's ``SD3Denoiser``, Forge's flow predictors: ``calculate_input`` is the identity)."""
    if isinstance(denoiser, CFGDenoiserTimesteps):
        return SamplerSpace.from_timestep(sigma, sd_model.alphas_cumprod)
    if mmdit.model_family(sd_model) is not None:
        return SamplerSpace.from_flow_sigma(sigma)  # SD3 and Flux: x_t = (1 - sigma) x_0 + sigma noise
    return SamplerSpace.from_sigma(sigma)


def conditional_inputs(sd_model, text_cond, image_cond):
    """A fresh cond dict for the conditional rows, laid out as CFGDenoiser.forward builds it;
    fresh on every call because ``apply_model`` mutates the dict it gets."""
    if getattr(sd_model.model, "conditioning_key", None) == "crossattn-adm":
        return {"c_crossattn": [text_cond], "c_adm": image_cond}
    if isinstance(text_cond, dict):
        return {**text_cond, "c_concat": [image_cond]}
    return {"c_crossattn": [text_cond], "c_concat": [image_cond]}


def select_rows(cond, rows: list[int]):
    """Rows of a conditioning tensor, or of every tensor of an SDXL cond dict."""
    if isinstance(cond, dict):
        return {key: value[rows] for key, value in cond.items()}
    return cond[rows]


def other_text_encoders(sd_model) -> list:
    """The text encoders besides the one ``prompts.text_encoder`` resolves with: SDXL's OpenCLIP
    bigG (A1111's second embedder, Forge's ``text_processing_engine_g``); none for SD 1.x / 2.x."""
    if is_forge(sd_model):
        engine = getattr(sd_model, "text_processing_engine_g", None)
        return [EmbeddingAwareEncoder(engine)] if engine is not None else []
    embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", [])
    return [EmbeddingAwareEncoder(embedder) for embedder in embedders[1:] if hasattr(embedder, "tokenize_line")]


def encoders_disagree(sd_model, phrases: list[EntityPhrase], text: str, resolved: Resolved) -> Optional[str]:
    """Why the columns cannot be anchored, if another text encoder of the model (SDXL's two) puts
    the entities elsewhere: the UNet sees both encoders' outputs side by side, column by column."""
    own = resolved.clip_columns if mmdit.model_family(sd_model) is not None else resolved.columns
    for encoder in other_text_encoders(sd_model):
        if own is not None and resolve(phrases, text, encoder).columns != own:
            return f"the model's text encoders place the entities in different columns ({type(encoder).__name__})"
    return None


def is_forge(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


def diffusion_model(sd_model) -> nn.Module:
    """The UNet module whose cross-attention layers are captured."""
    if is_forge(sd_model):
        return sd_model.forge_objects.unet.model.diffusion_model
    return sd_model.model.diffusion_model


def unanchorable_model(sd_model) -> Optional[str]:
    """Why ELA cannot anchor the loaded model at all, or None: an MM-DiT whose context starts with
    learned register tokens (none of the released SD3 / SD3.5 has them; the columns would move)."""
    unet = diffusion_model(sd_model)
    if mmdit.dit_family(unet) is not None and mmdit.registers(unet):
        return f"ELA cannot anchor an MM-DiT with {mmdit.registers(unet)} register tokens before its text"
    return None


def unanchorable_sampler(p) -> Optional[str]:
    """Why ELA cannot anchor this pass's sampler on the loaded model, or None: on an MM-DiT it
    anchors under k-diffusion samplers (their sigma is the flow's), not under DDIM / PLMS / UniPC,
    whose timesteps assume an SD noise schedule."""
    family = mmdit.model_family(p.sd_model)
    if family is not None and isinstance(p.sampler.model_wrap_cfg, CFGDenoiserTimesteps):
        return (f"ELA anchors {mmdit.FAMILY_NAMES[family]} models under k-diffusion samplers (Euler, DPM++, ...), "
                "not DDIM / PLMS / UniPC")
    return None


class LdmModel:
    """The conditional UNet branch in AUTOMATIC1111: ldm's UNet behind the sampler's inner
    denoiser. A1111 samples under ``no_grad``, which the engine's ``enable_grad`` lifts, so a grad
    pass needs no scope and no copies. ``ela_webui.forge.ForgeModel`` is the same for Forge."""

    def __init__(self, p, denoiser):
        self.sd_model = p.sd_model
        self.denoiser = denoiser

    def grad_scope(self):
        return contextlib.nullcontext()

    def grad_inputs(self, latent, sigma, text_cond, image_cond):
        return latent, sigma, text_cond, image_cond

    def conditional_branch(self, latent, sigma, text_cond, image_cond):
        inputs = conditional_inputs(self.sd_model, text_cond, image_cond)
        return self.denoiser.inner_model(latent, sigma, cond=inputs)


def host_model(p, denoiser):
    if is_forge(p.sd_model):
        from ela_webui.forge import ForgeModel  # imports Forge's backend: only there

        return ForgeModel(p, denoiser)
    return LdmModel(p, denoiser)


@dataclass
class ImageEntities:
    """One image of the batch: its index in the generation, its phrases and its scheduled text."""

    index: int
    position: int
    phrases: list[EntityPhrase]
    schedule: list[tuple[int, str]]


class AnchoredPass:
    """One sampling pass of one batch (or its hires pass) with the denoiser wrapped.

    ``run.warn(index, message)`` receives every problem; an image that cannot be anchored is
    sampled exactly as with ELA off. An exception in this code stops anchoring for the pass.
    """

    def __init__(self, run, p, images: list[ImageEntities]):
        self.run = run
        self.config: ElaConfig = run.config
        self.p = p
        self.images = images
        self.denoiser = p.sampler.model_wrap_cfg
        earlier = getattr(self.denoiser.forward, "__self__", None)
        if isinstance(earlier, AnchoredPass):
            earlier.release()  # Forge prepares its hires pass twice on one sampler
        self.model = host_model(p, self.denoiser)
        self.stopped = False
        self.sessions: dict[tuple, AnchoringSession] = {}
        # An MM-DiT session's tap into the host's joint attention, live during its grad passes.
        self.taps: dict[AnchoringSession, mmdit.JointAttentionTap] = {}
        self.image_sessions: dict[int, tuple[AnchoringSession, int]] = {}
        self._resolved: dict[tuple[int, str], Optional[Resolved]] = {}
        self._original_forward = self.denoiser.forward
        self.denoiser.forward = self.forward
        self.sampler = p.sampler
        self.sampler_func = p.sampler.func
        self.steps_run: Optional[int] = None
        p.sampler.func = self._reading_the_schedule(self.sampler_func)

    def release(self) -> None:
        """Give the sampler back its own forward and function, so a later pass on the same
        sampler object wraps them once, not on top of this pass's wrappers."""
        self.denoiser.forward = self._original_forward
        self.sampler.func = self.sampler_func

    def _reading_the_schedule(self, sampler_func):
        """The sampler's own function, noting the length of the schedule it is called with.

        The window counts over the steps actually run: img2img and the hires pass run only the
        last part of a schedule (``int(strength * steps) + 1`` steps for k-diffusion samplers), and
        A1111's DDIM / PLMS img2img run fewer steps than the denoiser's ``steps`` announces. The
        wrapper keeps the function's signature: the WebUI passes ``sigmas`` only to a function
        whose signature names it.
        """
        @functools.wraps(sampler_func)
        def sample(*args, **kwargs):
            schedule = kwargs.get("sigmas", kwargs.get("timesteps"))
            if schedule is not None:
                self.steps_run = len(schedule) - 1
            return sampler_func(*args, **kwargs)
        return sample

    @property
    def total_steps(self) -> int:
        return self.steps_run or self.denoiser.steps

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        recorder = debug.CallRecord(x) if debug.ENABLED else None
        step = first_evaluation_step(self.denoiser, self.sampler_func)
        if not self.stopped and step is not None and in_window(step, self.total_steps, self.config):
            try:
                self.anchor(x, sigma, cond, image_cond, step)
            except Exception as error:  # noqa: BLE001 - our failure must not fail the generation
                self.stopped = True
                for image in self.images:
                    self.run.warn(image.index, f"anchoring stopped at step {step + 1}: "
                                               f"{type(error).__name__}: {error}")
                logger.exception("ELA: anchoring failed")
        if recorder is not None:
            recorder.anchored(x, step)
        denoised = self._original_forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        if recorder is not None:
            recorder.returned(denoised, float(sigma[0]))
        return denoised

    def anchor(self, x: torch.Tensor, sigma, cond, image_cond, step: int) -> None:
        """Anchor the conditional rows of every image that resolves, writing into ``x`` in place."""
        call = self.denoiser.step
        targets = [(image, self.resolved(image, text_at_step(image.schedule, call))) for image in self.images]
        targets = [(image, resolved) for image, resolved in targets if resolved is not None]
        if not targets:
            return
        positions = [image.position for image, _ in targets]
        session = self.session_for(targets)
        conds_list, text_cond = prompt_parser.reconstruct_multicond_batch(cond, call)
        # Image i's first AND sub-prompt row; the latent row is shared by all its sub-prompts.
        cond_rows = [conds_list[position][0][0] for position in positions]
        index = torch.tensor(positions, device=x.device)

        space = sampler_space(self.denoiser, float(sigma[positions[0]]), self.p.sd_model)
        with self.model.grad_scope():
            rows, row_sigma, row_text_cond, row_image_cond = self.model.grad_inputs(
                x[index], sigma[index], select_rows(text_cond, cond_rows), image_cond[index])

            def conditional_branch(latent: torch.Tensor):
                if debug.ENABLED:
                    latent = debug.inject_fault(latent, step)
                return self.model.conditional_branch(latent, row_sigma, row_text_cond, row_image_cond)

            with self.taps.get(session, contextlib.nullcontext()):
                updated = session.maybe_anchor(rows, space, step, self.total_steps, conditional_branch)
        if updated is not rows:
            x.index_copy_(0, index, updated.to(x.dtype))

    def resolved(self, image: ImageEntities, text: str) -> Optional[Resolved]:
        """The image's columns for this scheduled text (cached), or None with a warning."""
        key = (image.position, text)
        if key not in self._resolved:
            try:
                result = resolve_for_model(image.phrases, text, self.p.sd_model)
                problem = result.problem or encoders_disagree(self.p.sd_model, image.phrases, text, result)
            except EntitySpecError as error:
                result, problem = None, str(error)
            if problem:
                self.run.warn(image.index, f"{problem}: image left unanchored")
                result = None
            self._resolved[key] = result
        return self._resolved[key]

    def session_for(self, targets: list[tuple[ImageEntities, Resolved]]) -> AnchoringSession:
        """One session per set of targets: a schedule that changes the text mid-window gives the
        images new columns, and a session's targets are fixed."""
        key = tuple((image.position, resolved.columns) for image, resolved in targets)
        if key not in self.sessions:
            unet = diffusion_model(self.p.sd_model)
            capture = mmdit.joint_capture(unet, self.config) if mmdit.dit_family(unet) else None
            self.sessions[key] = AnchoringSession(unet, self.config, [resolved.columns for _, resolved in targets],
                                                  capture=capture)
            if capture is not None:
                self.taps[self.sessions[key]] = mmdit.feeding(unet, capture)
            if debug.ENABLED:
                debug.sessions.append(self.sessions[key])
        session = self.sessions[key]
        for row, (image, _) in enumerate(targets):
            self.image_sessions[image.index] = (session, row)
        return session
