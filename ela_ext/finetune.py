"""Training the cross-attention key projections once (Separate-and-Enhance's own method), so that
generation afterwards runs at plain cost with the result loaded as a LoRA.

What is trained: a change ``dW`` to ``to_k`` of the chosen cross-attention layers, low rank
(``dW = up @ down * alpha / r``, LoRA) or full rank, everything else frozen. The change lives in a
forward hook on each ``to_k`` while training; the model's weights are never written, and every hook
is removed on every exit, so the host's model is exactly as it was (byte-identical images before and
after). ``to_k`` only sees the text, so the change rewrites each token's key: which pixels a word's
query matches, at every step of every sampler.

The loss (S&E Sec. 3.3; any of the project's objectives): one UNet pass per training step on a noisy
latent ``x_t``, the attention maps of the map layers captured as at test time (``capture``), each
image's objective on them (``ela``/``ela_enhance`` with ELA's masks from the maps of the same pass,
Sec. 3.2), averaged over the batch; optionally S&E's preservation term, the mean squared difference
between the tuned and the untuned UNet's prediction on single-concept prompts. The latents follow
the paper unless the host supplies its own: ``x_0`` is Gaussian noise (no images), ``x_t`` the
forward process at ``t`` uniform in ``timesteps``. AdamW, gradient norm clipped, seeded.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .anchoring import localize_target, objective_input
from .capture import (AttentionCapture, CaptureError, cross_attention_layers, find_cross_attention_layers,
                      run_truncated, weights_frozen)
from .config import LAYER_CHOICES, OBJECTIVE_NAMES, BINARIZATION_CHOICES
from .objectives import OBJECTIVES
from .tokens import EntityColumns

TRAIN_LAYER_CHOICES = ("all",) + LAYER_CHOICES
PROJECTIONS = ("to_k", "to_q", "to_v")


class FinetuneError(RuntimeError):
    """Training could not start (the model has no cross-attention layer to train) or go on (a
    non-finite loss or gradient); nothing of it is kept."""


class TrainingCancelled(RuntimeError):
    """``should_stop`` asked training to end (the host's Interrupt); nothing of it is kept."""


@dataclass(frozen=True)
class FinetuneConfig:
    """What one training run does. ``rank`` 0 trains a full-rank change; ``layers``: which ``to_k``
    are trained ("all" cross-attention layers as the paper, or a capture choice such as
    ``up_lowest``); ``map_layers``: where the loss reads the maps (the test-time default);
    ``timesteps``: the range ``t`` is drawn from, uniformly; ``preservation``: the weight of S&E's
    prediction-preserving term on ``preservation_prompts``."""

    objective: str = "separate_enhance"
    projections: tuple[str, ...] = ("to_k",)
    objective_weight: float = 1.0
    denoising: float = 0.0
    steps: int = 200
    learning_rate: float = 1e-4
    batch_size: int = 4
    rank: int = 4
    layers: str = "all"
    map_layers: str = "up_lowest"
    preservation: float = 0.0
    seed: int = 0
    timesteps: tuple[int, int] = (0, 1000)
    grad_clip: float = 1.0
    weight_decay: float = 1e-2
    lambda_weight: float = 0.3
    binarization: str = "otsu"

    def validated(self) -> "FinetuneConfig":
        problems = []
        if self.objective not in OBJECTIVE_NAMES:
            problems.append(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVE_NAMES)}")
        if not self.projections or not set(self.projections) <= set(PROJECTIONS):
            problems.append(f"projections {self.projections!r} must be some of {', '.join(PROJECTIONS)}")
        for name in ("objective_weight", "denoising"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                problems.append(f"{name} must be a number >= 0, not {getattr(self, name)!r}")
        if self.layers not in TRAIN_LAYER_CHOICES:
            problems.append(f"layers {self.layers!r} is not one of {', '.join(TRAIN_LAYER_CHOICES)}")
        if self.map_layers not in LAYER_CHOICES:
            problems.append(f"map_layers {self.map_layers!r} is not one of {', '.join(LAYER_CHOICES)}")
        if self.binarization not in BINARIZATION_CHOICES:
            problems.append(f"binarization {self.binarization!r} is not one of {', '.join(BINARIZATION_CHOICES)}")
        if self.steps < 1 or self.batch_size < 1 or self.rank < 0:
            problems.append("steps and batch_size must be at least 1 and rank at least 0")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be a positive number, not {self.learning_rate!r}")
        if not (math.isfinite(self.preservation) and self.preservation >= 0):
            problems.append(f"preservation must be a number >= 0, not {self.preservation!r}")
        low, high = self.timesteps
        if not 0 <= low < high:
            problems.append(f"timesteps {self.timesteps!r} must be 0 <= low < high")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass
class TrainingPrompt:
    """A prompt and its entity columns, from the host's own token mapping (never fixed indices);
    ``latent``: an image of it (``x_0``, the UNet's latent space) for the denoising term."""

    prompt: str
    target: EntityColumns
    latent: Optional[torch.Tensor] = None


@dataclass
class ProjectionDelta:
    """The trained change to one projection (``name``: the module path of a ``to_k``, ``to_q`` or
    ``to_v`` in the UNet given): low rank ``up @ down * alpha / rank`` or, with ``diff``, full rank."""

    name: str
    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: float = 1.0
    diff: Optional[torch.Tensor] = None

    def weight(self) -> torch.Tensor:
        if self.diff is not None:
            return self.diff
        return self.up @ self.down * (self.alpha / self.down.shape[0])

    def file_entry(self) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor, float]":
        """What ``ela_ext.lora_file.save_lora`` writes for it: the full diff, or (down, up, alpha)."""
        return self.diff if self.diff is not None else (self.down, self.up, self.alpha)


@dataclass
class FinetuneResult:
    deltas: list[ProjectionDelta]
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


class _ProjectionChange(nn.Module):
    """The trainable change to one projection, added to its output by a forward hook."""

    def __init__(self, layer: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        out_features, in_features = layer.weight.shape
        self.rank = rank
        if rank == 0:
            self.diff = nn.Parameter(torch.zeros(out_features, in_features))
        else:
            # LoRA's start: down random (Kaiming-uniform bound), up zero, so the change starts at 0.
            bound = 1 / math.sqrt(in_features)
            self.down = nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
            self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.strength = 1.0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.float()
        delta = F.linear(x, self.diff) if self.rank == 0 else F.linear(F.linear(x, self.down), self.up)
        return delta * self.strength

    def as_delta(self, name: str) -> ProjectionDelta:
        if self.rank == 0:
            return ProjectionDelta(name, diff=self.diff.detach().cpu().clone())
        return ProjectionDelta(name, down=self.down.detach().cpu().clone(), up=self.up.detach().cpu().clone(),
                        alpha=float(self.rank))


@contextlib.contextmanager
def changes_hooked(projections: Sequence[nn.Module], changes: Sequence[nn.Module]) -> Iterator[None]:
    """Each ``change`` added to its projection's output inside the block; hooks removed on any exit."""
    handles = []
    try:
        for projection, change in zip(projections, changes):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor, change: nn.Module = change) -> torch.Tensor:
                return output + change(args[0]).to(output.dtype)
            handles.append(projection.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def trained_layers(unet: nn.Module, choice: str) -> list[tuple[str, nn.Module]]:
    """The cross-attention layers whose ``to_k`` is trained: all of them, or a capture choice."""
    return cross_attention_layers(unet) if choice == "all" else find_cross_attention_layers(unet, choice)


def paper_noisy_latents(alphas_cumprod: torch.Tensor, latent_shape: Sequence[int], timesteps: tuple[int, int]
                        ) -> Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    """S&E's training input: ``x_0`` Gaussian noise (no images), ``x_t`` the forward process
    ``sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` at ``t`` uniform in ``timesteps``."""
    def draw(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x_0 = torch.randn((batch, *latent_shape), generator=generator)
        x_t, t, _ = forward_process(x_0, alphas_cumprod, timesteps, generator)
        return x_t, t
    return draw


def forward_process(x_0: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: tuple[int, int],
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, noise)``: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise``, ``t`` uniform in ``timesteps``."""
    alphas = alphas_cumprod.detach().float().cpu()
    t = torch.randint(timesteps[0], min(timesteps[1], len(alphas)), (x_0.shape[0],), generator=generator)
    noise = torch.randn(x_0.shape, generator=generator)
    a = alphas[t].reshape(-1, *([1] * (x_0.ndim - 1)))
    return a.sqrt() * x_0 + (1 - a).sqrt() * noise, t, noise


def _batch_loss(maps: torch.Tensor, targets: Sequence[EntityColumns], config: FinetuneConfig) -> torch.Tensor:
    """The objective per image on maps (batch, columns, h, w), averaged: the test-time loss."""
    objective = OBJECTIVES[config.objective]
    losses = []
    for row, target in enumerate(targets):
        image_maps = maps[row].float()
        localization = localize_target(image_maps.detach(), target, config.binarization)
        losses.append(objective(objective_input(image_maps, target, localization, config.lambda_weight)))
    return torch.stack(losses).mean()


def train_key_projections(unet: nn.Module, denoise: Callable[[torch.Tensor, torch.Tensor, Any], Any],
                          encode: Callable[[list[str]], Any], prompts: Sequence[TrainingPrompt],
                          alphas_cumprod: torch.Tensor, latent_shape: tuple[int, int, int], config: FinetuneConfig,
                          preservation_prompts: Sequence[str] = (),
                          progress: Optional[Callable[[int, int, float], None]] = None,
                          should_stop: Optional[Callable[[], bool]] = None,
                          noisy_latents: Optional[Callable[[int, torch.Generator],
                                                           tuple[torch.Tensor, torch.Tensor]]] = None,
                          ) -> FinetuneResult:
    """Train the projections' changes and return them; ``unet`` is left exactly as it was.

    ``denoise(x_t, t, conditioning)`` runs the host's UNet on a batch and returns its prediction;
    ``encode(prompts)`` the conditioning it takes for those prompts. ``prompts`` are drawn in
    batches of ``batch_size`` (seeded); every prompt needs two entities. ``progress(step, steps,
    loss)`` after each step; ``should_stop()`` True raises ``TrainingCancelled``. ``noisy_latents
    (batch, generator) -> (x_t, t)`` replaces the paper's noise-only inputs (``paper_noisy_latents``).

    With ``config.denoising`` > 0 every prompt carries an image (``latent``), ``x_t`` is that image
    noised, and the loss adds the usual epsilon-prediction denoising error (weight ``denoising``):
    training on images rather than on attention alone, e.g. on images anchoring drew right
    (``benchmark.commands.finetune``). For epsilon-predicting models only.
    """
    config = config.validated()
    if not prompts:
        raise ValueError("no training prompts")
    too_few = [p.prompt for p in prompts if len(p.target.entities) < 2]
    if too_few:
        raise ValueError(f"a training prompt needs two entities: {too_few[0]!r}")
    if config.preservation > 0 and not preservation_prompts:
        raise ValueError("the preservation term needs preservation prompts")
    if config.denoising > 0 and any(p.latent is None for p in prompts):
        raise ValueError("the denoising term needs an image (latent) with every training prompt")
    try:
        layers = trained_layers(unet, config.layers)
        map_layers = [module for _, module in find_cross_attention_layers(unet, config.map_layers)]
    except CaptureError as error:  # e.g. an MM-DiT: joint attention, no key projection of the text alone
        raise FinetuneError(f"{error}: nothing to train; nothing was saved") from None
    generator = torch.Generator().manual_seed(config.seed)
    device = next(unet.parameters()).device
    projections = [(f"{name}.{projection}", getattr(module, projection))
                   for name, module in layers for projection in config.projections]
    changes = nn.ModuleList(_ProjectionChange(linear, config.rank, generator) for _, linear in projections).to(device)
    optimizer = torch.optim.AdamW(changes.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    draw = noisy_latents or paper_noisy_latents(alphas_cumprod, latent_shape, config.timesteps)
    result = FinetuneResult(deltas=[])
    start = time.perf_counter()
    with weights_frozen(unet), changes_hooked([linear for _, linear in projections], changes), \
            AttentionCapture(map_layers, tuple(latent_shape[-2:]), stop_after_last=True) as capture, \
            torch.enable_grad():
        for step in range(config.steps):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"training stopped at step {step} of {config.steps}; nothing was saved")
            picks = torch.randint(len(prompts), (config.batch_size,), generator=generator).tolist()
            batch = [prompts[i] for i in picks]
            with torch.no_grad():
                conditioning = encode([p.prompt for p in batch])
            if config.denoising > 0:
                x_t, t, noise = forward_process(torch.stack([p.latent for p in batch]).float(), alphas_cumprod,
                                                config.timesteps, generator)
                x_t, t = x_t.to(device), t.to(device)
                capture.stop_after_last = False  # the whole prediction is needed
                prediction = _prediction(denoise(x_t, t, conditioning))
                capture.stop_after_last = True
                maps = capture.maps
                denoising = F.mse_loss(prediction.float(), noise.to(device))
            else:
                x_t, t = draw(len(batch), generator)
                x_t, t = x_t.to(device), t.to(device)
                maps = run_truncated(capture, lambda: denoise(x_t, t, conditioning))
            loss = config.objective_weight * _batch_loss(maps, [p.target for p in batch], config)
            if config.denoising > 0:
                loss = loss + config.denoising * denoising
            if config.preservation > 0:
                loss = loss + config.preservation * _preservation_loss(
                    capture, changes, denoise, encode, preservation_prompts, x_t, t, generator)
            if not torch.isfinite(loss):
                raise FinetuneError(f"non-finite training loss at step {step + 1}; nothing was saved")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(changes.parameters(), config.grad_clip)
            if not torch.isfinite(norm):
                raise FinetuneError(f"non-finite gradient at step {step + 1}; nothing was saved")
            optimizer.step()
            result.losses.append(float(loss.detach()))
            result.steps = step + 1
            if progress is not None:
                progress(step + 1, config.steps, result.losses[-1])
    result.seconds = time.perf_counter() - start
    # A layer that runs after the last map layer never gets a gradient from the maps (the pass ends
    # before it), nor does a to_v from them: such a change is still zero and is left out.
    result.deltas = [delta for delta in (change.as_delta(name) for (name, _), change in zip(projections, changes))
                     if delta.weight().abs().max() > 0]
    return result


def _preservation_loss(capture: AttentionCapture, changes: nn.ModuleList, denoise: Callable, encode: Callable,
                       prompts: Sequence[str], x_t: torch.Tensor, t: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
    """S&E's preservation term: MSE of the tuned UNet's prediction against the untuned one's on
    single-concept prompts, at the same ``x_t`` and ``t``. Full passes: the capture's early stop
    is held off, and the untuned pass runs with every change at strength 0."""
    picks = torch.randint(len(prompts), (x_t.shape[0],), generator=generator).tolist()
    with torch.no_grad():
        conditioning = encode([prompts[i] for i in picks])
    capture.stop_after_last = False
    try:
        with torch.no_grad():
            for change in changes:
                change.strength = 0.0
            try:
                reference = _prediction(denoise(x_t, t, conditioning))
            finally:
                for change in changes:
                    change.strength = 1.0
        tuned = _prediction(denoise(x_t, t, conditioning))
    finally:
        capture.stop_after_last = True
    return F.mse_loss(tuned.float(), reference.float())


def _prediction(output: Any) -> torch.Tensor:
    """A UNet's output tensor (diffusers returns an object with ``sample``)."""
    return output.sample if hasattr(output, "sample") else output
