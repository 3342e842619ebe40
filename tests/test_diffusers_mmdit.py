"""ELA on diffusers' own MM-DiT classes (``SD3Transformer2DModel`` with SD3.5's dual-attention
blocks and qk norm, ``FluxTransformer2DModel`` with its guidance embedding), tiny configs, through
``ela_ext.diffusers_mmdit``: anchoring changes the latent, leaves no hook behind, and off is the
plain sampler. Mechanics only; the cost is ``benchmark.commands.mmdit_cost``'s."""

import pytest
import torch

pytest.importorskip("diffusers")

from benchmark.commands.mmdit_cost import build_transformer, conditioning, latent_channels, targets_for  # noqa: E402
from ela_ext import diffusers_mmdit  # noqa: E402
from ela_ext.config import ElaConfig  # noqa: E402


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("layout", ["sd35m", "flux"])
def test_anchoring_changes_the_latent_and_leaves_nothing_behind(layout):
    from diffusers.models.transformers import transformer_flux

    dispatch = transformer_flux.dispatch_attention_fn
    model = build_transformer(layout, tiny=True)
    cond = conditioning(layout, model, text_tokens=12)
    noise = torch.randn(1, latent_channels(model), 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = diffusers_mmdit.shifted_sigmas(4)
    targets = targets_for(12)
    before = hook_count(model)
    off = diffusers_mmdit.sample(model, cond, targets, ElaConfig(), noise, sigmas, guidance=4.0)
    plain = diffusers_mmdit.sample(model, cond, targets, ElaConfig(), noise, sigmas, guidance=4.0)
    on = diffusers_mmdit.sample(model, cond, targets, ElaConfig(enabled=True, step_size=0.5), noise, sigmas,
                                guidance=4.0)
    assert torch.equal(off.latents, plain.latents) and off.session is None
    session = on.session
    assert session.warnings == [] and len(session.steps) == 2  # window 0-0.3 of 4 steps
    assert sum(log.updates for log in session.steps) > 0
    assert not torch.allclose(on.latents, off.latents)
    assert hook_count(model) == before and transformer_flux.dispatch_attention_fn is dispatch
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("layout", ["sd35m", "flux"])
def test_the_capture_reads_the_middle_blocks_and_stops_after_the_last(layout):
    from ela_ext.capture import run_truncated

    model = build_transformer(layout, tiny=True)
    cond = conditioning(layout, model, text_tokens=12)
    capture = diffusers_mmdit.joint_capture(model, ElaConfig())
    ran = []
    blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, block in enumerate(blocks)]
    x = torch.randn(1, latent_channels(model), 8, 8)
    with capture.capturing((8, 8)), diffusers_mmdit.feeding(model, capture):
        run_truncated(capture, lambda: diffusers_mmdit.velocity(model, x, torch.tensor(0.9), cond.context,
                                                                 cond.pooled, 4.0))
        maps = capture.maps
    for handle in handles:
        handle.remove()
    assert ran == list(range(capture.blocks[-1] + 1))
    assert maps.shape == (1, 12, 4, 4)
    assert torch.allclose(maps.sum(1), torch.ones(1, 4, 4), atol=1e-5)


@pytest.mark.parametrize("layout", ["sd35m", "flux"])
def test_the_maps_come_from_the_q_k_the_attention_itself_receives(layout, monkeypatch):
    """Reference: the joint-length q/k diffusers hands its attention kernel (SD3's ``F.sdpa``, image
    first; Flux's ``dispatch_attention_fn``, text first, (B, L, heads, D)), the read blocks' maps."""
    from diffusers.models.transformers import transformer_flux

    from ela_ext.capture import run_truncated
    from ela_ext.joint_attention import text_attention_probs

    model = build_transformer(layout, tiny=True)
    cond = conditioning(layout, model, text_tokens=12)
    x = torch.randn(1, latent_channels(model), 8, 8, generator=torch.Generator().manual_seed(1))
    n_text, n_image = 12, 16
    seen = []
    if layout == "sd35m":
        original = torch.nn.functional.scaled_dot_product_attention

        def spy(q, k, v, *args, **kwargs):
            if q.shape[2] == n_text + n_image:  # image first: put the text first
                seen.append(tuple(torch.cat([t[:, :, n_image:], t[:, :, :n_image]], 2) for t in (q, k)))
            return original(q, k, v, *args, **kwargs)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    else:
        original = transformer_flux.dispatch_attention_fn

        def spy(q, k, v, *args, **kwargs):
            seen.append((q.transpose(1, 2), k.transpose(1, 2)))
            return original(q, k, v, *args, **kwargs)
        monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", spy)
    with torch.no_grad():
        diffusers_mmdit.velocity(model, x, torch.tensor(0.7), cond.context, cond.pooled, 4.0)
    capture = diffusers_mmdit.joint_capture(model, ElaConfig())
    reference = torch.stack([text_attention_probs(*seen[block], n_text) for block in capture.blocks]).mean(0)
    monkeypatch.undo()
    with torch.no_grad(), capture.capturing((8, 8)), diffusers_mmdit.feeding(model, capture):
        run_truncated(capture, lambda: diffusers_mmdit.velocity(model, x, torch.tensor(0.7), cond.context,
                                                                 cond.pooled, 4.0))
    assert torch.allclose(capture.maps, reference.transpose(1, 2).reshape(1, n_text, 4, 4), atol=1e-6)
