"""Localisation and objectives against hand-computed tensors (method.md, ELA Eqs. 5-7)."""

import math

import pytest
import torch

from ela_ext.tokens import EntityColumns, ResolvedEntity
from ela_ext.localize import binarize, dominance_masks, localize, otsu_threshold, word_map
from ela_ext.objectives import (OBJECTIVES, ObjectiveInput, attend_excite_loss, attenuation_loss,
                                center_of_mass_loss, cluster_loss, concentration_loss, ela_loss, iou_loss,
                                ela_enhance_loss, kl_loss, separate_enhance_loss)

A = torch.tensor([[[0.2, 0.0], [0.6, 0.2]]])
M = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])


def test_concentration_eq5_by_hand():
    assert concentration_loss(A, M).item() == pytest.approx((1 - 0.8 / 1.0) ** 2)


def test_attenuation_eq6_by_hand():
    # outside the mask only the bottom-right 0.2, divided by the peak 0.6, squared, mean of 4 pixels
    assert attenuation_loss(A, M).item() == pytest.approx((0.2 / 0.6) ** 2 / 4)


def test_ela_eq7_mixes_both_with_lambda():
    inputs = ObjectiveInput(A, M, [0], torch.ones(2, 2), lambda_weight=0.25)
    assert ela_loss(inputs).item() == pytest.approx(0.75 * 0.04 + 0.25 * (0.2 / 0.6) ** 2 / 4)
    inputs.lambda_weight = 0.0
    assert ela_loss(inputs).item() == pytest.approx(0.04)


def test_word_map_is_the_mean_of_its_columns():
    maps = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 2, 2)
    assert torch.equal(word_map(maps, [0, 2]), (maps[0] + maps[2]) / 2)


def test_otsu_splits_a_bimodal_map():
    values = torch.tensor([0.05, 0.1, 0.12, 0.08, 0.9, 0.85, 0.95, 0.88])
    threshold = otsu_threshold(values)
    assert 0.12 < threshold < 0.85
    assert binarize(values.reshape(2, 4)).sum() == 4


def two_entity_scene():
    """4x4: entity 0 on the left columns, entity 1 on the right, start-of-text on the top row."""
    left = torch.tensor([[1.0, 0.8, 0.1, 0.0]] * 4)
    right = left.flip(1) * 0.3  # a weak entity: only normalisation gives it its pixels
    sot = torch.zeros(4, 4)
    sot[0] = 1.0
    return torch.stack([left, right]), sot


def test_two_entity_masks_use_normalised_dominance_and_drop_background():
    entity_maps, sot = two_entity_scene()
    result = localize(entity_maps, sot, ["cat", "frog"])
    expected_left = torch.zeros(4, 4, dtype=torch.bool)
    expected_left[1:, :2] = True
    assert torch.equal(result.entity_masks[0], expected_left)
    assert torch.equal(result.entity_masks[1], expected_left.flip(1))
    assert result.fallbacks == []


def test_three_entities_take_the_argmax():
    maps = torch.zeros(3, 1, 3)
    maps[0, 0, 0], maps[1, 0, 1], maps[2, 0, 2] = 1.0, 2.0, 0.5
    maps += 0.01
    masks = dominance_masks(maps)
    assert torch.equal(masks[:, 0], torch.eye(3, dtype=torch.bool))


def test_degenerate_masks_fall_back_to_top_pixels_and_say_so():
    same = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    result = localize(torch.stack([same, same]), torch.zeros(4, 4), ["cat", "frog"])
    assert [int(m.sum()) for m in result.entity_masks] == [4, 4]  # h*w / (2n)
    assert len(result.fallbacks) == 2 and "cat: empty mask" in result.fallbacks[0]
    # a single entity dominates everywhere: its mask is where its own map is high, never all
    single = localize(same[None], torch.zeros(4, 4), ["cat"])
    assert torch.equal(single.entity_masks[0], binarize(same)) and single.fallbacks == []


def test_near_zero_background_goes_to_no_entity():
    """Where every entity map is ~0, a zero-threshold dominance would hand the pixels to the
    larger noise; the entity's own binarised map keeps them out of both masks."""
    small = torch.zeros(4, 4)
    small[0, 0] = 1.0
    other = torch.zeros(4, 4)
    other[3, 3] = 1.0
    noise = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) * 1e-3
    result = localize(torch.stack([small + noise, other + noise.flip(0)]), torch.zeros(4, 4), ["dot", "box"])
    assert [int(mask.sum()) for mask in result.entity_masks] == [1, 1]
    assert result.entity_masks[0, 0, 0] and result.entity_masks[1, 3, 3]


def inputs_for(maps, masks=None, text_share=None):
    masks = torch.zeros_like(maps) if masks is None else masks
    share = torch.ones(maps.shape[-2:]) if text_share is None else text_share
    return ObjectiveInput(maps, masks, list(range(maps.shape[0])), share)


def test_attend_and_excite_is_the_weakest_peak():
    maps = torch.tensor([[[0.9, 0.1]], [[0.3, 0.2]]])
    assert attend_excite_loss(inputs_for(maps)).item() == pytest.approx(0.7)


def test_overlap_objectives_order_overlapping_above_separated():
    apart = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 1.0]]]) + 1e-6
    together = torch.tensor([[[0.5, 0.5, 0.0, 0.0]], [[0.5, 0.5, 0.0, 0.0]]]) + 1e-6
    for objective in (iou_loss, center_of_mass_loss, kl_loss, cluster_loss, separate_enhance_loss):
        assert objective(inputs_for(apart)) < objective(inputs_for(together)), objective.__name__
    assert iou_loss(inputs_for(together)).item() == pytest.approx(1.0, abs=1e-4)
    assert iou_loss(inputs_for(apart)).item() == pytest.approx(0.0, abs=1e-4)
    # centres at x = 1/8 and 7/8 of a 1x4 map: distance 3/4
    assert center_of_mass_loss(inputs_for(apart)).item() == pytest.approx(1 - 0.75 / math.sqrt(2), abs=1e-4)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_is_bounded_and_differentiable(name):
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    inputs = ObjectiveInput(maps, (torch.rand(3, 4, 4) > 0.5).float(), [0, 0, 1], torch.full((4, 4), 2.0),
                            column_maps=maps, target=EntityColumns((ResolvedEntity("a", (0,), ()),
                                                                    ResolvedEntity("b", (2,), ())), (), (0, 1, 2)))
    loss = OBJECTIVES[name](inputs)
    assert 0.0 <= loss.item() <= 1.0
    (grad,) = torch.autograd.grad(loss, [maps])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_a_start_of_text_map_on_the_objects_does_not_erase_them():
    """Where the start-of-text map peaks on an entity (not the background, as in SD), removing it
    would empty the mask: the entity keeps its own dominant region, reported as a fallback."""
    entity_maps, _ = two_entity_scene()
    sot_on_cat = entity_maps[0].clone()
    result = localize(entity_maps, sot_on_cat, ["cat", "frog"])
    expected_left = torch.zeros(4, 4, dtype=torch.bool)
    expected_left[:, :2] = True
    assert torch.equal(result.entity_masks[0], expected_left)
    assert torch.equal(result.entity_masks[1], expected_left.flip(1))
    assert result.fallbacks == ["cat: the start-of-text map covered its region, kept the region"]


def test_ela_enhance_adds_presence_that_pure_ela_lacks():
    """Scaling a weak entity's attention up leaves ELA's Eqs. 5-7 unchanged (both are invariant to
    an entity map's scale) but lowers ela_enhance, by Enhance's share of the text attention."""
    strong = torch.zeros(4, 4)
    strong[:2, :2] = 0.5
    weak = torch.zeros(4, 4)
    weak[2:, 2:] = 0.05
    masks = torch.stack([strong > 0, weak > 0]).float()
    share = torch.ones(4, 4)
    before = ObjectiveInput(torch.stack([strong, weak]), masks, [0, 1], share)
    after = ObjectiveInput(torch.stack([strong, weak * 8]), masks, [0, 1], share)
    assert ela_loss(after).item() == pytest.approx(ela_loss(before).item(), abs=1e-6)
    assert ela_enhance_loss(after) < ela_enhance_loss(before)
    expected = (ela_loss(before) + ((1 - 0.5) + (1 - 0.05)) / 2) / 2
    assert ela_enhance_loss(before).item() == pytest.approx(expected.item())


def test_attend_excite_paper_softmaxes_text_tokens_and_smooths_before_the_max():
    """A&E's own form: per pixel a softmax over the text tokens at temperature 1/100, a 3x3
    Gaussian (sigma 0.5) before the max. Entity 0 wins only the centre pixel, so its smoothed
    peak is the kernel's centre weight; entity 1 wins the rest and is not the weakest."""
    cat = torch.zeros(3, 3)
    cat[1, 1] = 0.5
    frog = 0.5 - cat
    inputs = ObjectiveInput(torch.stack([cat, frog]), torch.zeros(2, 3, 3), [0, 1], torch.ones(3, 3),
                            column_maps=torch.stack([torch.ones(3, 3), cat, frog]),  # start-of-text first
                            target=EntityColumns((ResolvedEntity("cat", (1,), ()), ResolvedEntity("frog", (2,), ())),
                                                 (0,), (1, 2)))
    edge = math.exp(-2)  # exp(-1 / (2 * 0.5^2))
    centre_weight = (1 / (1 + 2 * edge)) ** 2
    assert OBJECTIVES["attend_excite_paper"](inputs).item() == pytest.approx(1 - centre_weight, abs=1e-4)
    assert attend_excite_loss(inputs).item() == pytest.approx(0.5)  # the project's form: 1 - raw peak
    with pytest.raises(ValueError, match="text-token columns"):
        OBJECTIVES["attend_excite_paper"](ObjectiveInput(inputs.word_maps, inputs.word_masks, [0, 1], torch.ones(3, 3)))
