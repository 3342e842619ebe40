"""Anchoring inside ComfyUI's own sampling: two wrappers on a cloned ModelPatcher.

Why these two (``comfy/samplers.py``, ``comfy/patcher_extension.py``):

- ``SAMPLER_SAMPLE`` wraps one sampler run. It sees the schedule (``sigmas``), the guider with
  its processed conditionings and the sampler's function, so the run's checks happen there
  once, and its ``finally`` ends the run whatever happens (an interrupt, an exception): the UNet's
  weights are given back and the report is written. Nothing of a run outlives it.
- ``PREDICT_NOISE`` wraps every model evaluation with the sampler's own ``x`` (KSampler,
  KSamplerAdvanced and SamplerCustom all sample through ``CFGGuider``). On the first evaluation of
  an anchored step (``steps.StepCounter``) the engine updates the conditional rows and the result
  is written into ``x`` in place, so both this evaluation and the sampler's update continue from
  it (as ``ela_webui.sampling`` does in the WebUI).

The grad pass runs the positive conditioning through ``calc_cond_batch`` exactly as the sampler
does (SDXL's pooled ``y`` included), stopped after the last captured layer. ComfyUI samples under
``torch.inference_mode()``: its weights, latents and conditionings are inference tensors, which
autograd refuses to save, so the pass runs under ``inference_mode(False)`` on clones of the latent
and sigma, with the UNet's inference Parameters swapped for normal clones for the run
(``NormalWeights``) and with ComfyUI's attention forced to PyTorch's (backward-capable on every
device) through ``optimized_attention_override``.

ComfyUI's k-diffusion samplers hold ``x`` with ``z_t = x / sqrt(sigma^2 + 1)`` for every eps and
v-prediction model (``model_sampling.calculate_input``), so the engine's ``SamplerSpace.from_sigma``
is the space; for flow-matching models (``CONST``: SD3, Flux) they hold ``x_t`` itself,
``SamplerSpace.from_flow_sigma``; a model whose sampling is anything else (x0, ...) is left
unanchored.

MM-DiT models (SD3's ``MMDiT``, Flux) have no cross-attention layer: their maps come from the
text-to-image part of the joint attention of the blocks ``config.joint_blocks`` chooses
(``ela_ext.joint_attention``). For the grad pass only, each chosen block is replaced through
``patches_replace["dit"][("double_block", i)]`` (as ComfyUI's ``nodes_slg.py`` does; a replacement
already there is called inside ours) by the original block run with an
``optimized_attention_override`` that hands the block's joint queries and keys to the capture and
then runs PyTorch's attention. Sampling itself never sees these patches, so the images of
unanchored evaluations are those of the unpatched model, and Flux's guidance-distilled models at
cfg 1 (no unconditional batch) anchor as any other: the pass needs only the positive conditioning.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.attention import attention_pytorch
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

from ela_ext.anchoring import SamplerSpace, in_window
from ela_ext.config import ElaConfig
from ela_ext.joint_attention import JointAttentionCapture, choose_blocks
from ela_ext.session import AnchoringSession
from ela_ext.tokens import EntityColumns

from .report import RunReport
from .steps import StepCounter

WRAPPER_KEY = "ela_anchoring"
WRAPPER_TYPES = (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, comfy.patcher_extension.WrappersMP.PREDICT_NOISE)
logger = logging.getLogger("ela")


class NormalWeights:
    """The module's inference-tensor Parameters and buffers replaced by normal clones (same
    values, ``requires_grad=False``) until ``restore``, which puts the originals back.

    ``unused``: submodules the truncated grad pass never runs, left as they are: an MM-DiT's
    blocks after the last one read (and Flux's single-stream blocks) are most of its weights,
    and a clone of them would only cost memory."""

    def __init__(self, module: nn.Module, unused: Sequence[nn.Module] = ()):
        self.module = module
        self._unused = {id(inner) for outer in unused for inner in outer.modules()}
        self._originals: list[tuple[nn.Module, str, bool, torch.Tensor]] = []

    def swap_in(self) -> None:
        with torch.inference_mode(False):
            for owner in self.module.modules():
                if id(owner) in self._unused:
                    continue
                for name, parameter in list(owner._parameters.items()):
                    if parameter is not None and parameter.is_inference():
                        self._originals.append((owner, name, True, parameter))
                        owner._parameters[name] = nn.Parameter(parameter.clone(), requires_grad=False)
                for name, buffer in list(owner._buffers.items()):
                    if buffer is not None and buffer.is_inference():
                        self._originals.append((owner, name, False, buffer))
                        owner._buffers[name] = buffer.clone()

    def restore(self) -> None:
        while self._originals:
            owner, name, is_parameter, original = self._originals.pop()
            (owner._parameters if is_parameter else owner._buffers)[name] = original


def backward_capable(model_options: dict) -> dict:
    """A copy of the evaluation's options whose attention is PyTorch's own (see module doc)."""
    options = comfy.model_patcher.create_model_options_clone(model_options)
    options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        lambda _function, *args, **kwargs: attention_pytorch(*args, **kwargs)
    return options


def joint_blocks(diffusion_model: nn.Module) -> Optional[nn.ModuleList]:
    """An MM-DiT's joint-attention blocks (SD3's ``joint_blocks``, Flux's ``double_blocks``), or None."""
    if isinstance(diffusion_model, MMDiT):
        return diffusion_model.joint_blocks
    if isinstance(diffusion_model, Flux):
        return diffusion_model.double_blocks
    return None


def unused_by_grad_pass(diffusion_model: nn.Module, capture: JointAttentionCapture) -> list[nn.Module]:
    """What a truncated joint grad pass never runs: the joint blocks after the last one read,
    Flux's single-stream blocks and the final layer (the pass stops inside the last read block)."""
    blocks = joint_blocks(diffusion_model)
    unused = list(blocks[max(capture.blocks) + 1:]) if blocks is not None else []
    return unused + [module for name in ("single_blocks", "final_layer")
                     if isinstance(module := getattr(diffusion_model, name, None), nn.Module)]


def recording_block(block: int, capture: JointAttentionCapture, previous: Any, diffusion_model: nn.Module) -> Any:
    """A ``("double_block", block)`` replacement: the block (or the replacement ``previous``) run
    with an attention override that hands its joint queries and keys to ``capture`` first.

    SD3's block, when replaced, is run by ComfyUI under ``torch.utils.checkpoint`` (its
    ``block_wrap`` leaves ``use_checkpoint`` at its default, True), whose recomputation in the
    backward pass would not repeat a capture that stopped the forward; so the block runs here
    without it, as the unreplaced blocks of a sampling run do."""
    def replacement(args: dict, extra: dict) -> dict:
        n_text, n_image = args["txt"].shape[1], args["img"].shape[1]

        def attention(_function, query, key, *rest, **kwargs):
            heads = None if kwargs.get("skip_reshape") else kwargs.get("heads", rest[1] if len(rest) > 1 else None)
            capture.record(block, query, key, n_text, heads, n_image)
            return attention_pytorch(query, key, *rest, **kwargs)

        original = extra["original_block"]
        if isinstance(diffusion_model, MMDiT):
            def original(block_args: dict) -> dict:
                txt, img = diffusion_model.joint_blocks[block](
                    block_args["txt"], block_args["img"], c=block_args["vec"], use_checkpoint=False,
                    transformer_options=block_args["transformer_options"])
                return {"txt": txt, "img": img}

        options = dict(args["transformer_options"], optimized_attention_override=attention)
        args = dict(args, transformer_options=options)
        return previous(args, dict(extra, original_block=original)) if previous is not None else original(args)
    return replacement


def joint_capture_options(options: dict, capture: JointAttentionCapture, diffusion_model: nn.Module) -> dict:
    """``options`` (already a copy) with the chosen blocks replaced by ``recording_block``s."""
    transformer_options = options.setdefault("transformer_options", {})
    replace = dict(transformer_options.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    for block in capture.blocks:
        dit[("double_block", block)] = recording_block(block, capture, dit.get(("double_block", block)),
                                                       diffusion_model)
    replace["dit"] = dit
    transformer_options["patches_replace"] = replace
    return options


def sampler_space(sampling: Any, sigma: float) -> Optional[SamplerSpace]:
    """The space ComfyUI's samplers hold the latent in for this model, or None if not supported."""
    calculate_input = type(sampling).calculate_input
    if calculate_input is comfy.model_sampling.EPS.calculate_input \
            and float(getattr(sampling, "sigma_data", 1.0)) == 1.0:
        return SamplerSpace.from_sigma(sigma)
    if calculate_input is comfy.model_sampling.CONST.calculate_input:
        return SamplerSpace.from_flow_sigma(sigma)
    return None


def unanchorable_run(guider: Any, prompt_cond: torch.Tensor, extra_args: dict) -> Optional[str]:
    """Why this sampler run cannot be anchored as the node was told, or None."""
    sampling = guider.inner_model.model_sampling
    if sampler_space(sampling, 1.0) is None:
        return f"this model's sampling ({type(sampling).__name__}) is not eps, v-prediction or flow matching"
    if extra_args.get("denoise_mask") is not None:
        return "a noise mask (inpainting) is set: the sampler's latent is mixed before each evaluation"
    positive = getattr(guider, "conds", {}).get("positive")
    if not positive:
        return "the sampler has no positive conditioning"
    if len(positive) != 1:
        return f"the positive conditioning has {len(positive)} parts (combined or area conditioning)"
    cond = positive[0]
    if cond.get("area") is not None or cond.get("mask") is not None:
        return "the positive conditioning has an area or a mask"
    cross_attn = cond.get("cross_attn")
    if cross_attn is None or cross_attn.shape != prompt_cond.shape or not torch.allclose(
            cross_attn.float(), prompt_cond.to(cross_attn.device).float(), rtol=1e-3, atol=1e-4):
        return "the sampler's positive conditioning is not this node's prompt (connect the same text and CLIP)"
    return None


class AnchoredRun:
    """One sampler run of a patched model: its step counter, its session, its weights."""

    def __init__(self, patch: "AnchoringPatch", guider: Any, sigmas: torch.Tensor, extra_args: dict,
                 sampler: Any, batch: int):
        self.report = patch.report
        function = getattr(sampler, "sampler_function", None)
        eta = float(getattr(sampler, "extra_options", {}).get("eta", 1.0))
        self.counter = StepCounter(getattr(function, "__name__", ""), sigmas.tolist(), eta)
        self.warnings: list[str] = []
        self.session: Optional[AnchoringSession] = None
        diffusion_model = guider.inner_model.diffusion_model
        self.weights = NormalWeights(diffusion_model)
        problem = unanchorable_run(guider, patch.prompt_cond, extra_args)
        if problem:
            self.warn(f"{problem}: image left unanchored")
        else:
            self.positive = guider.conds["positive"]
            self.sampling = guider.inner_model.model_sampling
            blocks = joint_blocks(diffusion_model)
            self.capture = None if blocks is None else JointAttentionCapture(
                choose_blocks(len(blocks), patch.config.joint_blocks))
            if self.capture is not None:
                self.weights = NormalWeights(diffusion_model, unused_by_grad_pass(diffusion_model, self.capture))
            self.session = AnchoringSession(diffusion_model, patch.config, [patch.columns] * batch,
                                            capture=self.capture)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning("ELA: %s", message)

    def evaluation(self, guider: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict) -> None:
        """Anchor ``x`` in place if this evaluation starts a step inside the window."""
        step = self.counter.first_evaluation(float(timestep[0]))
        session = self.session
        if step is None or session is None or session.failed \
                or not in_window(step, self.counter.total_steps, session.config):
            return
        with torch.inference_mode(False):
            self.weights.swap_in()
            latent, sigma = x.clone(), timestep.clone()
            options = backward_capable(model_options)
            if self.capture is not None:
                options = joint_capture_options(options, self.capture, guider.inner_model.diffusion_model)

            def conditional_branch(rows: torch.Tensor) -> Any:
                return comfy.samplers.calc_cond_batch(guider.inner_model, [self.positive], rows, sigma, options)

            updated = session.maybe_anchor(latent, sampler_space(self.sampling, float(sigma[0])), step,
                                           self.counter.total_steps, conditional_branch)
        if updated is not latent:
            x.copy_(updated.to(x.dtype))

    def stop(self, error: Exception) -> None:
        """An error in this glue (the engine catches its own): no more anchoring in this run."""
        logger.exception("ELA: anchoring failed")
        self.warn(f"anchoring stopped: {type(error).__name__}: {error}")
        if self.session is not None:
            self.session.failed = True  # the steps already anchored keep their effect and log

    def close(self, interrupted: Optional[BaseException]) -> None:
        """Give the weights back and write the report (also after an interrupt or an error)."""
        self.weights.restore()
        if interrupted is not None:
            self.warn(f"sampling stopped ({type(interrupted).__name__}) before the run ended")
        session = self.session
        warnings = self.warnings + (session.warnings_for(0) if session else [])
        summary = session.infotext_summary() if session else "steps=0"
        self.report.record_run(summary, session.log_lines() if session else [], warnings,
                               session.mask_grid(0) if session else None)


class AnchoringPatch:
    """The node's settings and columns, and the two wrappers that use them (see module doc)."""

    def __init__(self, config: ElaConfig, columns: EntityColumns, prompt_cond: torch.Tensor, report: RunReport):
        self.config = config
        self.columns = columns
        self.prompt_cond = prompt_cond
        self.report = report
        self.run: Optional[AnchoredRun] = None

    def apply(self, model: Any) -> Any:
        """A clone of ``model`` with this patch's wrappers (an earlier ELA node's replaced)."""
        patched = model.clone()
        for wrapper_type, wrapper in zip(WRAPPER_TYPES, (self.sampler_sample, self.predict_noise)):
            patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
            patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
        return patched

    def sampler_sample(self, executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        try:
            run: Optional[AnchoredRun] = AnchoredRun(self, guider, sigmas, extra_args, executor.class_obj,
                                                     noise.shape[0])
        except Exception as error:  # noqa: BLE001 - our failure must not fail the sampling
            logger.exception("ELA: could not start anchoring")
            self.report.record_run("steps=0", [], [f"anchoring not started: {type(error).__name__}: {error}"], None)
            run = None
        self.run = run
        stopped: Optional[BaseException] = None
        try:
            return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)
        except BaseException as error:
            stopped = error
            raise
        finally:
            self.run = None
            if run is not None:
                run.close(stopped)

    def predict_noise(self, executor, x, timestep, model_options, seed):
        if self.run is not None:
            try:
                self.run.evaluation(executor.class_obj, x, timestep, model_options)
            except Exception as error:  # noqa: BLE001 - our failure must not fail the sampling
                self.run.stop(error)
        return executor(x, timestep, model_options, seed)
