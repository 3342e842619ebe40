"""Objectives on one image's attention maps: ELA (Eqs. 5-7) and the related papers' losses.

Each objective takes an ``ObjectiveInput`` and returns a scalar tensor to MINIMISE, in [0, 1]
for every objective so that the loss threshold means the same for each. They share the capture,
the localisation and the update loop (method.md "Further objectives").
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .tokens import EntityColumns

_EPS = 1e-8


@dataclass
class ObjectiveInput:
    """One image's maps. ``word_maps``: (m, h, w), one per entity or attribute word;
    ``word_masks``: (m, h, w) float, an attribute carrying its entity's mask (method.md 5);
    ``word_entity[i]``: the entity index word i belongs to; ``text_share``: (h, w) the attention
    mass on all non-start-of-text columns, used to renormalise over text like Attend-and-Excite;
    ``column_maps``: (columns, h, w) every column's map and ``target`` the row's columns, for an
    objective that needs more than the words' maps (A&E's own softmax over the text tokens)."""

    word_maps: torch.Tensor
    word_masks: torch.Tensor
    word_entity: Sequence[int]
    text_share: torch.Tensor
    lambda_weight: float = 0.3
    column_maps: Optional[torch.Tensor] = None
    target: Optional[EntityColumns] = None

    def entity_maps(self) -> torch.Tensor:
        """Each entity's own map (its first word is the entity word itself)."""
        firsts = [self.word_entity.index(e) for e in sorted(set(self.word_entity))]
        return self.word_maps[firsts]


def concentration_loss(word_maps: torch.Tensor, word_masks: torch.Tensor) -> torch.Tensor:
    """ELA Eq. 5: ``1/n sum_e (1 - sum(M_e A_e) / sum(A_e))^2``."""
    inside = (word_masks * word_maps).flatten(1).sum(1)
    total = word_maps.flatten(1).sum(1).clamp_min(_EPS)
    return ((1 - inside / total) ** 2).mean()


def attenuation_loss(word_maps: torch.Tensor, word_masks: torch.Tensor) -> torch.Tensor:
    """ELA Eq. 6: ``1/n sum_e ||(1 - M_e) A_e||_2^2``, on maps divided by their peak and averaged
    over pixels (a decision: raw probabilities are ~1/77 and their squared norm depends on the
    map's size, so lambda would mean something different on every model and resolution)."""
    peak = word_maps.flatten(1).amax(1).clamp_min(_EPS)[:, None, None]
    outside = (1 - word_masks) * word_maps / peak
    return (outside ** 2).flatten(1).mean(1).mean()


def ela_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """ELA Eq. 7: ``(1 - lambda) Lc + lambda La``."""
    concentration = concentration_loss(inputs.word_maps, inputs.word_masks)
    attenuation = attenuation_loss(inputs.word_maps, inputs.word_masks)
    return (1 - inputs.lambda_weight) * concentration + inputs.lambda_weight * attenuation


def _text_normalized(inputs: ObjectiveInput, maps: torch.Tensor) -> torch.Tensor:
    """Maps as a share of the attention paid to text, excluding start-of-text (A&E's softmax
    over text tokens only, without its x100 temperature)."""
    return maps / inputs.text_share.clamp_min(_EPS)


def _spatial_distributions(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(1).sum(1).clamp_min(_EPS)[:, None, None]


def attend_excite_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """Attend-and-Excite: ``max_e (1 - max_pixels A_e)``, the most neglected entity's peak."""
    peaks = _text_normalized(inputs, inputs.entity_maps()).flatten(1).amax(1).clamp(0, 1)
    return (1 - peaks).max()


def gaussian_smooth(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """A&E's smoothing before the max: a 3x3 Gaussian (sigma 0.5), reflect padding. (n, h, w)."""
    coords = torch.arange(3, dtype=maps.dtype, device=maps.device) - 1
    kernel_1d = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :])[None, None]
    mode = "reflect" if min(maps.shape[-2:]) > 1 else "replicate"
    padded = F.pad(maps[:, None], (1, 1, 1, 1), mode=mode)
    return F.conv2d(padded, kernel)[:, 0]


def attend_excite_paper_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """Attend-and-Excite as its paper computes it: each pixel's attention over the prompt's text
    tokens times 100, softmax over those tokens; each entity's map Gaussian-smoothed; the loss
    ``max_e (1 - max_pixels A_e)``. The shared loop runs instead of its refinement schedule."""
    if inputs.column_maps is None or inputs.target is None or not inputs.target.text_columns:
        raise ValueError("attend_excite_paper needs every column's map and the prompt's text-token columns")
    text_columns = inputs.target.text_columns
    row = {column: index for index, column in enumerate(text_columns)}
    text_probabilities = torch.softmax(100 * inputs.column_maps[list(text_columns)], dim=0)
    entities = torch.stack([text_probabilities[[row[c] for c in entity.columns]].mean(0)
                            for entity in inputs.target.entities])
    peaks = gaussian_smooth(entities).flatten(1).amax(1)
    return (1 - peaks).max()


def _pairs(n: int) -> list[tuple[int, int]]:
    return list(combinations(range(n), 2)) or [(0, 0)]


def iou_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """Attention-overlap paper: soft IoU ``sum min(p_i, p_j) / sum max(p_i, p_j)`` over pairs."""
    dists = _spatial_distributions(inputs.entity_maps())
    if dists.shape[0] < 2:
        return dists.new_zeros(())
    values = [torch.minimum(dists[i], dists[j]).sum() / torch.maximum(dists[i], dists[j]).sum().clamp_min(_EPS)
              for i, j in _pairs(dists.shape[0])]
    return torch.stack(values).mean()


def _centres(dists: torch.Tensor) -> torch.Tensor:
    """Centre of mass of each distribution, in [0, 1] image coordinates, (n, 2) as (y, x)."""
    h, w = dists.shape[-2:]
    ys = (torch.arange(h, dtype=dists.dtype, device=dists.device) + 0.5) / h
    xs = (torch.arange(w, dtype=dists.dtype, device=dists.device) + 0.5) / w
    return torch.stack([(dists.sum(2) * ys).sum(1), (dists.sum(1) * xs).sum(1)], dim=1)


def center_of_mass_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """Attention-overlap paper: push entity centres of mass apart; ``1 - d_ij / sqrt(2)``."""
    dists = _spatial_distributions(inputs.entity_maps())
    if dists.shape[0] < 2:
        return dists.new_zeros(())
    centres = _centres(dists)
    values = [1 - (centres[i] - centres[j]).norm() / 2 ** 0.5 for i, j in _pairs(dists.shape[0])]
    return torch.stack(values).mean()


def kl_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """Attention-overlap paper: make entity distributions diverge; ``1 / (1 + KL_sym)``."""
    dists = _spatial_distributions(inputs.entity_maps()).clamp_min(_EPS)
    if dists.shape[0] < 2:
        return dists.new_zeros(())
    values = []
    for i, j in _pairs(dists.shape[0]):
        symmetric = (dists[i] * (dists[i] / dists[j]).log()).sum() + (dists[j] * (dists[j] / dists[i]).log()).sum()
        values.append(1 / (1 + symmetric))
    return torch.stack(values).mean()


def cluster_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """Attention-overlap paper's clustering compactness: within-entity spatial variance over
    total variance (within + squared distances between centres), in [0, 1]."""
    dists = _spatial_distributions(inputs.entity_maps())
    h, w = dists.shape[-2:]
    ys = ((torch.arange(h, dtype=dists.dtype, device=dists.device) + 0.5) / h)[:, None]
    xs = ((torch.arange(w, dtype=dists.dtype, device=dists.device) + 0.5) / w)[None, :]
    centres = _centres(dists)
    within = torch.stack([(d * ((ys - c[0]) ** 2 + (xs - c[1]) ** 2)).sum() for d, c in zip(dists, centres)]).mean()
    if dists.shape[0] < 2:
        return within / (within + _EPS)
    between = torch.stack([((centres[i] - centres[j]) ** 2).sum() for i, j in _pairs(dists.shape[0])]).mean()
    return within / (within + between).clamp_min(_EPS)


def separate_enhance_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """Separate-and-Enhance at test time: Separate (overlap of peak-normalised entity maps,
    ``sum min / sum of both`` per pair) plus Enhance (each entity's mean ``1 - peak``), halved."""
    maps = inputs.entity_maps()
    peaks = maps.flatten(1).amax(1).clamp_min(_EPS)[:, None, None]
    normalized = maps / peaks
    if maps.shape[0] < 2:
        separate = maps.new_zeros(())
    else:
        separate = torch.stack([2 * torch.minimum(normalized[i], normalized[j]).sum()
                                / (normalized[i] + normalized[j]).sum().clamp_min(_EPS)
                                for i, j in _pairs(maps.shape[0])]).mean()
    return (separate + enhance_loss(inputs)) / 2


def enhance_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """Separate-and-Enhance's Enhance term: each entity's mean ``1 - peak`` of its map as a share
    of the attention paid to text. It is the only kind of term here that rewards an entity for
    being attended MORE; ELA's Eqs. 5-6 are invariant to scaling an entity's map."""
    peaks = _text_normalized(inputs, inputs.entity_maps()).flatten(1).amax(1).clamp(0, 1)
    return (1 - peaks).mean()


def ela_enhance_loss(inputs: ObjectiveInput) -> torch.Tensor:
    """ELA's Eq. 7 with a presence term, averaged: ``(L_ELA + L_enhance) / 2``.

    ELA's loss keeps each entity's attention inside its own region but has no term that raises a
    weak entity's attention, so an entity the model is dropping stays dropped (on the benchmark
    model the commonest failure is a missing object). Adding S&E's Enhance term keeps ELA's masks,
    concentration and attenuation and adds presence; the pure ``ela`` objective stays selectable.
    """
    return (ela_loss(inputs) + enhance_loss(inputs)) / 2


OBJECTIVES: dict[str, Callable[[ObjectiveInput], torch.Tensor]] = {
    "ela": ela_loss,
    "attend_excite": attend_excite_loss,
    "attend_excite_paper": attend_excite_paper_loss,
    "iou": iou_loss,
    "center_of_mass": center_of_mass_loss,
    "kl": kl_loss,
    "cluster": cluster_loss,
    "separate_enhance": separate_enhance_loss,
    "ela_enhance": ela_enhance_loss,
}
