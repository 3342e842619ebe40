"""What a setting did to each image beyond right or wrong: whether it kept what was right, how far
it moved the picture, and how well its masks found the objects.

Pure numpy on images and masks, so each is checked by hand in the tests:

* ``kept``: of the images right without anchoring, the share still right with it. A method that
  corrects leaves these alone; one that re-rolls breaks as many as chance does.
* ``pixel_change``: mean absolute pixel difference against the off image, in [0, 1].
* ``centroid_shift``: for objects found (as their own component) in both images, how far each one's
  centre moved, in pixels.
* ``mask_iou``: an entity's localisation mask (the attention map's h x w, upsampled) against the
  object's region the evaluator found in the final image: localisation quality at each anchored
  step. Objects missing from the final image have no region and are not scored.
* ``clean``: whether an object found as its own component is drawn in one colour: at least
  ``CLEAN_SHARE`` of its interior (its mask eroded by one pixel) carries its own palette colour.
  The evaluator counts a shape half blue, half white as a blue object; this does not. Edges are
  left out because anti-aliasing blends them with the background in every ground-truth render;
  inside, renders are exactly their palette colour (every object of 2000 training scenes has an
  interior share of 1.0, so renders score 100% clean at any threshold below 1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .evaluate import COLOURS, Report, pixel_labels

Centroid = Optional[tuple[float, float]]


def kept_rate(off_correct: Sequence[bool], setting_correct: Sequence[bool]) -> Optional[float]:
    """Share of images right off that stay right; None when none was right off."""
    right = [b for a, b in zip(off_correct, setting_correct) if a]
    return sum(right) / len(right) if right else None


def pixel_change(off_image: np.ndarray, image: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, as a fraction of the full range."""
    return float(np.abs(off_image.astype(np.float32) - image.astype(np.float32)).mean() / 255.0)


def centroid(mask: np.ndarray) -> Centroid:
    """(y, x) centre of a boolean mask in pixels, None if empty."""
    ys, xs = np.nonzero(mask)
    return (float(ys.mean()), float(xs.mean())) if len(ys) else None


def centroid_shifts(off: Sequence[Centroid], other: Sequence[Centroid]) -> list[float]:
    """Distances between the same objects' centres where both were found."""
    return [float(np.hypot(a[0] - b[0], a[1] - b[1])) for a, b in zip(off, other) if a is not None and b is not None]


def upsample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of an h x w mask to an image's size (integer factors)."""
    fy, fx = shape[0] // mask.shape[0], shape[1] // mask.shape[1]
    return np.repeat(np.repeat(mask, fy, axis=0), fx, axis=1)


def mask_iou(mask: np.ndarray, region: np.ndarray) -> Optional[float]:
    """IoU of a (low-resolution) entity mask with an object's pixel region; None if no region."""
    if not region.any():
        return None
    mask = upsample_mask(mask, region.shape)
    return float((mask & region).sum() / (mask | region).sum())


def localisation_iou(entity_masks: np.ndarray, regions: Sequence[np.ndarray]) -> Optional[float]:
    """Mean IoU over entities whose object was found; ``entity_masks`` (n, h, w) in the prompt's
    object order, ``regions`` the evaluator's object masks in the same order."""
    scores = [s for s in (mask_iou(m, r) for m, r in zip(entity_masks, regions)) if s is not None]
    return float(np.mean(scores)) if scores else None


# A generated object's interior holds a few stray pixels (a blend between two colours, a speck of
# background); a second colour or a smear over a tenth of it is what the eye sees as a mixed object.
CLEAN_SHARE = 0.9


def interior(mask: np.ndarray) -> np.ndarray:
    """``mask`` eroded by one pixel (3x3, outside the image counts as outside the mask): the
    pixels whose eight neighbours all belong to the object, none of them an anti-aliased edge."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    inner = mask.copy()
    for dy in range(3):
        for dx in range(3):
            inner &= padded[dy:dy + h, dx:dx + w]
    return inner


def colour_purity(colour_index: np.ndarray, mask: np.ndarray, colour: Optional[str]) -> Optional[float]:
    """Share of the mask's interior whose evaluator label (``evaluate.pixel_labels``) is
    ``colour``; 0 for an object with no colour of its own, None when the mask has no interior."""
    inner = interior(mask)
    if not inner.any():
        return None
    if colour is None:
        return 0.0
    return float((colour_index[inner] == COLOURS.index(colour)).mean())


def clean_objects(image: np.ndarray, report: Report) -> list[Optional[bool]]:
    """Per requested object of ``evaluate(image, ...)``'s report: whether it is drawn clean, None
    where it was not found as its own component (missing or merged) or has no interior."""
    _, colour_index = pixel_labels(image)
    flags: list[Optional[bool]] = []
    for matched in report.matched:
        component = report.components[matched] if matched is not None else None
        purity = None if component is None else colour_purity(colour_index, component.mask, component.colour)
        flags.append(None if purity is None else purity >= CLEAN_SHARE)
    return flags
