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
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

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
