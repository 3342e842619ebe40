"""The anchoring loop (ELA Alg. 1, Eq. 8): masks once per anchored step, then gradient steps on
``z_t`` until the loss is below the threshold or the iterations run out.

Samplers hold the latent in different spaces (method.md "Latent update"): k-diffusion samplers
hold ``x`` with ``z_t = c_in * x``, ``c_in = 1 / sqrt(sigma^2 + 1)``; DDIM/PLMS/UniPC hold ``z_t``;
flow-matching models (SD3, Flux: ``x_t = (1 - sigma) x_0 + sigma * noise``, ``sigma`` in [0, 1],
the model predicting the velocity ``noise - x_0``) are sampled on ``x_t`` itself, which the model
sees as it is (``SamplerSpace.from_flow_sigma``). The step is taken in the model-input space and
converted back, so one setting means the same under every sampler. Its size is normalised (a
decision, see ``latent_step``) so it means the same on every model: raw latent-gradient norms
differ by orders of magnitude between a small model and SD. The anchoring window is in fractions
of the steps run for every family (``in_window``), flow models included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .config import ElaConfig
from .localize import Localization, localize, word_map
from .objectives import OBJECTIVES, ObjectiveInput
from .tokens import EntityColumns


class AnchoringError(RuntimeError):
    """The loop could not run (non-finite maps, loss or gradient); the latent was left alone."""


@dataclass(frozen=True)
class SamplerSpace:
    """Where the sampler's latent lives. ``sigma`` is the noise level as a k-diffusion sigma
    (for timestep samplers it is derived from ``alphas_cumprod``: ``sqrt((1 - a) / a)``)."""

    kind: str
    sigma: float

    @classmethod
    def from_sigma(cls, sigma: float) -> "SamplerSpace":
        return cls("sigma", float(sigma))

    @classmethod
    def from_timestep(cls, timestep: float, alphas_cumprod: torch.Tensor) -> "SamplerSpace":
        """A discrete (possibly fractional) UNet timestep; ``alpha_bar`` is interpolated."""
        alphas = alphas_cumprod.detach().double().cpu()
        position = min(max(float(timestep), 0.0), len(alphas) - 1.0)
        low = int(math.floor(position))
        high = min(low + 1, len(alphas) - 1)
        alpha_bar = float(alphas[low] + (alphas[high] - alphas[low]) * (position - low))
        return cls("timestep", math.sqrt((1 - alpha_bar) / alpha_bar))

    @classmethod
    def from_flow_sigma(cls, sigma: float) -> "SamplerSpace":
        """A flow-matching (rectified flow) noise level: ``x_t = (1 - sigma) x_0 + sigma * noise``,
        the sampler's latent is the model's input (``c_in`` = 1)."""
        return cls("flow", float(sigma))

    @property
    def c_in(self) -> float:
        return 1.0 / math.sqrt(self.sigma ** 2 + 1) if self.kind == "sigma" else 1.0

    @property
    def noise_fraction(self) -> float:
        """``sqrt(1 - alpha_bar_t)``: Attend-and-Excite's step schedule factor, the noise's share
        of the model input's scale. For a flow latent the variance-preserving latent of the same
        signal-to-noise ratio is ``x_t / sqrt((1 - sigma)^2 + sigma^2)``, whose noise share is
        ``sigma / sqrt((1 - sigma)^2 + sigma^2)`` (1 at full noise, as for SD)."""
        if self.kind == "flow":
            return self.sigma / max(math.sqrt((1 - self.sigma) ** 2 + self.sigma ** 2), 1e-12)
        return self.sigma / math.sqrt(self.sigma ** 2 + 1)

    def to_unet_input(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.c_in

    def from_unet_input(self, z_t: torch.Tensor) -> torch.Tensor:
        return z_t / self.c_in


def unanchorable_reason(target: EntityColumns) -> Optional[str]:
    """Why ``target`` cannot be anchored, or None: ELA's masks come from entities dominating
    each other (Sec. 3.2), so it needs at least two entities."""
    count = len(target.entities)
    return None if count >= 2 else f"ELA needs at least two entities, found {count}"


def in_window(step_index: int, total_steps: int, config: ElaConfig) -> bool:
    """Whether sampling step ``step_index`` (0-based) of ``total_steps`` is anchored."""
    if total_steps <= 0:
        return False
    fraction = step_index / total_steps
    return config.window_start <= fraction < config.window_end


def latent_step(grad: torch.Tensor, step_size: float, noise_fraction: float) -> torch.Tensor:
    """Eq. 8's ``eta * grad``, per image: the gradient scaled to RMS ``step_size * sqrt(1 - a_t)``.

    A&E's ``eta = scale * sqrt(1 - alpha_bar_t)`` with the gradient normalised by its RMS, so
    ``step_size`` is the RMS change of ``z_t`` per iteration at full noise on any model (a fixed
    scale did nothing on a small model, gradient norms ~1e-3, and would be huge on SD).

    Normalised at EVERY iteration, so each of a step's updates is full-size: measured better than
    the "subtle adjustments" the paper's text suggests. Tried and rejected: ``eta`` fixed per step
    from its first gradient (later updates shrink with the gradient) with an update that raised the
    loss undone. With ``ela_enhance`` on the benchmark's development prompts (288 images, off 1.4%
    both correct) it gave 5.6% against 10.1% for this rule; on the 192 reported images of the
    README, 14.6% (27 fixed / 4 broken, kept 20%) against 28.6% (51 / 1, kept 80%). Smaller pushes
    fixed less and did not keep more: on 19 development images right without anchoring
    (``benchmark.studies.kept``) steps 0.025-0.2 kept 0-2, and at 0.001 the gradient direction still moved
    their pixels 8.2% (kept 1) where a random direction of that size moved them 0.7% (kept 14):
    the loss gradient is the direction the early layout is most sensitive to.
    """
    rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    shape = (-1,) + (1,) * (grad.ndim - 1)
    return grad / rms.reshape(shape) * (step_size * noise_fraction)


def objective_input(maps: torch.Tensor, target: EntityColumns, localization: Localization,
                    lambda_weight: float) -> ObjectiveInput:
    """One image's words (entities, then each one's attributes) with their entity's mask."""
    word_maps, word_masks, word_entity = [], [], []
    for index, entity in enumerate(target.entities):
        mask = localization.entity_masks[index].to(maps.dtype)
        for columns in [entity.columns] + [attribute.columns for attribute in entity.attributes]:
            word_maps.append(word_map(maps, columns))
            word_masks.append(mask)
            word_entity.append(index)
    text_share = 1 - maps[list(target.sot_columns)].sum(0)
    return ObjectiveInput(torch.stack(word_maps), torch.stack(word_masks), word_entity, text_share, lambda_weight,
                          maps, target)


def localize_target(maps: torch.Tensor, target: EntityColumns, binarization: str) -> Localization:
    entity_maps = torch.stack([word_map(maps, entity.columns) for entity in target.entities])
    sot_map = maps[list(target.sot_columns)].mean(0)
    return localize(entity_maps, sot_map, [entity.word for entity in target.entities], binarization)


@dataclass
class AnchorResult:
    """The updated latent (the sampler's space) and what happened, per anchored step.

    ``losses[i]``: the mean loss over images at the i-th grad pass (before its update);
    ``maps_first`` / ``maps_last``: (batch, columns, h, w) at the first and last grad pass.
    """

    latent: torch.Tensor
    losses: list[float] = field(default_factory=list)
    updates: int = 0
    localizations: list[Localization] = field(default_factory=list)
    maps_first: Optional[torch.Tensor] = None
    maps_last: Optional[torch.Tensor] = None


def anchor_latent(latent: torch.Tensor, space: SamplerSpace, grad_pass: Callable[[torch.Tensor], torch.Tensor],
                  targets: Sequence[EntityColumns], config: ElaConfig, direction: str = "gradient",
                  generator: Optional[torch.Generator] = None) -> AnchorResult:
    """Anchor one sampling step (Alg. 1, steps 4-11) for a batch of images.

    ``latent``: the sampler's own latent, one row per image in ``targets``. ``grad_pass(x)`` runs
    the conditional UNet branch on ``x`` (same space) and returns maps (batch, columns, h, w) with
    a graph to ``x``. Masks come from the first pass and stay fixed for the step. Images already
    below the threshold take no further update. ``direction="random"`` is the benchmark's control:
    a step of the same size in a random direction. Raises ``AnchoringError`` on a non-finite map,
    loss or gradient; the caller keeps its latent. ``config.objective`` must name an objective: ``auto``
    depends on the denoiser's family, which ``ElaConfig.for_denoiser`` (the session) resolves.
    """
    if latent.shape[0] != len(targets):
        raise ValueError(f"{latent.shape[0]} latent rows but {len(targets)} entity targets")
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective {config.objective!r} is not resolved: ElaConfig.for_denoiser names one per family")
    objective = OBJECTIVES[config.objective]
    z_t = space.to_unet_input(latent.detach().float())
    result = AnchorResult(latent=latent)
    for _ in range(config.max_iterations):
        leaf = z_t.detach().requires_grad_(True)
        with torch.enable_grad():
            maps = grad_pass(space.from_unet_input(leaf).to(latent.dtype)).float()
            if not torch.isfinite(maps).all():
                raise AnchoringError("non-finite cross-attention maps")
            if not result.localizations:
                result.localizations = [localize_target(maps[row].detach(), target, config.binarization)
                                        for row, target in enumerate(targets)]
                result.maps_first = maps.detach()
            per_image = torch.stack([
                objective(objective_input(maps[row], target, result.localizations[row], config.lambda_weight))
                for row, target in enumerate(targets)])
            total = per_image.sum()  # inside: under a host's no_grad a sum outside has no graph
        result.maps_last = maps.detach()
        if not torch.isfinite(per_image).all():
            raise AnchoringError("non-finite anchoring loss")
        result.losses.append(float(per_image.detach().mean()))
        active = per_image.detach() >= config.loss_threshold
        if not active.any():
            break
        if direction == "random":
            grad = torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device)
        else:
            (grad,) = torch.autograd.grad(total, [leaf])
        if not torch.isfinite(grad).all():
            raise AnchoringError("non-finite latent gradient")
        step = latent_step(grad, config.step_size, space.noise_fraction)
        step = step * active.to(step.dtype).reshape((-1,) + (1,) * (step.ndim - 1))
        z_t = leaf.detach() - step
        result.updates += 1
    result.latent = space.from_unet_input(z_t).to(latent.dtype) if result.updates else latent
    return result
