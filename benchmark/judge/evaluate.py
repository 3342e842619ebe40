"""Exact evaluator for generated scenes: no learned model, only colours, connected components and
shape templates.

1. Each pixel gets the nearest of background + palette colours; pixels nearer a palette colour than the
   background are foreground (half coverage, as the ground-truth masks); blends of two palette colours
   stay foreground with no colour (a red-to-blue smear).
2. Foreground is split into 8-connected components (a small BFS; scipy is not a dependency).
3. Each component gets a colour (majority over its palette-labelled pixels) and a shape (largest IoU of
   its mask with each shape's template rendered by ``scenes.shape_coverage`` in the component's bbox).
4. A component is *merged* when it is much larger than any single object can be, or when it holds two
   requested colours in quantity.
5. Requested objects are matched to the other components (best total agreement of colour and shape);
   each requested object is ``ok``, ``wrong_colour``, ``wrong_shape``, ``merged`` (its only candidate
   is a merged component) or ``missing``.

``evaluate`` also returns one segmentation mask per requested object (empty if missing), used to
measure each entity word's attention mass on its own object.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..models.scenes import BACKGROUND, MAX_SIDE, PALETTE, SHAPES, shape_coverage

COLOURS = sorted(PALETTE)
_REFERENCE = np.asarray([BACKGROUND] + [PALETTE[c] for c in COLOURS], np.float32)
COLOUR_DISTANCE = 70.0       # within this of a palette colour, the pixel has that colour
MIN_AREA = 8                 # components smaller than this are specks, not objects
MERGED_SIDE = MAX_SIDE + 4   # no single object's bbox side is this large
SECOND_COLOUR_FRACTION = 0.2  # a second requested colour this frequent in one component means merged
SHAPE_IOU_MIN = 0.45         # below this best template IoU the shape is unrecognised

OK, MISSING, WRONG_COLOUR, WRONG_SHAPE, MERGED = "ok", "missing", "wrong_colour", "wrong_shape", "merged"


@dataclass
class Component:
    mask: np.ndarray = field(repr=False)
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    colour_fractions: dict[str, float]
    colour: str | None
    shape_ious: dict[str, float]
    shape: str | None
    merged: bool = False


@dataclass
class Report:
    status: list[str]                 # per requested object
    masks: list[np.ndarray]           # per requested object, H x W bool (empty if missing)
    components: list[Component]
    matched: list[int | None]         # index into components per requested object

    @property
    def all_ok(self) -> bool:
        return all(s == OK for s in self.status)


def pixel_labels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground H x W bool, colour index H x W int: -1 none, else index into COLOURS)."""
    rgb = image.astype(np.float32)
    dist = np.linalg.norm(rgb[..., None, :] - _REFERENCE, axis=-1)  # H x W x (1 + colours)
    nearest = dist.argmin(-1)
    foreground = nearest > 0
    colour = np.where(foreground & (nearest > 0) & (dist.min(-1) < COLOUR_DISTANCE), nearest - 1, -1)
    return foreground, colour


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as boolean masks, by BFS."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    parts = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        part = np.zeros_like(mask, bool)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            part[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        parts.append(part)
    return parts


def describe(mask: np.ndarray, colour_index: np.ndarray) -> Component:
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    counts = np.bincount(colour_index[mask & (colour_index >= 0)], minlength=len(COLOURS))
    labelled = counts.sum()
    fractions = {c: float(counts[i] / labelled) if labelled else 0.0 for i, c in enumerate(COLOURS)}
    colour = COLOURS[int(counts.argmax())] if labelled >= mask.sum() / 2 else None
    ious = {}
    for shape in SHAPES:
        template = shape_coverage(shape, bbox, mask.shape) >= 0.5
        union = (template | mask).sum()
        ious[shape] = float((template & mask).sum() / union) if union else 0.0
    best = max(ious, key=ious.get)
    return Component(mask, int(mask.sum()), bbox, fractions, colour, ious,
                     best if ious[best] >= SHAPE_IOU_MIN else None)


def _agreement(obj: tuple[str, str | None], comp: Component) -> tuple[int, int, float]:
    """(attributes that agree, whether the shape does, soft tie-break): the shape word is the entity,
    so between equally good matchings the one that keeps shapes right wins (a blue circle for "a red
    circle" is the circle with the wrong colour, not the square)."""
    shape, colour = obj
    shape_ok = int(comp.shape == shape)
    score = shape_ok + int(colour is None or comp.colour == colour)
    return score, shape_ok, comp.shape_ious[shape] + (comp.colour_fractions.get(colour, 0.0) if colour else 0.0)


def evaluate(image: np.ndarray, prompt_objects: list[tuple[str, str | None]]) -> Report:
    """Judge ``image`` (H x W x 3 uint8) against requested (shape, colour or None) objects."""
    foreground, colour_index = pixel_labels(image)
    comps = [describe(m, colour_index) for m in connected_components(foreground) if m.sum() >= MIN_AREA]
    requested_colours = {c for _, c in prompt_objects if c}
    for comp in comps:
        x0, y0, x1, y1 = comp.bbox
        big = max(x1 - x0, y1 - y0) >= MERGED_SIDE
        two_colours = sum(comp.colour_fractions[c] >= SECOND_COLOUR_FRACTION for c in requested_colours) >= 2
        comp.merged = big or (len(prompt_objects) > 1 and two_colours)
    whole = [i for i, c in enumerate(comps) if not c.merged]
    n = len(prompt_objects)
    best, best_key = [None] * n, (-1, -1, -1.0)
    for chosen in itertools.permutations(whole + [None] * n, n):
        key = (0, 0, 0.0)
        for obj, ci in zip(prompt_objects, chosen):
            if ci is not None:
                agreement = _agreement(obj, comps[ci])
                if agreement[0] == 0:
                    break
                key = tuple(a + b for a, b in zip(key, agreement))
        else:
            if key > best_key:
                best_key, best = key, list(chosen)
    status, masks = [], []
    merged_comps = [i for i, c in enumerate(comps) if c.merged]
    for obj, ci in zip(prompt_objects, best):
        shape, colour = obj
        if ci is None:
            if merged_comps:
                # an unmatched object inside a merged blob: its pixels are the blob's pixels of its colour
                # (or the whole blob when the prompt names no colour)
                blob = comps[max(merged_comps, key=lambda i: comps[i].colour_fractions.get(colour, 0.0))]
                status.append(MERGED)
                own = blob.mask & (colour_index == COLOURS.index(colour)) if colour else blob.mask
                masks.append(own)
            else:
                status.append(MISSING)
                masks.append(np.zeros(image.shape[:2], bool))
            continue
        comp = comps[ci]
        colour_ok = colour is None or comp.colour == colour
        status.append(OK if colour_ok and comp.shape == shape else WRONG_SHAPE if colour_ok else WRONG_COLOUR)
        masks.append(comp.mask)
    return Report(status, masks, comps, best)
