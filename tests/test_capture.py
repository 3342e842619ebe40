"""Attention capture and the truncated grad pass on a real (tiny) diffusers UNet."""

import pytest
import torch
from torch import nn

from ela_ext.capture import (AttentionCapture, CaptureError, attention_probs, find_cross_attention_layers,
                             layer_hw, run_truncated, weights_frozen)


def all_hook_counts(model: nn.Module) -> dict:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_default_layers_are_the_lowest_resolution_up_block_with_cross_attention(tiny_unet):
    names = [name for name, _ in find_cross_attention_layers(tiny_unet)]
    assert names == ["up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                     "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    assert [n for n, _ in find_cross_attention_layers(tiny_unet, "mid")] == [
        "mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert len(find_cross_attention_layers(tiny_unet, "up_all")) == 4
    assert len(find_cross_attention_layers(tiny_unet, "up_lowest+mid")) == 3
    assert [n for n, _ in find_cross_attention_layers(tiny_unet, "down_lowest")] == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2"]


def test_ldm_layout_levels_follow_the_upsamplers():
    """ldm's output_blocks: a level ends with the block that holds an Upsample."""

    class Upsample(nn.Module):
        pass

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.heads = nn.Linear(4, 4), nn.Linear(4, 4), 1

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn2 = CrossAttention()

    def block(*parts):
        return nn.Sequential(*parts)

    class LdmUnet(nn.Module):
        def __init__(self):
            super().__init__()
            # SD1 pattern: level 0 (8x8) without attention, level 1 (16x16) with it
            self.output_blocks = nn.ModuleList([
                block(nn.Identity()), block(nn.Identity()), block(nn.Identity(), Upsample()),
                block(nn.Identity(), Transformer()), block(nn.Identity(), Transformer()),
                block(nn.Identity(), Transformer(), Upsample()),
                block(nn.Identity(), Transformer()), block(nn.Identity(), Transformer()),
            ])

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = LdmUnet()

    names = [n for n, _ in find_cross_attention_layers(Wrapper())]
    assert names == [f"diffusion_model.output_blocks.{i}.1.attn2" for i in (3, 4, 5)]


def test_maps_sum_to_one_over_columns_and_outputs_are_bit_identical(tiny_unet, context):
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = tiny_unet(latent, 500, encoder_hidden_states=context).sample
        layers = [m for _, m in find_cross_attention_layers(tiny_unet, "up_all")]
        with AttentionCapture(layers, (16, 16)) as capture:
            captured = tiny_unet(latent, 500, encoder_hidden_states=context).sample
            maps = capture.maps
    assert torch.equal(plain, captured)
    assert maps.shape == (1, 77, 16, 16)  # 8x8 maps of up_blocks.1 resized to up_blocks.2's 16x16
    assert torch.allclose(maps.sum(1), torch.ones(1, 16, 16), atol=1e-5)


def test_non_square_latent_gives_true_height_and_width(tiny_unet, context):
    latent = torch.randn(1, 4, 16, 24)
    layers = [m for _, m in find_cross_attention_layers(tiny_unet)]
    with torch.no_grad(), AttentionCapture(layers, (16, 24)) as capture:
        tiny_unet(latent, 500, encoder_hidden_states=context)
    assert capture.maps.shape == (1, 77, 8, 12)
    assert layer_hw(24, (13, 21)) == (4, 6)  # ceil at each stride-2 step


def test_recomputed_probs_match_the_modules_own_attention(tiny_unet, context):
    """Our fp32 softmax(QK^T * scale) equals diffusers' own probabilities for that layer."""
    layer = find_cross_attention_layers(tiny_unet)[0][1]
    hidden = torch.randn(1, 64, layer.to_q.in_features)
    ours = attention_probs(layer, hidden, context)
    query = layer.head_to_batch_dim(layer.to_q(hidden))
    key = layer.head_to_batch_dim(layer.to_k(context))
    theirs = layer.get_attention_scores(query, key).reshape(1, layer.heads, 64, 77).mean(1)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_no_handle_left_after_exception_or_interrupt(tiny_unet, context):
    before = all_hook_counts(tiny_unet)
    layers = [m for _, m in find_cross_attention_layers(tiny_unet, "up_all")]
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with AttentionCapture(layers, (16, 16)):
                assert all_hook_counts(tiny_unet) != before
                raise error
        assert all_hook_counts(tiny_unet) == before
    with pytest.raises(CaptureError):
        with AttentionCapture(layers, (16, 16)) as capture:
            run_truncated(capture, lambda: None)  # nothing ran: a clear error, no map
    assert all_hook_counts(tiny_unet) == before


def test_truncated_pass_gives_the_full_pass_maps_and_latent_gradient(tiny_unet, context):
    layers = [m for _, m in find_cross_attention_layers(tiny_unet)]
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ran_last_block = []
    handle = tiny_unet.up_blocks[2].register_forward_pre_hook(lambda *a: ran_last_block.append(1))
    try:
        results = []
        for truncated in (False, True):
            leaf = latent.clone().requires_grad_(True)
            with torch.enable_grad(), AttentionCapture(layers, (16, 16), stop_after_last=truncated) as capture:
                maps = run_truncated(capture, lambda: tiny_unet(leaf, 400, encoder_hidden_states=context))
                loss = (maps[:, 3] * torch.linspace(0, 1, 64).reshape(8, 8)).sum()
                (grad,) = torch.autograd.grad(loss, [leaf])
            results.append((maps.detach(), grad))
    finally:
        handle.remove()
    assert ran_last_block == [1]  # only the full pass reached the last up-block
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert results[1][1].abs().sum() > 0
    assert all(p.grad is None for p in tiny_unet.parameters())


class LdmCrossAttention(nn.Module):
    """Shaped like ldm's ``CrossAttention``: ``forward(x, context=None, mask=None)``, ``heads``,
    ``scale``, ``to_q/k/v/out``; its probabilities are kept to check ours against."""

    def __init__(self, dim=16, context_dim=8, heads=2):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim, bias=False), nn.Linear(context_dim, dim, bias=False), \
            nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        self.probs = (split(q) @ split(k).transpose(-1, -2) * self.scale).softmax(-1)
        out = (self.probs @ split(v)).transpose(1, 2).reshape(x.shape)
        return self.to_out(out)


def sdp_forward(self, x, context=None, mask=None, **kwargs):
    """What a WebUI optimisation does: replace the class's forward, never materialising probs."""
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                                           split(self.to_v(context)))
    return self.to_out(out.transpose(1, 2).reshape(x.shape))


def test_ldm_shaped_module_with_context_kwarg_and_replaced_forward(monkeypatch):
    torch.manual_seed(0)
    layer = LdmCrossAttention()
    x, context = torch.randn(2, 12, 16), torch.randn(2, 5, 8)
    with AttentionCapture([layer], (3, 4)) as capture:
        plain = layer(x, context=context)
    assert torch.allclose(capture.maps, layer.probs.mean(1).transpose(1, 2).reshape(2, 5, 3, 4), atol=1e-6)
    monkeypatch.setattr(LdmCrossAttention, "forward", sdp_forward)
    with torch.no_grad():
        expected = layer(x, context=context)
        with AttentionCapture([layer], (3, 4)) as capture:
            optimised = layer(x, context=context, transformer_options={})  # Forge passes extra kwargs
    assert torch.equal(expected, optimised)
    assert torch.allclose(expected, plain, atol=1e-5)
    assert torch.allclose(capture.maps, layer.probs.mean(1).transpose(1, 2).reshape(2, 5, 3, 4), atol=1e-6)


def test_weights_take_no_gradient_in_a_grad_pass_and_their_flags_come_back(tiny_unet, context, clip_tokenizer):
    from ela_ext.anchoring import SamplerSpace
    from ela_ext.config import ElaConfig
    from ela_ext.diffusers_adapter import prompt_targets
    from ela_ext.session import AnchoringSession

    frozen_by_host = tiny_unet.conv_in.weight
    frozen_by_host.requires_grad_(False)
    try:
        before = [parameter.requires_grad for parameter in tiny_unet.parameters()]
        during = []
        with pytest.raises(RuntimeError, match="inside"), weights_frozen(tiny_unet):
            during.append(any(parameter.requires_grad for parameter in tiny_unet.parameters()))
            raise RuntimeError("inside")
        assert during == [False] and [p.requires_grad for p in tiny_unet.parameters()] == before

        def forward(x):
            during.append(any(parameter.requires_grad for parameter in tiny_unet.parameters()))
            return tiny_unet(x, 700, encoder_hidden_states=context)

        session = AnchoringSession(tiny_unet, ElaConfig(enabled=True, max_iterations=2, loss_threshold=0.0),
                                   prompt_targets(clip_tokenizer, ["a black cat and a green frog"], ["cat | frog"]))
        latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        assert not torch.equal(session.maybe_anchor(latent, SamplerSpace.from_sigma(3.0), 0, 10, forward), latent)
        assert during[1:] and not any(during[1:])
        assert [p.requires_grad for p in tiny_unet.parameters()] == before and not frozen_by_host.requires_grad
        assert all(parameter.grad is None for parameter in tiny_unet.parameters())
    finally:
        frozen_by_host.requires_grad_(True)


def test_weights_frozen_leaves_inference_tensors_alone():
    """A host's weights loaded under inference mode (ComfyUI's, for the blocks a truncated pass
    never runs) keep their flag: it could not be set back outside inference mode."""
    live = nn.Linear(2, 2)
    with torch.inference_mode():
        loaded = nn.Linear(2, 2)
    model = nn.Sequential(live, loaded)
    with weights_frozen(model):
        assert not live.weight.requires_grad
    assert live.weight.requires_grad and loaded.weight.is_inference()
