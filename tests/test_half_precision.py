"""Half precision: the grad pass through a real diffusers UNet in bfloat16 / float16 gives fp32
maps and the gradient direction fp32 gives; a non-finite half-precision gradient leaves the image
as it would be with ELA off, with a warning that names the dtype."""

import copy

import pytest
import torch

from benchmark.commands.real_scale import build_text_encoder
from benchmark.models.tiny_unet import CONTEXT_DIM
from ela_ext.anchoring import SamplerSpace
from ela_ext.capture import AttentionCapture, attention_probs, find_cross_attention_layers, run_truncated
from ela_ext.config import ElaConfig, replace
from ela_ext.diffusers_adapter import prompt_targets, sample
from ela_ext.session import AnchoringSession

diffusers = pytest.importorskip("diffusers")

PROMPT = "a black cat and a green frog"
SPEC = "black cat | green frog"
ONE_UPDATE = replace(ElaConfig(enabled=True, entities=SPEC), max_iterations=1, loss_threshold=0.0)
HALF = (torch.bfloat16, torch.float16)


def in_dtype(unet, dtype):
    """A copy of ``unet`` in ``dtype``; skips where this CPU build has no kernels for it."""
    copied = copy.deepcopy(unet).to(dtype)
    try:
        with torch.no_grad():
            copied(torch.zeros(1, 4, 8, 8, dtype=dtype), 1,
                   encoder_hidden_states=torch.zeros(1, 77, CONTEXT_DIM, dtype=dtype))
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"no CPU kernels for a {dtype} UNet here: {error}")
    return copied


def one_update(unet, dtype, context, clip_tokenizer):
    """One anchored step (one grad pass and update) through a session, in ``dtype``: the update."""
    space = SamplerSpace.from_sigma(3.0)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    latent = (noise * (space.sigma ** 2 + 1) ** 0.5).to(dtype)
    session = AnchoringSession(unet, ONE_UPDATE, prompt_targets(clip_tokenizer, [PROMPT], [SPEC]))
    updated = session.maybe_anchor(latent, space, 0, 10,
                                   lambda x: unet(x, 800, encoder_hidden_states=context.to(dtype)))
    assert session.warnings == [] and session.steps[0].updates == 1
    assert updated.dtype == dtype
    return (updated.float() - latent.float()).flatten()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_grad_pass_gives_fp32_maps_and_fp32s_gradient_direction(tiny_unet, context, clip_tokenizer,
                                                                             dtype):
    half = in_dtype(tiny_unet, dtype)
    layers = [module for _, module in find_cross_attention_layers(half)]
    leaf = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    with torch.enable_grad(), AttentionCapture(layers, (16, 16), stop_after_last=True) as capture:
        maps = run_truncated(capture, lambda: half(leaf.to(dtype), 800, encoder_hidden_states=context.to(dtype)))
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()

    reference = one_update(tiny_unet, torch.float32, context, clip_tokenizer)
    update = one_update(half, dtype, context, clip_tokenizer)
    assert torch.isfinite(update).all() and update.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(update, reference, dim=0) > 0.9


def test_logits_stay_fp32_under_the_hosts_autocast(tiny_unet):
    """The WebUI runs the UNet under autocast, which would run ``Q K^T`` in half precision."""
    layer = find_cross_attention_layers(in_dtype(tiny_unet, torch.bfloat16))[0][1]
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 64, layer.to_q.in_features, generator=generator).to(torch.bfloat16)
    context = (4 * torch.randn(1, 77, CONTEXT_DIM, generator=generator)).to(torch.bfloat16)
    plain = attention_probs(layer, hidden, context)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = attention_probs(layer, hidden, context)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, plain)


def test_a_non_finite_float16_gradient_warns_and_the_image_is_as_if_off(tiny_unet, clip_tokenizer):
    """A backward that leaves float16's range (here conv_in's output gradient scaled past 65504,
    as an unstable layer would) must stop anchoring with a warning naming float16, leave the
    latent untouched and leave no hook behind."""
    half = in_dtype(tiny_unet, torch.float16)
    text_encoder = build_text_encoder(CONTEXT_DIM, torch.float16, "cpu")
    scheduler = lambda: diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,  # noqa: E731
                                                beta_end=0.012)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6)).to(torch.float16)
    off = sample(half, text_encoder, clip_tokenizer, scheduler(), [PROMPT], ElaConfig(), noise, num_steps=6)
    overflow = half.conv_in.register_full_backward_pre_hook(lambda module, grad_output: (grad_output[0] * 1e9,))
    try:
        on = sample(half, text_encoder, clip_tokenizer, scheduler(), [PROMPT],
                    ElaConfig(enabled=True, entities=SPEC), noise, num_steps=6)
    finally:
        overflow.remove()
    assert on.session.failed and on.session.steps == []
    [warning] = on.session.warnings
    assert "step 1" in warning and "non-finite latent gradient" in warning and "float16" in warning
    assert torch.isfinite(on.latents).all() and torch.equal(on.latents, off.latents)
    assert all(not layer._forward_pre_hooks for layer in on.session.layers)
