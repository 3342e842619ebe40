"""Mask grid pictures: for each entity and its attributes, the attention heatmap at the first
anchored step, the mask it was anchored to, and the heatmap after anchoring, labelled.

They let a user see what ELA localised (a wrong mask explains a wrong result) and are saved
beside the image when asked for.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .localize import Localization, normalize_map, word_map
from .tokens import EntityColumns

CELL = 128
LABEL_WIDTH = 120
HEADER = 20
COLUMN_TITLES = ("attention, first step", "mask", "attention, after")


def heatmap(attention: torch.Tensor, size: int = CELL) -> Image.Image:
    """A map as an RGB picture (black -> red -> yellow -> white), nearest-upscaled to ``size``."""
    value = normalize_map(attention.detach().float().cpu()).numpy()
    rgb = np.stack([np.clip(3 * value, 0, 1), np.clip(3 * value - 1, 0, 1), np.clip(3 * value - 2, 0, 1)], -1)
    return _upscaled(rgb, size)


def mask_picture(mask: torch.Tensor, size: int = CELL) -> Image.Image:
    value = mask.detach().float().cpu().numpy()
    return _upscaled(np.repeat(value[..., None], 3, -1), size)


def _upscaled(rgb: np.ndarray, size: int) -> Image.Image:
    """Upscale so the longer side is ``size``, keeping a non-square map's aspect."""
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8))
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    return picture.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)


def mask_grid(maps_first: torch.Tensor, maps_last: torch.Tensor, target: EntityColumns,
              localization: Localization) -> Image.Image:
    """One image's grid; ``maps_*``: (columns, h, w); rows: each entity, then its attributes."""
    rows: list[tuple[str, Sequence[int], torch.Tensor]] = []
    for index, entity in enumerate(target.entities):
        mask = localization.entity_masks[index]
        rows.append((entity.word, entity.columns, mask))
        rows.extend((f"  {attribute.word} ({entity.word})", attribute.columns, mask)
                    for attribute in entity.attributes)
    cell_w, cell_h = heatmap(maps_first[0]).size
    grid = Image.new("RGB", (LABEL_WIDTH + 3 * (cell_w + 4), HEADER + len(rows) * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(COLUMN_TITLES):
        draw.text((LABEL_WIDTH + column * (cell_w + 4) + 2, 4), title, fill="black")
    for row, (label, columns, mask) in enumerate(rows):
        top = HEADER + row * (cell_h + 4)
        draw.text((4, top + cell_h // 2 - 6), label, fill="black")
        cells = (heatmap(word_map(maps_first, columns)), mask_picture(mask), heatmap(word_map(maps_last, columns)))
        for column, cell in enumerate(cells):
            grid.paste(cell, (LABEL_WIDTH + column * (cell_w + 4), top))
    return grid
