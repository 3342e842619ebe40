"""The attention edits of the fidelity command, on a real tiny diffusers UNet: each is the layer's
own attention while inactive, and while active changes exactly what it names."""

import torch

from benchmark.models.attention_edits import (DenseModulation, MapRecorder, MapReplay,
                                              StripConfinement, attention_layers, edited, strip_masks)
from ela_ext.tokens import EntityColumns, ResolvedEntity, WordColumns

# "a black cat and a frog": the cat (column 3) with its attribute (column 2), the frog (column 6)
TARGET = EntityColumns(
    entities=(ResolvedEntity("cat", (3,), (WordColumns("black", (2,)),)), ResolvedEntity("frog", (6,), ())),
    sot_columns=(0,))
HEADS = 2


def test_strips_partition_the_map():
    strips = strip_masks(3, 6)
    assert torch.equal(strips.sum(0), torch.ones(36))
    assert strips[0].reshape(6, 6)[:, :2].all() and not strips[0].reshape(6, 6)[:, 2:].any()


def test_edited_layers_compute_their_own_attention_and_are_restored(tiny_unet, context):
    latent = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = context.expand(2, -1, -1)
    layers = attention_layers(tiny_unet, cross=True) + attention_layers(tiny_unet, cross=False)
    assert {name.rsplit(".", 1)[1] for name, _ in layers} == {"attn1", "attn2"}
    with torch.no_grad():
        own = tiny_unet(latent, 500, encoder_hidden_states=context).sample
        inactive = [StripConfinement([TARGET, TARGET]), DenseModulation([TARGET, TARGET]), MapReplay({}, 2)]
        with edited(layers, inactive):
            assert torch.allclose(tiny_unet(latent, 500, encoder_hidden_states=context).sample, own, atol=1e-5)
        assert torch.equal(tiny_unet(latent, 500, encoder_hidden_states=context).sample, own)


def test_confinement_zeroes_entity_columns_outside_their_strip_and_only_renormalises_the_rest():
    probs = torch.softmax(torch.randn(2 * HEADS, 64, 77, generator=torch.Generator().manual_seed(1)), -1)
    edit = StripConfinement([TARGET])  # one conditional image; rows HEADS.. are the unconditional one
    assert torch.equal(edit.probs("layer", probs, HEADS, cross=True), probs)  # inactive
    edit.at_step(0, 1.0, active=True)
    assert torch.equal(edit.probs("layer", probs, HEADS, cross=False), probs)  # self-attention untouched
    confined = edit.probs("layer", probs, HEADS, cross=True)
    left, right = strip_masks(2, 8).bool()
    cond, forced = probs[:HEADS], confined[:HEADS]
    assert forced[:, ~left][:, :, [2, 3]].abs().max() == 0 and forced[:, ~right][:, :, 6].abs().max() == 0
    kept = torch.ones(HEADS, 64, 77, dtype=torch.bool)
    kept[:, ~left, 2:4] = False
    kept[:, ~right, 6] = False
    ratio = forced / cond  # each pixel's surviving probabilities scaled by one factor
    row_factor = (1 / (cond * kept).sum(-1, keepdim=True)).expand_as(ratio)
    assert torch.allclose(ratio[kept], row_factor[kept], rtol=1e-4)
    assert torch.allclose(confined.sum(-1), torch.ones(2 * HEADS, 64))
    assert torch.equal(confined[HEADS:], probs[HEADS:])  # the unconditional rows


def test_dense_modulation_changes_only_the_pairs_it_names():
    scores = torch.randn(2 * HEADS, 64, 77, generator=torch.Generator().manual_seed(2))
    edit = DenseModulation([TARGET])
    assert torch.equal(edit.scores("layer", scores, HEADS, cross=True), scores)  # inactive
    edit.at_step(0, 0.9, active=True)
    modulated = edit.scores("layer", scores, HEADS, cross=True)
    left, right = strip_masks(2, 8).bool()
    change = modulated[:HEADS] - scores[:HEADS]
    assert torch.equal(modulated[HEADS:], scores[HEADS:])  # the unconditional rows
    other = [c for c in range(77) if c not in (2, 3, 6)]
    assert torch.equal(change[:, :, other], torch.zeros_like(change[:, :, other]))  # columns of no entity
    # raised towards the row's maximum inside the strip, lowered towards its minimum outside
    assert (change[:, left][:, :, [2, 3]] >= 0).all() and (change[:, ~left][:, :, [2, 3]] <= 0).all()
    assert (change[:, right][:, :, 6] >= 0).all() and (change[:, ~right][:, :, 6] <= 0).all()
    assert (change[:, :, [2, 3, 6]] != 0).float().mean() > 0.9
    high = scores[:HEADS].max(-1, keepdim=True).values
    expected = 0.9 ** 5 * (1 - 0.5) * (high - scores[:HEADS])  # w^c = 1, each strip half the map
    assert torch.allclose(change[:, left][:, :, 3], expected[:, left][:, :, 3], atol=1e-5)
    edit.at_step(0, 0.0, active=True)  # lambda_t = (t/T)^5 vanishes at the end of sampling
    assert torch.equal(edit.scores("layer", scores, HEADS, cross=True), scores)


def test_dense_modulation_in_self_attention_pairs_pixels_of_one_strip():
    scores = torch.randn(2 * HEADS, 16, 16, generator=torch.Generator().manual_seed(3))
    edit = DenseModulation([TARGET])
    edit.at_step(0, 1.0, active=True)
    change = edit.scores("layer", scores, HEADS, cross=False)[:HEADS] - scores[:HEADS]
    left = strip_masks(2, 4)[0].bool()
    same = left[:, None] == left[None, :]
    assert (change[:, same] >= 0).all() and (change[:, ~same] <= 0).all() and change[:, ~same].abs().sum() > 0
    low = scores[:HEADS].min(-1, keepdim=True).values
    assert torch.allclose(change[:, ~same], (-0.3 * 0.5 * (scores[:HEADS] - low))[:, ~same], atol=1e-5)


def test_replay_reproduces_the_recorded_maps_bit_for_bit(tiny_unet, context):
    layers = attention_layers(tiny_unet, cross=True)
    first, second = (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (4, 5))
    context = context.expand(2, -1, -1)
    recorder = MapRecorder(rows=1)
    recorder.at_step(0, 1.0, active=True)
    with torch.no_grad(), edited(layers, [recorder]):
        tiny_unet(first, 500, encoder_hidden_states=context)
    assert {layer for _, layer in recorder.maps} == {name for name, _ in layers}
    replay, again = MapReplay(recorder.maps, rows=1), MapRecorder(rows=1)
    plain = MapRecorder(rows=1)
    for edit in (replay, again, plain):
        edit.at_step(0, 1.0, active=True)
    with torch.no_grad():
        with edited(layers, [plain]):
            tiny_unet(second, 500, encoder_hidden_states=context)
        with edited(layers, [replay, again]):
            tiny_unet(second, 500, encoder_hidden_states=context)
    assert all(torch.equal(again.maps[key], recorder.maps[key]) for key in recorder.maps)
    assert not all(torch.equal(plain.maps[key], recorder.maps[key]) for key in recorder.maps)

