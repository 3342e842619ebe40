"""Entity localisation (ELA Sec. 3.2; method.md "Localisation"): maps -> one mask per entity.

Small pure functions on tensors. Decisions where the paper is silent:

* A word spanning several columns (BPE pieces, an embedding's slots) uses the MEAN of its
  columns' maps, so a word split in three is not three times as strong as one split in one.
* ``B`` for the background: min-max normalise the start-of-text map, then Otsu's threshold
  (``mean`` and a fixed ``half`` are the alternatives), so no constant is tuned per model.
* Entity vs entity: each entity map is min-max normalised first (a weak entity's raw map is small
  everywhere and would otherwise get no pixels), then ``D_i = [Â_i > max_{j != i} Â_j]``; for two
  entities that is the paper's ``B(A_1 - A_2)`` with the threshold at zero.
* ``M_i = B(A_i) AND D_i AND NOT M_bk``. The paper's ``B(D - M_bk)`` binarises a difference of
  maps; taken at zero, every pixel where all entities are near zero (the background of the entity
  maps) would go to whichever entity's noise is larger: on the benchmark model a small object's
  mask was a few pixels and the other entity's mask the whole empty background. Requiring the
  entity's own map to be high (``B`` of it, same method as the background) keeps the dominance
  test to where the entity attends at all.
* The start-of-text map is the background in SD (the paper's observation), but not in every
  model: on the benchmark model it peaks on the objects. Where removing it would empty an entity's
  mask, the entity keeps ``B(A_i) AND D_i`` and the fallback is reported.
* Degenerate masks: ``B`` never selects a map's minimum, so a mask is never the whole map; an
  empty one (an entity dominated everywhere it attends) falls back to the entity's top-k pixels,
  ``k = h*w / (2n)``, and the fallback is reported, so the loss stays bounded and meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


def word_map(maps: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """Mean of the given columns' maps. ``maps``: (columns, h, w) -> (h, w)."""
    if not columns:
        raise ValueError("a word needs at least one column")
    return maps[list(columns)].mean(dim=0)


def normalize_map(attention: torch.Tensor) -> torch.Tensor:
    """Min-max normalise to [0, 1]; a constant map becomes all zeros."""
    low, high = attention.min(), attention.max()
    span = high - low
    if span <= 0:
        return torch.zeros_like(attention)
    return (attention - low) / span


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]: the split maximising between-class variance."""
    histogram = torch.histc(values.detach().float().flatten(), bins=bins, min=0.0, max=1.0)
    probabilities = histogram / histogram.sum().clamp_min(1)
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    weight_low = torch.cumsum(probabilities, 0)
    mean_low_sum = torch.cumsum(probabilities * centres, 0)
    total_mean = mean_low_sum[-1]
    weight_high = 1 - weight_low
    between = (total_mean * weight_low - mean_low_sum) ** 2 / (weight_low * weight_high).clamp_min(1e-12)
    between[(weight_low <= 0) | (weight_high <= 0)] = -1
    best = int(torch.argmax(between))
    return float((best + 1) / bins)


def binarize(attention: torch.Tensor, method: str = "otsu") -> torch.Tensor:
    """``B(.)`` of method.md: a boolean mask of the high part of a min-max normalised map."""
    normalized = normalize_map(attention.detach().float())
    if method == "otsu":
        threshold = otsu_threshold(normalized)
    elif method == "mean":
        threshold = float(normalized.mean())
    elif method == "half":
        threshold = 0.5
    else:
        raise ValueError(f"unknown binarization {method!r}")
    return normalized > threshold


def dominance_masks(entity_maps: torch.Tensor) -> torch.Tensor:
    """``D_i``: pixels where entity i's normalised map beats every other entity's. (n, h, w)."""
    normalized = torch.stack([normalize_map(m.detach().float()) for m in entity_maps])
    if normalized.shape[0] == 1:
        return torch.ones_like(normalized, dtype=torch.bool)
    masks = []
    for index in range(normalized.shape[0]):
        others = torch.cat([normalized[:index], normalized[index + 1:]])
        masks.append(normalized[index] > others.max(dim=0).values)
    return torch.stack(masks)


def top_k_mask(attention: torch.Tensor, k: int) -> torch.Tensor:
    flat = attention.detach().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, max(1, min(k, flat.numel()))).indices] = True
    return mask.reshape(attention.shape)


@dataclass
class Localization:
    """Masks for one image: ``entity_masks`` (n, h, w) bool, the background, and fallbacks taken."""

    entity_masks: torch.Tensor
    background: torch.Tensor
    fallbacks: list[str] = field(default_factory=list)


def localize(entity_maps: torch.Tensor, sot_map: torch.Tensor, names: Sequence[str],
             method: str = "otsu") -> Localization:
    """ELA's localisation: ``M_i = B(A_i) AND D_i AND NOT B(A_SoT)``, top-k for an empty mask."""
    background = binarize(sot_map, method)
    dominance = dominance_masks(entity_maps)
    masks, fallbacks = [], []
    n_entities, pixels = entity_maps.shape[0], entity_maps[0].numel()
    for index, name in enumerate(names):
        own = binarize(entity_maps[index], method) & dominance[index]
        mask = own & ~background
        if not mask.any() and own.any():
            mask = own
            fallbacks.append(f"{name}: the start-of-text map covered its region, kept the region")
        elif not mask.any():
            mask = top_k_mask(entity_maps[index], pixels // (2 * n_entities))
            fallbacks.append(f"{name}: empty mask, used its top pixels")
        masks.append(mask)
    return Localization(torch.stack(masks), background, fallbacks)
