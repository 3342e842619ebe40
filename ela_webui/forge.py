"""The grad pass inside Forge (lllyasviel/stable-diffusion-webui-forge), whose sampling differs from
AUTOMATIC1111's in three ways that matter here (host.md "Grad and precision", measured in Forge):

1. Forge loads and samples under ``torch.inference_mode()``: its UNet weights, the latent and the
   conditioning are inference tensors, which autograd refuses to save. The weights are replaced by
   normal clones (``requires_grad=False``, same values) the first time a grad pass meets them, and
   again only if Forge puts inference tensors back (a model reload, LoRA patching); the inputs are
   cloned per pass. The pass runs under ``inference_mode(False)``.
2. Forge's transformer block adds in place (``x += n``) after a LayerNorm saved ``x``, so a
   backward raises "modified by an inplace operation". Autograd's saved activations are cloned
   as they are saved (a pack hook that did not clone would only silence the check and give wrong
   gradients); weights are never written, so they are kept as they are.
3. The UNet sits behind Forge's patcher (``forge_objects.unet``): ``KModel.apply_model`` takes a
   k-diffusion sigma and the conditioning as keyword tensors, with ``transformer_options`` that
   other extensions' patches read.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from backend import memory_management
from backend.sampling.sampling_function import compute_cond_indices, compute_cond_mark
from modules.sd_samplers_timesteps import CFGDenoiserTimesteps


def replace_inference_weights(module: nn.Module) -> None:
    """Give ``module`` normal clones of its inference-tensor parameters and buffers. Quantised
    parameter types (GGUF, bitsandbytes) are left alone (untried: should a grad pass through them
    fail, the session stops anchoring and warns, as for any failure)."""
    with torch.inference_mode(False):
        for owner in module.modules():
            for name, parameter in list(owner.named_parameters(recurse=False)):
                if type(parameter) is nn.Parameter and parameter.is_inference():
                    setattr(owner, name, nn.Parameter(parameter.clone(), requires_grad=False))
            for name, buffer in list(owner.named_buffers(recurse=False)):
                if buffer is not None and buffer.is_inference():
                    owner._buffers[name] = buffer.clone()


def _save_a_copy(tensor: torch.Tensor) -> torch.Tensor:
    """Autograd's pack hook: a snapshot of what it saves, so a later ``x += n`` cannot change it."""
    return tensor if isinstance(tensor, nn.Parameter) else tensor.clone()


def _as_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def grad_scope(unet: nn.Module) -> Iterator[None]:
    """Where a grad pass (or a training step) can run on Forge's UNet (see the module doc)."""
    with torch.inference_mode(False), torch.autograd.graph.saved_tensors_hooks(_save_a_copy, _as_saved):
        # At each pass: Forge may have put inference tensors back (reload, LoRA) since the last.
        replace_inference_weights(unet)
        yield


def prepare_unet(sd_model) -> None:
    """Load the UNet (and the LoRA patches of the last generation) onto the compute device, as
    Forge's ``sampling_prepare`` does before sampling; the text encoder may have displaced it."""
    memory_management.load_model_gpu(sd_model.forge_objects.unet)


def _clone(value):
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    return value.clone() if isinstance(value, torch.Tensor) else value


class ForgeModel:
    """The conditional UNet branch through Forge's patcher, for one sampling pass."""

    def __init__(self, p, denoiser):
        self.sd_model = p.sd_model
        # Forge's timestep samplers (DDIM, PLMS, UniPC) hand the denoiser z_t and a UNet timestep;
        # its CFGDenoiser converts them to k-diffusion's x and sigma, and so does the grad pass.
        self.timestep_sampler = isinstance(denoiser, CFGDenoiserTimesteps)

    def grad_scope(self) -> contextlib.AbstractContextManager:
        return grad_scope(self.sd_model.forge_objects.unet.model.diffusion_model)

    def grad_inputs(self, latent, sigma, text_cond, image_cond):
        """Normal-tensor copies of this call's inference tensors; call inside ``grad_scope``."""
        return _clone(latent), _clone(sigma), _clone(text_cond), _clone(image_cond)

    def conditional_branch(self, latent: torch.Tensor, sigma: torch.Tensor, text_cond,
                           image_cond: Optional[torch.Tensor]) -> torch.Tensor:
        """``KModel.apply_model`` on the conditional rows, as Forge's ``calc_cond_uncond_batch``
        calls it for a batch that holds only conditional rows."""
        # Read at each call, as Forge's CFGDenoiser does: a later script, or Forge's hires pass,
        # may put a patcher clone (same modules, other patches) on forge_objects.
        patcher = self.sd_model.forge_objects.unet
        if self.timestep_sampler:
            alphas = self.sd_model.alphas_cumprod.to(sigma.device)
            sigma = (((1 - alphas) / alphas) ** 0.5)[sigma.round().long()]
            latent = latent * ((sigma ** 2 + 1) ** 0.5)[:, None, None, None]
        options = dict(patcher.model_options.get("transformer_options", {}))
        options["cond_or_uncond"] = [0]
        options["sigmas"] = sigma
        options["cond_mark"] = compute_cond_mark(cond_or_uncond=[0], sigmas=sigma)
        options["cond_indices"], options["uncond_indices"] = compute_cond_indices(cond_or_uncond=[0], sigmas=sigma)
        conditioning = ({"c_crossattn": text_cond["crossattn"], "y": text_cond["vector"]}
                        if isinstance(text_cond, dict) else {"c_crossattn": text_cond})
        if isinstance(text_cond, dict) and "guidance" in text_cond:  # Flux dev's distilled guidance
            conditioning["guidance"] = text_cond["guidance"]
        # Forge feeds the image conditioning only to models that take one (inpainting): there it
        # matches the latent's batch and size; txt2img gives the others a 1x1 placeholder.
        if isinstance(image_cond, torch.Tensor) and image_cond.shape[0] == latent.shape[0] \
                and image_cond.shape[2:] == latent.shape[2:]:
            conditioning["c_concat"] = image_cond
        return patcher.model.apply_model(latent, sigma, transformer_options=options, **conditioning)
