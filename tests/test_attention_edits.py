"""The attention edits of the fidelity command, on a real tiny diffusers UNet and a tiny random SD3
transformer (the benchmark's MM-DiT, and SD3.5-m's block kinds): each is the layer's own attention
while inactive, and while active changes exactly what it names."""

import pytest
import torch

from benchmark.commands import mmdit_cost
from benchmark.models.attention_edits import (DenseModulation, EditedAttention, EditedJointAttention, MapRecorder,
                                              MapReplay, StripConfinement, attention_layers, edited, editable_layers,
                                              strip_masks)
from benchmark.models.mmdit import MMDiTConfig, build_transformer, velocity
from benchmark.models.tiny_unet import CONTEXT_DIM
from ela_ext.tokens import EntityColumns, ResolvedEntity, WordColumns

# "a black cat and a frog": the cat (column 3) with its attribute (column 2), the frog (column 6)
TARGET = EntityColumns(
    entities=(ResolvedEntity("cat", (3,), (WordColumns("black", (2,)),)), ResolvedEntity("frog", (6,), ())),
    sot_columns=(0,))
HEADS = 2
IMAGE = 64  # an MM-DiT's image tokens: a 4x16x16 latent in 2x2 patches, an 8x8 map


@pytest.fixture(scope="module")
def tiny_mmdit():
    return build_transformer(MMDiTConfig(text_hidden=CONTEXT_DIM, depth=3, heads=HEADS, head_dim=8), (4, 16, 16)).eval()


def joint_scores(seed: int) -> torch.Tensor:
    """A joint block's scores for one conditional and one unconditional image: image tokens, then 77 text."""
    return torch.randn(2 * HEADS, IMAGE + 77, IMAGE + 77, generator=torch.Generator().manual_seed(seed)) * 3


def test_strips_partition_the_map():
    strips = strip_masks(3, 6)
    assert torch.equal(strips.sum(0), torch.ones(36))
    assert strips[0].reshape(6, 6)[:, :2].all() and not strips[0].reshape(6, 6)[:, 2:].any()


def test_edited_layers_compute_their_own_attention_and_are_restored(tiny_unet, context):
    latent = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = context.expand(2, -1, -1)
    layers = editable_layers(tiny_unet)
    assert layers == attention_layers(tiny_unet, cross=True) + attention_layers(tiny_unet, cross=False)
    assert {name.rsplit(".", 1)[1] for name, _ in layers} == {"attn1", "attn2"}
    with torch.no_grad():
        own = tiny_unet(latent, 500, encoder_hidden_states=context).sample
        inactive = [StripConfinement([TARGET, TARGET]), DenseModulation([TARGET, TARGET]), MapReplay({}, 2)]
        with edited(layers, inactive):
            assert torch.allclose(tiny_unet(latent, 500, encoder_hidden_states=context).sample, own, atol=1e-5)
        assert torch.equal(tiny_unet(latent, 500, encoder_hidden_states=context).sample, own)


def test_confinement_zeroes_entity_columns_outside_their_strip_and_only_renormalises_the_rest():
    scores = torch.randn(2 * HEADS, 64, 77, generator=torch.Generator().manual_seed(1))
    probs = scores.softmax(-1)
    edit = StripConfinement([TARGET])  # one conditional image; rows HEADS.. are the unconditional one
    assert torch.equal(edit.probs("layer", probs, HEADS, cross=True), probs)  # inactive
    edit.at_step(0, 1.0, active=True)
    assert torch.equal(edit.probs("layer", probs, HEADS, cross=False), probs)  # self-attention untouched
    confined = EditedAttention("layer", [edit]).probs(scores, HEADS, cross=True)  # the edit, then each row renormalised
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
    assert torch.allclose(confined[HEADS:], probs[HEADS:])  # the unconditional rows


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



@pytest.mark.parametrize("layout", ["benchmark", "sd35m"])
def test_edited_joint_attention_is_the_stock_processor_and_comes_off(layout, tiny_mmdit):
    """With no edit active, the stock ``JointAttnProcessor2_0``'s output: the benchmark's MM-DiT (no q/k
    norm), and SD3.5-m's block kinds (q/k RMS norms, an image-only ``attn2`` left alone, the
    context-pre-only last block); every processor is back after the block, an exception's exit too."""
    model = tiny_mmdit if layout == "benchmark" else mmdit_cost.build_transformer("sd35m", "tiny").eval()
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, model.config.in_channels, model.config.sample_size, model.config.sample_size,
                         generator=generator)
    context = torch.randn(2, 77, model.config.joint_attention_dim, generator=generator)

    def forward() -> torch.Tensor:
        pooled = torch.zeros(2, model.config.pooled_projection_dim)
        return model(latent, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=torch.full((2,), 500.0)).sample

    layers = editable_layers(model)
    blocks = range(len(model.transformer_blocks))
    assert [name for name, _ in layers] == [f"transformer_blocks.{index}.attn" for index in blocks]
    stock = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
    inactive = [StripConfinement([TARGET, TARGET]), DenseModulation([TARGET, TARGET]), MapReplay({}, 2)]
    with torch.no_grad():
        own = forward()
        with edited(layers, inactive):
            now = {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}
            assert {name for name in stock if now[name] is not stock[name]} == {name for name, _ in layers}
            assert all(isinstance(module.processor, EditedJointAttention) for _, module in layers)
            torch.testing.assert_close(forward(), own, rtol=1e-5, atol=1e-5)
        with pytest.raises(KeyboardInterrupt), edited(layers, inactive):
            raise KeyboardInterrupt
        assert torch.equal(forward(), own)
    assert all(module.processor is stock[name] for name, module in model.named_modules() if name in stock)


def test_joint_confinement_zeroes_entity_columns_outside_their_strip_in_the_image_rows_only():
    scores = joint_scores(6)
    plain = scores.softmax(-1)
    edit = StripConfinement([TARGET])
    edit.at_step(0, 1.0, active=True)
    confined = EditedJointAttention("block", [edit]).probs(scores, IMAGE, HEADS)
    left, right = strip_masks(2, 8).bool()
    removed = torch.zeros_like(plain, dtype=torch.bool)
    removed[:HEADS, :IMAGE, IMAGE + 2:IMAGE + 4] = ~left[None, :, None]
    removed[:HEADS, :IMAGE, IMAGE + 6] = ~right[None, :]
    assert not confined[removed].any()
    # every other key of a row, text or image, scaled by one factor: the row renormalised over all its keys
    row_factor = (1 / (plain * ~removed).sum(-1, keepdim=True)).expand_as(plain)
    assert torch.allclose((confined / plain)[~removed], row_factor[~removed], rtol=1e-4)
    assert torch.allclose(confined.sum(-1), torch.ones(2 * HEADS, IMAGE + 77))
    assert torch.equal(confined[:, IMAGE:], plain[:, IMAGE:])  # the text queries' rows
    assert torch.allclose(confined[HEADS:], plain[HEADS:])  # the unconditional image


def test_joint_dense_modulation_changes_only_the_pairs_it_names():
    scores = joint_scores(7)
    edit = DenseModulation([TARGET])
    edit.at_step(0, 0.9, active=True)
    # the edit's own formula on the image rows' text keys (cross) and image keys (self), each its own row range
    expected = scores.clone()
    expected[:, :IMAGE, IMAGE:] = edit.scores("block", scores[:, :IMAGE, IMAGE:], HEADS, cross=True)
    expected[:, :IMAGE, :IMAGE] = edit.scores("block", scores[:, :IMAGE, :IMAGE], HEADS, cross=False)
    changed = expected != scores
    entity_keys = [IMAGE + column for column in (2, 3, 6)]
    assert changed[:HEADS, :IMAGE, entity_keys].float().mean() > 0.9
    assert changed[:HEADS, :IMAGE, :IMAGE].float().mean() > 0.9
    changed[:HEADS, :IMAGE, entity_keys] = False
    changed[:HEADS, :IMAGE, :IMAGE] = False
    assert not changed.any()  # no other text column, no text query, nothing of the unconditional image
    modulated = EditedJointAttention("block", [edit]).probs(scores, IMAGE, HEADS)
    torch.testing.assert_close(modulated, expected.softmax(-1))


def test_joint_replay_moves_the_text_attention_at_each_rows_own_text_mass():
    first, second = joint_scores(8), joint_scores(9)
    recorder = MapRecorder(rows=1)
    recorder.at_step(0, 1.0, active=True)
    EditedJointAttention("block", [recorder]).probs(first, IMAGE, HEADS)
    recorded = recorder.maps[(0, "block")]
    # the text part renormalised over the text columns: the softmax of the text logits alone (the engine's maps)
    torch.testing.assert_close(recorded, first[:HEADS, :IMAGE, IMAGE:].softmax(-1))
    replay = MapReplay(recorder.maps, rows=1)
    replay.at_step(0, 1.0, active=True)
    replayed = EditedJointAttention("block", [replay]).probs(second, IMAGE, HEADS)
    plain = second.softmax(-1)
    text_mass = replayed[:HEADS, :IMAGE, IMAGE:].sum(-1, keepdim=True)
    torch.testing.assert_close(text_mass, plain[:HEADS, :IMAGE, IMAGE:].sum(-1, keepdim=True))
    torch.testing.assert_close(replayed[:HEADS, :IMAGE, IMAGE:] / text_mass, recorded)
    torch.testing.assert_close(replayed[:HEADS, :IMAGE, :IMAGE], plain[:HEADS, :IMAGE, :IMAGE])  # image part
    torch.testing.assert_close(replayed[HEADS:], plain[HEADS:])
    assert torch.equal(replayed[:, IMAGE:], plain[:, IMAGE:])


def test_joint_replay_reproduces_the_recorded_maps_bit_for_bit(tiny_mmdit, context):
    layers = editable_layers(tiny_mmdit)
    first, second = (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (4, 5))
    context, sigma = context.expand(2, -1, -1), torch.full((2,), 0.7)
    recorder = MapRecorder(rows=1)
    recorder.at_step(0, 0.7, active=True)
    with torch.no_grad(), edited(layers, [recorder]):
        velocity(tiny_mmdit, first, sigma, context)
    assert {layer for _, layer in recorder.maps} == {name for name, _ in layers}
    assert all(record.shape == (HEADS, IMAGE, 77) for record in recorder.maps.values())
    replay, again, plain = MapReplay(recorder.maps, rows=1), MapRecorder(rows=1), MapRecorder(rows=1)
    for edit in (replay, again, plain):
        edit.at_step(0, 0.7, active=True)
    with torch.no_grad():
        with edited(layers, [plain]):
            velocity(tiny_mmdit, second, sigma, context)
        with edited(layers, [replay, again]):
            velocity(tiny_mmdit, second, sigma, context)
    assert all(torch.equal(again.maps[key], recorder.maps[key]) for key in recorder.maps)
    assert not all(torch.equal(plain.maps[key], recorder.maps[key]) for key in recorder.maps)
