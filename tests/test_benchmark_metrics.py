"""The benchmark's per-image metrics on hand-made images and masks, and on rendered scenes with
known objects; the prompt families' sets."""

import numpy as np
import torch
import pytest

from ela_ext.config import ElaConfig

from benchmark.judge.evaluate import COLOURS, OK, evaluate, pixel_labels
from benchmark.judge.families import FAMILIES, family_prompts
from benchmark.judge.metrics import (centroid, centroid_shifts, clean_objects, colour_purity, interior, kept_rate,
                                     localisation_iou, mask_iou, pixel_change, upsample_mask)
from benchmark.models.scenes import PALETTE, is_held_out, parse_prompt, render, training_scene
from benchmark.paths import BUNDLED_WEIGHTS


def test_kept_counts_only_images_right_without_anchoring():
    assert kept_rate([True, True, False, True], [True, False, True, True]) == pytest.approx(2 / 3)
    assert kept_rate([False, False], [True, True]) is None


def test_pixel_change_and_centroid_shift_by_hand():
    black = np.zeros((4, 4, 3), np.uint8)
    half = black.copy()
    half[:2] = 255  # half the pixels at full range
    assert pixel_change(black, half) == pytest.approx(0.5)
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:3] = True  # centre (1.5, 1.5)
    moved = np.roll(mask, (3, 4), axis=(0, 1))  # centre (4.5, 5.5): 5 pixels away
    assert centroid(mask) == (1.5, 1.5) and centroid(np.zeros((2, 2), bool)) is None
    assert centroid_shifts([centroid(mask), None], [centroid(moved), (0.0, 0.0)]) == [pytest.approx(5.0)]


def test_mask_iou_upsamples_the_attention_mask():
    coarse = np.zeros((2, 2), bool)
    coarse[0, 0] = True
    assert upsample_mask(coarse, (4, 4)).sum() == 4
    region = np.zeros((4, 4), bool)
    region[0:2, 0:4] = True  # the top half: IoU with the top-left quarter is 4 / 8
    assert mask_iou(coarse, region) == pytest.approx(0.5)
    assert mask_iou(coarse, np.zeros((4, 4), bool)) is None


def test_localisation_iou_on_a_rendered_scene_with_known_objects():
    # boxes on the 4-pixel cells of an 8x8 map: the square's cells are exactly its region
    image, truth = render([("circle", "red", (4, 4, 16, 16)), ("square", "blue", (20, 16, 32, 28))])
    regions = [obj.mask for obj in truth]
    # the true regions at the attention map's 8x8 resolution (a cell is 4x4 pixels, kept if half covered)
    exact = np.stack([r.reshape(8, 4, 8, 4).mean((1, 3)) >= 0.5 for r in regions])
    swapped = exact[::-1]
    assert mask_iou(exact[1], regions[1]) == 1.0
    assert localisation_iou(exact, regions) > 0.8
    assert localisation_iou(swapped, regions) == 0.0
    assert localisation_iou(exact, [regions[0], np.zeros_like(regions[1])]) == pytest.approx(
        mask_iou(exact[0], regions[0]))  # a missing object is not scored
    assert image.shape == (32, 32, 3)


def test_interior_and_colour_purity_on_hand_made_masks():
    block = np.zeros((6, 6), bool)
    block[1:5, 1:5] = True
    assert interior(block).sum() == 4 and interior(block)[2:4, 2:4].all()
    assert interior(np.ones((3, 3), bool)).tolist() == [[False] * 3, [False, True, False], [False] * 3]
    labels = np.full((6, 6), -1)
    labels[1:5, 1:3], labels[1:5, 3:5] = 0, 1  # left half colour 0, right half colour 1
    assert colour_purity(labels, block, "blue") == 0.5  # COLOURS[0]: of the interior, one column
    assert colour_purity(labels, block, None) == 0.0  # an object without a colour of its own
    line = np.zeros((6, 6), bool)
    line[1:5, 2:4] = True  # two pixels wide: no interior
    assert colour_purity(labels, line, "blue") is None


def test_renders_are_clean_and_edges_do_not_count():
    flags, edge_purities = [], []
    for seed in range(60):
        scene = training_scene(seed)
        report = evaluate(scene.image, [(obj.shape, obj.colour) for obj in scene.objects])
        flags += clean_objects(scene.image, report)
        _, labels = pixel_labels(scene.image)
        edge_purities += [float(np.mean(labels[c.mask] == COLOURS.index(c.colour))) for c in report.components]
    assert len(flags) > 60 and all(flag is True for flag in flags)
    assert min(edge_purities) < 0.9  # the whole mask, edges included, would call renders dirty


def test_an_object_in_two_colours_is_dirty_though_the_evaluator_calls_it_right():
    objects = [("square", "blue"), ("circle", "red")]
    image, truth = render([("square", "blue", (2, 2, 14, 14)), ("circle", "red", (18, 16, 30, 28))])
    assert clean_objects(image, evaluate(image, objects)) == [True, True]
    mixed = image.copy()
    mixed[truth[0].mask & (np.arange(32) >= 10)[None, :]] = PALETTE["white"]  # its right third white
    report = evaluate(mixed, objects)
    assert report.status == [OK, OK]
    assert clean_objects(mixed, report) == [False, True]
    assert clean_objects(mixed, evaluate(mixed, [("square", "blue"), ("triangle", "green")]))[1] is None


def test_families_are_distinct_and_development_sets_disjoint_from_the_reported_ones():
    for family in FAMILIES:
        reported, development = family_prompts(family, 0, 48), family_prompts(family, 1, 12)
        assert len(set(reported)) == 48 and len(development) == 12
        assert not set(reported) & set(development)
    assert all(len(parse_prompt(p)) == 3 for p in family_prompts("three", 0))
    seen = [parse_prompt(p) for p in family_prompts("seen", 0)]
    assert all(len(objects) == 2 for objects in seen)
    assert not any(is_held_out([(s, c) for s, c in objects]) for objects in seen)
    assert all(is_held_out([(s, c) for s, c in parse_prompt(p)]) for p in family_prompts("held_out", 0))
    single = family_prompts("single", 0)
    assert len(set(single)) == 16 and all(len(parse_prompt(p)) == 1 and parse_prompt(p)[0][1] for p in single)
    for seed in (1, 4):
        development = family_prompts("single", seed, 6)
        assert len(set(development)) == 6 and not set(development) & set(single)
    assert FAMILIES == ("held_out", "seen", "three")  # the default of every tool that anchors
    with pytest.raises(ValueError, match="unknown prompt family"):
        family_prompts("four", 0)


def test_mask_variants_on_hand_made_maps():
    from benchmark.studies.mask_quality import GROWN_SHARE, variant_masks
    from ela_ext.tokens import EntityColumns, ResolvedEntity

    maps = torch.full((77, 8, 8), 1e-3)
    maps[2, :, :4] = torch.linspace(1, 2, 32).reshape(8, 4)  # 'circle' on the left half
    maps[5, :, 4:] = torch.linspace(1, 2, 32).reshape(8, 4)  # 'square' on the right half
    target = EntityColumns((ResolvedEntity("circle", (2,), ()), ResolvedEntity("square", (5,), ())), (0,))
    grown = variant_masks(maps, target, "grown")
    assert grown.sum(axis=(1, 2)).tolist() == [round(GROWN_SHARE * 64)] * 2
    assert not grown[0][:, 4:].any() and not grown[1][:, :4].any()  # inside each one's dominance
    otsu = variant_masks(maps, target, "otsu")
    assert 0 < otsu[0].sum() <= 32 and not otsu[0][:, 4:].any()


def test_auc_of_low_loss_predicting_right_images_by_hand():
    from benchmark.studies.loss_outcome import auc_low_is_right
    losses = np.array([0.1, 0.2, 0.5, 0.3, 0.2])
    right = np.array([True, True, False, False, False])
    # right 0.1 beats all 3 wrong; right 0.2 beats 0.5 and 0.3 and ties 0.2: (3 + 2.5) / 6
    assert auc_low_is_right(losses, right) == pytest.approx(5.5 / 6)
    assert auc_low_is_right(losses, ~right) == pytest.approx(0.5 / 6)
    assert np.isnan(auc_low_is_right(losses, np.zeros(5, dtype=bool)))


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_loss_outcome_scores_each_anchored_step_of_an_off_trajectory():
    from benchmark.studies.loss_outcome import prompt_losses
    from benchmark.models.model import load_model
    right, losses = prompt_losses(load_model(BUNDLED_WEIGHTS), "a white triangle and a green cross", [0, 1], 10,
                                  5.0, ElaConfig(), ["ela_enhance", "ela"])
    assert right.shape == (2,) and losses.shape == (2, 3, 2)  # window 0-0.3 of 10 steps: steps 0, 1, 2
    assert np.isfinite(losses).all() and (losses >= 0).all() and (losses <= 1).all()
    assert (losses[..., 0] != losses[..., 1]).all()  # the presence term changes the loss


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_mask_quality_scores_every_variant_at_every_anchored_step():
    from benchmark.studies.mask_quality import VARIANTS, score_prompt
    from benchmark.models.model import load_model
    scores = score_prompt(load_model(BUNDLED_WEIGHTS), "a red circle and a blue square", [0, 1], 10, 5.0, ElaConfig())
    assert {key for key in scores if key[0] != "objects"} == {(v, s) for v in VARIANTS for s in range(3)}
    for (variant, _), values in scores.items():
        if variant != "objects":
            assert len(values) == 2 and all(iou is None or 0 <= iou <= 1 for iou, _ in values)
            assert all(0 < share < 1 for _, share in values)
