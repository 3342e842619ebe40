"""The maps-forcing diagnostic: its processor is the layer's own attention while inactive, and
while active an entity's columns get no attention outside its strip."""

import torch

from benchmark.studies.maps_steer import LayoutAttention, processors, strip_masks
from ela_ext.capture import find_cross_attention_layers
from ela_ext.tokens import EntityColumns, ResolvedEntity, WordColumns

TARGET = EntityColumns(
    entities=(ResolvedEntity("cat", (2,), (WordColumns("black", (1,)),)), ResolvedEntity("frog", (5,), ())),
    sot_columns=(0,))


def test_strips_partition_the_map():
    strips = strip_masks(3, 6)
    assert torch.equal(strips.sum(0), torch.ones(36))
    assert strips[0].reshape(6, 6)[:, :2].all() and not strips[0].reshape(6, 6)[:, 2:].any()


def test_inactive_is_the_layers_own_attention_and_active_confines(tiny_unet, context):
    layer = find_cross_attention_layers(tiny_unet)[0][1]
    hidden = torch.randn(2, 64, layer.to_q.in_features, generator=torch.Generator().manual_seed(0))
    context = context.expand(2, -1, -1)
    with torch.no_grad():
        own = layer(hidden, encoder_hidden_states=context)
        processor = LayoutAttention([TARGET])
        with processors([layer], processor):
            assert torch.allclose(layer(hidden, encoder_hidden_states=context), own, atol=1e-5)
            processor.active = True
            forced = layer(hidden, encoder_hidden_states=context)
        assert torch.equal(layer(hidden, encoder_hidden_states=context), own)  # processor restored
    assert not torch.allclose(forced, own, atol=1e-4)
    probs = torch.softmax(torch.randn(2 * layer.heads, 64, 77), -1)
    confined = processor.confined(probs, layer.heads)
    strips = strip_masks(2, 8)
    first_row = confined[:layer.heads]
    assert first_row[:, strips[0] == 0][:, :, [1, 2]].abs().max() == 0  # "black cat" only on the left
    assert first_row[:, strips[1] == 0][:, :, 5].abs().max() == 0
    assert torch.allclose(confined.sum(-1), torch.ones(2 * layer.heads, 64))
    assert torch.allclose(confined[layer.heads:], probs[layer.heads:])  # the unconditional row: only renormalised
