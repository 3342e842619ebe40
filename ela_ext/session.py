"""One generation's anchoring: the object a host (the WebUI script, the diffusers adapter) holds from
the first sampling step to the last.

It owns what outlives a single step: the chosen layers, the entity targets per image, the loss log,
the maps for the mask grids and the warnings. A UNet's maps come from its cross-attention layers
(``capture.AttentionCapture``, found by ``config.layers``); an MM-DiT's from its joint attention,
through a ``joint_attention.JointAttentionCapture`` the host creates, hooks into its attention and
passes as ``capture`` (the host knows where its attention runs; the engine does not). Hooks and
captures are live only inside ``maybe_anchor``; any failure there (a non-finite value, out of
memory, a bug) is logged once, the latent is returned unchanged and anchoring stops for the rest of
the generation, so the image is what it would have been with ELA off from that step on. A UNet
whose cross-attention layers cannot be found is warned about once and never anchored.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from .anchoring import AnchoringError, AnchorResult, SamplerSpace, anchor_latent, in_window
from .capture import AttentionCapture, CaptureError, find_cross_attention_layers, run_truncated, weights_frozen
from .config import ElaConfig
from .joint_attention import JointAttentionCapture
from .localize import Localization
from .mask_grid import mask_grid
from .tokens import EntityColumns

logger = logging.getLogger("ela")


@dataclass
class StepLog:
    """One anchored step: the kept loss after each grad pass, the updates taken, and each image's
    masks (small booleans, kept so a benchmark can judge localisation at every step)."""

    step: int
    losses: list[float]
    updates: int
    localizations: list[Localization]


class AnchoringSession:
    """Anchors the conditional rows of one generation, step by step."""

    def __init__(self, unet: nn.Module, config: ElaConfig, targets: Sequence[EntityColumns],
                 capture: Optional[JointAttentionCapture] = None):
        """``unet``: the denoiser whose weights are frozen during grad passes (a UNet or an MM-DiT);
        ``capture``: an MM-DiT's joint-attention capture, hooked by the host; None for a UNet. An
        ``auto`` objective becomes the one chosen for that family (``ElaConfig.for_denoiser``)."""
        self.config = config.validated().for_denoiser(joint=capture is not None)
        self.targets = list(targets)
        self.steps: list[StepLog] = []
        self.warnings: list[str] = []
        self.failed = False
        self._unet = unet
        self._joint = capture
        self.layers: list[nn.Module] = []
        try:
            if capture is None:
                self.layers = [module for _, module in find_cross_attention_layers(unet, config.layers)]
        except CaptureError as error:
            # A model without cross-attention, or with a layout we cannot place (a new family).
            self.layers = []
            self.failed = True
            self.warn(f"{error}: image left unanchored")
        self._fallbacks: Counter[tuple[int, str]] = Counter()
        self._first: Optional[AnchorResult] = None
        self._last: Optional[AnchorResult] = None

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning("ELA: %s", message)

    def maybe_anchor(self, latent: torch.Tensor, space: SamplerSpace, step_index: int, total_steps: int,
                     forward: Callable[[torch.Tensor], Any], **loop_options: Any) -> torch.Tensor:
        """The latent for this step: updated inside the window, else ``latent`` itself.

        ``forward(x)`` runs the host's conditional UNet branch on ``x`` (the sampler's space, one
        row per target); the capture stops it after the last chosen layer.
        """
        if self.failed or not in_window(step_index, total_steps, self.config):
            return latent
        latent_hw = tuple(latent.shape[-2:])
        try:
            with weights_frozen(self._unet), \
                    (self._joint.capturing(latent_hw) if self._joint is not None else
                     AttentionCapture(self.layers, latent_hw, stop_after_last=True)) as capture:
                result = anchor_latent(latent, space, lambda x: run_truncated(capture, lambda: forward(x)),
                                       self.targets, self.config, **loop_options)
        except Exception as error:  # noqa: BLE001 - any failure must leave the image as if off
            self.failed = True
            self.warn(f"anchoring stopped at step {step_index + 1}, image continues unanchored: "
                      f"{type(error).__name__}: {error}{self._half_precision_hint(error, latent)}")
            return latent
        self.steps.append(StepLog(step_index, result.losses, result.updates, result.localizations))
        for row, localization in enumerate(result.localizations):
            self._fallbacks.update((row, fallback) for fallback in localization.fallbacks)
        self._first = self._first or result
        self._last = result
        return result.latent

    def _half_precision_hint(self, error: Exception, latent: torch.Tensor) -> str:
        """For a non-finite value under a half-precision UNet or latent: which dtype, what avoids it."""
        if not isinstance(error, AnchoringError):
            return ""
        module = self.layers[0] if self.layers else self._unet
        dtypes = {latent.dtype} | {parameter.dtype for parameter in module.parameters()}
        half = [name for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")) if dtype in dtypes]
        if not half:
            return ""
        return (f" (the UNet runs in {half[0]} and the value left its range; full precision, e.g. the "
                f"WebUI's --no-half, or bfloat16 instead of float16 avoid it)")

    def log_lines(self) -> list[str]:
        return [f"step {log.step + 1}: loss " + " -> ".join(f"{loss:.4f}" for loss in log.losses)
                + f" ({log.updates} updates)" for log in self.steps]

    def warnings_for(self, row: int) -> list[str]:
        """Failures, then image ``row``'s mask fallbacks with how many anchored steps took them."""
        fallbacks = [f"{message} at {count} of {len(self.steps)} anchored steps"
                     for (fallback_row, message), count in self._fallbacks.items() if fallback_row == row]
        return self.warnings + fallbacks

    def infotext_summary(self) -> str:
        """``steps=..;updates=..;first=a->b;last=c->d``: the loss at the first and last grad pass
        of the first and of the last anchored step (within a step it falls; across steps the
        latent is noisier or cleaner, so those are not comparable). No ``,`` or ``:``."""
        if not self.steps:
            return "steps=0"
        updates = sum(log.updates for log in self.steps)
        first, last = self.steps[0].losses, self.steps[-1].losses
        return (f"steps={len(self.steps)};updates={updates};"
                f"first={first[0]:.4f}->{first[-1]:.4f};last={last[0]:.4f}->{last[-1]:.4f}")

    def mask_grid(self, row: int) -> Optional[Image.Image]:
        """Image ``row``'s grid, or None if no step was anchored."""
        if self._first is None or self._last is None or self._first.maps_first is None:
            return None
        return mask_grid(self._first.maps_first[row], self._last.maps_last[row], self.targets[row],
                         self._first.localizations[row])
