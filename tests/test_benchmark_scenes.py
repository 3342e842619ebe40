"""Benchmark scenes and the exact evaluator: determinism, held-out pairings, self-test, failure kinds."""

import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from benchmark.judge.evaluate import MERGED, MISSING, OK, WRONG_COLOUR, WRONG_SHAPE, evaluate
from benchmark.models.scenes import (PALETTE, RELATION_MARGIN, RELATIONS, SIZE, TEST_PROMPTS_PATH, is_held_out,
                                     parse_prompt, prompt_text, render, held_out_prompts, training_scene)


def test_generator_is_deterministic():
    a, b, c = training_scene(123), training_scene(123), training_scene(124)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8


def scenes_told(option: str, count: int = 300):
    """(seed, plain scene, scene with the caption ``option`` at 1) for ``count`` seeds, each checked to
    keep the plain image, and at 0 the plain caption."""
    for seed in range(count):
        plain, told = training_scene(seed), training_scene(seed, **{option: 1.0})
        assert np.array_equal(plain.image, told.image) and plain.caption == training_scene(seed, **{option: 0.0}).caption
        yield seed, plain, told


def test_relation_captions_say_what_the_scene_shows_and_change_nothing_else():
    """``relations``: a two-object caption names where the first object lies against the second's
    centre, truly; the images, and every caption at 0, are the plain stream's."""
    named = 0
    for seed, plain, told in scenes_told("relations"):
        if len(plain.objects) != 2 or told.caption == plain.caption:
            assert told.caption == plain.caption
            continue
        named += 1
        first, second = plain.caption.split(" and ")
        (word,) = [w for w in RELATIONS if told.caption == f"{first} {w} {second}"]
        (x0, y0), (x1, y1) = ((o.mask.nonzero()[1].mean(), o.mask.nonzero()[0].mean()) for o in told.objects)
        dx, dy = x0 - x1, y0 - y1
        assert {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[word] >= RELATION_MARGIN, (seed, word)
    assert named > 100


def test_position_captions_say_where_each_object_is_and_change_nothing_else():
    """``positions``: a caption follows each object with the third of the image its pixels are centred
    in, truly; the images, and every caption at 0, are the plain stream's."""
    told_count = 0
    for seed, plain, told in scenes_told("positions"):
        told_count += told.caption != plain.caption
        for obj in told.objects:
            (place,) = re.findall(rf"{obj.shape} (at the [a-z ]+?|in the middle)(?:,| and|$)", told.caption)
            words = place.split()
            ys, xs = obj.mask.nonzero()
            for centre, (low, high) in ((ys.mean() + 0.5, ("top", "bottom")), (xs.mean() + 0.5, ("left", "right"))):
                third = "low" if centre < SIZE / 3 else "high" if centre >= 2 * SIZE / 3 else "middle"
                assert (low in words, high in words) == (third == "low", third == "high"), (seed, told.caption)
            assert (place == "in the middle") == (len(words) == 3 and "middle" in words)
    assert told_count == 300


def test_training_never_shows_held_out_pairings():
    for seed in range(1500):
        scene = training_scene(seed)
        assert not is_held_out([(o.shape, o.colour) for o in scene.objects]), scene.caption


def test_test_prompts_file_is_the_held_out_set():
    lines = TEST_PROMPTS_PATH.read_text().splitlines()
    pairs = held_out_prompts()
    assert lines == [prompt_text(p) for p in pairs]
    for line, objects in zip(lines, pairs):
        assert parse_prompt(line) == objects
        assert is_held_out([(s, c or "none") for s, c in objects]) or None in [c for _, c in objects]


def test_evaluator_self_test_on_renders():
    correct = total = 0
    for seed in range(10**6, 10**6 + 300):
        scene = training_scene(seed)
        report = evaluate(scene.image, [(o.shape, o.colour) for o in scene.objects])
        correct += report.status.count(OK)
        total += len(scene.objects)
        for obj, mask in zip(scene.objects, report.masks):
            assert (mask & obj.mask).sum() >= 0.8 * obj.mask.sum()
    assert correct / total >= 0.98, correct / total


def test_shape_only_prompts_ignore_colour():
    image, _ = render([("circle", "red", (2, 2, 14, 14)), ("square", "blue", (18, 18, 30, 30))])
    assert evaluate(image, [("circle", None), ("square", None)]).status == [OK, OK]


def test_missing_object():
    image, _ = render([("circle", "red", (2, 2, 14, 14))])
    assert evaluate(image, [("circle", "red"), ("square", "blue")]).status == [OK, MISSING]


def test_wrong_colour_and_wrong_shape():
    image, _ = render([("circle", "blue", (2, 2, 14, 14)), ("triangle", "green", (18, 18, 30, 30))])
    report = evaluate(image, [("circle", "red"), ("square", "green")])
    assert report.status == [WRONG_COLOUR, WRONG_SHAPE]


def test_colour_on_the_wrong_object_is_wrong_colour_for_both():
    image, _ = render([("circle", "blue", (2, 2, 14, 14)), ("square", "red", (18, 18, 30, 30))])
    assert evaluate(image, [("circle", "red"), ("square", "blue")]).status == [WRONG_COLOUR, WRONG_COLOUR]


def test_touching_objects_of_two_colours_are_merged():
    image, _ = render([("square", "red", (4, 8, 16, 20)), ("square", "blue", (16, 8, 28, 20))])
    report = evaluate(image, [("square", "red"), ("circle", "blue")])
    assert report.status == [MERGED, MERGED]
    assert not (report.masks[0] & report.masks[1]).any() and report.masks[0].any() and report.masks[1].any()


def test_blob_shading_from_red_to_blue_is_merged():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:] = (40, 40, 40)
    ramp = np.linspace(0, 1, 22)[None, :, None]
    red, blue = np.asarray(PALETTE["red"]), np.asarray(PALETTE["blue"])
    image[10:22, 5:27] = np.rint(red * (1 - ramp) + blue * ramp).astype(np.uint8)
    assert evaluate(image, [("circle", "red"), ("square", "blue")]).status == [MERGED, MERGED]


def test_one_oversized_component_is_merged_for_shape_only_prompts():
    image, _ = render([("square", "green", (3, 3, 27, 23))])
    assert evaluate(image, [("circle", None), ("square", None)]).status == [MERGED, MERGED]
