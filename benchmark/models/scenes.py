"""Procedural scenes: 32x32 RGB images of one to three coloured shapes, with captions and ground truth.

Shapes are drawn at 4x (128 px) with PIL and box-downsampled, so edges are anti-aliased the way a
generated image's are. Colours are far apart in RGB so that an exact evaluator can segment by nearest
palette colour. Some colour-shape and shape-shape pairings never occur in multi-object training
captions (they occur alone, or not at all together); the benchmark's test prompts use exactly those,
so a model has to compose objects it has never seen side by side - where SD-like bleeding shows.
Everything is a function of an integer seed.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..paths import PROMPTS_DIR

SIZE = 32
SCALE = 4
BACKGROUND = (40, 40, 40)
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross", "star")
MIN_SIDE, MAX_SIDE = 10, 14
GAP = 2  # minimum free pixels between two objects' boxes

# Held out of every multi-object training caption (single-object captions keep the colour pairs, so the
# model knows "a red circle" but never drew one beside another object).
HELD_COLOUR_SHAPE = frozenset({("red", "circle"), ("blue", "square"), ("green", "triangle"),
                               ("yellow", "cross"), ("purple", "star")})
HELD_SHAPE_PAIRS = frozenset({frozenset({"circle", "square"}), frozenset({"triangle", "star"})})
TEST_PROMPTS_PATH = PROMPTS_DIR / "test_prompts.txt"


@dataclass
class SceneObject:
    shape: str
    colour: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in output pixels, x1/y1 exclusive
    mask: np.ndarray = field(repr=False)  # SIZE x SIZE bool, pixels where the shape covers >= half


@dataclass
class Scene:
    image: np.ndarray  # SIZE x SIZE x 3 uint8
    objects: list[SceneObject]
    caption: str


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float]) -> None:
    """Fill ``shape`` inscribed in ``box`` (x0, y0, x1, y1) with value 255."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "cross":
        tw, th = w * 0.34, h * 0.34
        draw.rectangle([cx - tw / 2, y0, cx + tw / 2 - 1, y1 - 1], fill=255)
        draw.rectangle([x0, cy - th / 2, x1 - 1, cy + th / 2 - 1], fill=255)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = 0.5 if k % 2 == 0 else 0.22
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * w * math.cos(angle), cy + 0.06 * h + radius * h * math.sin(angle)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def shape_coverage(shape: str, bbox: tuple[int, int, int, int], size: tuple[int, int] = (SIZE, SIZE),
                   supersample: int = SCALE) -> np.ndarray:
    """Fractional coverage (H x W float in [0, 1]) of ``shape`` drawn in ``bbox`` (output pixels) on a
    canvas ``supersample`` times finer."""
    h, w = size
    canvas = Image.new("L", (w * supersample, h * supersample), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, tuple(v * supersample for v in bbox))
    return np.asarray(canvas.reduce(supersample), dtype=np.float32) / 255.0


def render(objects: list[tuple[str, str, tuple[int, int, int, int]]],
           scale: int = 1) -> tuple[np.ndarray, list[SceneObject]]:
    """Composite (shape, colour, bbox) objects on the background; returns the image (``SIZE * scale``
    pixels a side: the autoencoder model sees the same scene at 128 px) and the ground truth, always
    at ``SIZE``, where the evaluator judges. Every scale draws on the same ``SIZE * SCALE`` canvas, so
    a scaled image box-downsampled to ``SIZE`` has the coverage of the ``SIZE`` render (the evaluator's
    shape templates are drawn on that canvas too)."""
    side = SIZE * scale
    image = np.empty((side, side, 3), np.float32)
    image[:] = BACKGROUND
    truth = []
    for shape, colour, bbox in objects:
        alpha = shape_coverage(shape, tuple(v * scale for v in bbox), (side, side), SCALE // scale)[..., None]
        image = image * (1 - alpha) + np.asarray(PALETTE[colour], np.float32) * alpha
        mask = alpha[..., 0] >= 0.5 if scale == 1 else shape_coverage(shape, bbox) >= 0.5
        truth.append(SceneObject(shape, colour, bbox, mask))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), truth


def caption_for(pairs: list[tuple[str, str]], with_colours: bool, places: Sequence[str] = ()) -> str:
    """"a red circle" / "a circle and a square" / "a red circle and a blue square" / three with a comma;
    ``places`` (one per object, ``place_of``) follow their objects: "a red circle at the top left"."""
    phrases = [f"a {c} {s}" if with_colours else f"a {s}" for s, c in pairs]
    phrases = [f"{phrase} {place}" for phrase, place in zip(phrases, places)] or phrases
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def centre_of(obj: SceneObject) -> tuple[float, float]:
    """(row, column) of the mean of the object's drawn pixels (its mask's ``nonzero()`` axes)."""
    ys, xs = obj.mask.nonzero()
    return float(ys.mean()), float(xs.mean())


def place_of(obj: SceneObject) -> str:
    """Where an object's drawn pixels are centred, in thirds of the image: "at the top left", "at the
    left", ..., "in the middle" (rows above columns, as people say it)."""
    third = lambda value, words: words[min(int(3 * (value + 0.5) / SIZE), 2)]  # noqa: E731
    row, column = centre_of(obj)
    where = " ".join(w for w in (third(row, ("top", "", "bottom")), third(column, ("left", "", "right"))) if w)
    return f"at the {where}" if where else "in the middle"


def is_held_out(pairs: list[tuple[str, str]]) -> bool:
    """True if a multi-object scene uses a held-out colour-shape or shape-shape pairing."""
    if len(pairs) < 2:
        return False
    if any((c, s) in HELD_COLOUR_SHAPE for s, c in pairs):
        return True
    return any(frozenset(p) in HELD_SHAPE_PAIRS for p in itertools.combinations([s for s, _ in pairs], 2))


def _place(rng: random.Random, n: int) -> list[tuple[int, int, int, int]] | None:
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n):
        for _attempt in range(50):
            side = rng.randint(MIN_SIDE, MAX_SIDE)
            x0, y0 = rng.randint(1, SIZE - 1 - side), rng.randint(1, SIZE - 1 - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[0] >= b[2] + GAP or b[0] >= box[2] + GAP or box[1] >= b[3] + GAP or b[1] >= box[3] + GAP
                   for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def layout(rng: random.Random, pairs: list[tuple[str, str]]) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """Random non-overlapping boxes for the given (shape, colour) pairs."""
    while (boxes := _place(rng, len(pairs))) is None:
        pass
    return [(s, c, b) for (s, c), b in zip(pairs, boxes)]


# "A left of B": the centre of A's drawn pixels at least RELATION_MARGIN pixels left of B's; each word
# as (axis of the mask's nonzero(): 0 rows, 1 columns; sign): image x to the right, y down.
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}
RELATION_MARGIN = 4


def relations_between(first: SceneObject, second: SceneObject) -> list[str]:
    """The relation words true of object ``first`` against ``second`` (mask centres, by the margin)."""
    return [word for word, (axis, sign) in RELATIONS.items()
            if sign * (centre_of(first)[axis] - centre_of(second)[axis]) >= RELATION_MARGIN]


def training_scene(seed: int, scale: int = 1, relations: float = 0.0, positions: float = 0.0) -> Scene:
    """One training example: 1 object (25%), 2 (60%) or 3 (15%), distinct shapes and colours, never a
    held-out pairing; two-or-more-object captions name colours half of the time. ``scale``: image
    resolution as a multiple of ``SIZE`` (same scene at every scale). ``relations``: the share of
    two-object captions that say where the first object is ("a red circle left of a blue square",
    a relation true of the drawn layout), so that the text has a say in the layout, as SD's captions
    do. ``positions``: the share of captions (any count, drawn before ``relations``) that say where
    each object is in the image ("a red circle at the top left and a blue square at the bottom"), so
    that the text decides the whole layout. The scenes themselves, and every caption at 0, are those
    of the plain stream."""
    rng = random.Random(seed)
    n = rng.choices([1, 2, 3], weights=[25, 60, 15])[0]
    while True:
        pairs = list(zip(rng.sample(SHAPES, n), rng.sample(sorted(PALETTE), n)))
        if not is_held_out(pairs):
            break
    with_colours = n == 1 or rng.random() < 0.5
    image, truth = render(layout(rng, pairs), scale)
    caption = caption_for(pairs, with_colours)
    side_rng = random.Random(seed * 7919 + 1)  # its own stream: the plain one is untouched
    if random.Random(seed * 7919 + 2).random() < positions:
        return Scene(image, truth, caption_for(pairs, with_colours, [place_of(obj) for obj in truth]))
    if n == 2 and side_rng.random() < relations:
        true = relations_between(*truth)
        if true:
            phrases = caption.split(" and ")
            caption = f"{phrases[0]} {side_rng.choice(true)} {phrases[1]}"
    return Scene(image, truth, caption)


def held_out_prompts(seed: int = 0, count: int = 48) -> list[list[tuple[str, str | None]]]:
    """Held-out two-object prompts as [(shape, colour or None), ...]: every held-out shape pair without
    colours (both orders), then coloured pairs that use a held-out pairing."""
    rng = random.Random(seed)
    prompts: list[list[tuple[str, str | None]]] = []
    for pair in sorted(tuple(sorted(p)) for p in HELD_SHAPE_PAIRS):
        prompts += [[(pair[0], None), (pair[1], None)], [(pair[1], None), (pair[0], None)]]
    seen = set()
    while len(prompts) < count:
        pairs = list(zip(rng.sample(SHAPES, 2), rng.sample(sorted(PALETTE), 2)))
        key = tuple(pairs)
        if is_held_out(pairs) and key not in seen:
            seen.add(key)
            prompts.append([(s, c) for s, c in pairs])
    return prompts


def prompt_text(objects: list[tuple[str, str | None]]) -> str:
    return caption_for([(s, c or "") for s, c in objects], all(c for _, c in objects))


def parse_prompt(prompt: str) -> list[tuple[str, str | None]]:
    """Inverse of ``prompt_text``: "a red circle and a square" -> [("circle", "red"), ("square", None)]."""
    objects = []
    for phrase in prompt.replace(" and ", ", ").split(", "):
        words = phrase.split()
        if words and words[0] == "a":
            words = words[1:]
        objects.append((words[-1], words[0] if len(words) == 2 else None))
    return objects


def write_test_prompts(path: Path = TEST_PROMPTS_PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompt_text(p) for p in held_out_prompts()) + "\n")


if __name__ == "__main__":
    write_test_prompts()
    print(f"wrote {TEST_PROMPTS_PATH}")
