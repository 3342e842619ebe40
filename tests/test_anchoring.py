"""The anchoring loop on a real (tiny) UNet: loss falls in sigma and timestep space, bad values
leave the latent alone, the session never leaves hooks behind."""

import math

import pytest
import torch

from ela_ext.anchoring import AnchoringError, SamplerSpace, anchor_latent, in_window, latent_step
from ela_ext.capture import AttentionCapture, find_cross_attention_layers, run_truncated
from ela_ext.config import ElaConfig, replace
from ela_ext.session import AnchoringSession
from ela_ext.tokens import EntityColumns, ResolvedEntity, WordColumns

TARGET = EntityColumns(
    entities=(ResolvedEntity("cat", (2,), (WordColumns("black", (1,)),)), ResolvedEntity("frog", (5,), ())),
    sot_columns=(0,))
CONFIG = replace(ElaConfig(enabled=True), max_iterations=6, loss_threshold=0.0, step_size=0.3).for_denoiser(joint=False)
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)


def grad_pass_for(unet, context, timestep, space):
    layers = [m for _, m in find_cross_attention_layers(unet)]

    def grad_pass(latent):
        with AttentionCapture(layers, tuple(latent.shape[-2:]), stop_after_last=True) as capture:
            return run_truncated(capture, lambda: unet(space.to_unet_input(latent), timestep,
                                                       encoder_hidden_states=context))
    return grad_pass


@pytest.mark.parametrize("space", [SamplerSpace.from_sigma(3.0), SamplerSpace.from_timestep(700, ALPHAS)],
                         ids=["k-diffusion sigma", "discrete timestep"])
def test_loop_lowers_the_loss_on_a_real_unet(tiny_unet, context, space):
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)) / space.c_in
    result = anchor_latent(latent, space, grad_pass_for(tiny_unet, context, 700, space), [TARGET], CONFIG)
    assert result.updates == CONFIG.max_iterations
    assert result.losses[-1] < result.losses[0]
    assert not torch.equal(result.latent, latent)
    # the change of z_t per update has RMS step_size * sqrt(1 - alpha_bar)
    change = space.to_unet_input(result.latent - latent)
    assert change.pow(2).mean().sqrt() <= CONFIG.max_iterations * CONFIG.step_size * space.noise_fraction + 1e-4
    assert result.localizations[0].entity_masks.shape == (2, 8, 8)


def test_sampler_spaces_convert_like_the_host():
    space = SamplerSpace.from_sigma(2.0)
    assert space.c_in == pytest.approx(1 / math.sqrt(5))
    x = torch.ones(2)
    assert torch.allclose(space.from_unet_input(space.to_unet_input(x)), x)
    timestep = SamplerSpace.from_timestep(999, ALPHAS)
    assert timestep.c_in == 1.0
    assert timestep.sigma == pytest.approx(math.sqrt((1 - ALPHAS[-1]) / ALPHAS[-1]), rel=1e-5)
    half = SamplerSpace.from_timestep(10.5, ALPHAS)
    assert SamplerSpace.from_timestep(10, ALPHAS).sigma < half.sigma < SamplerSpace.from_timestep(11, ALPHAS).sigma


def test_step_is_normalised_per_image():
    grad = torch.stack([torch.full((4, 2, 2), 1e-3), torch.full((4, 2, 2), 50.0)])
    step = latent_step(grad, 0.2, 0.5)
    assert torch.allclose(step.flatten(1).pow(2).mean(1).sqrt(), torch.tensor([0.1, 0.1]))


def test_window_is_a_fraction_of_the_steps():
    config = replace(ElaConfig(), window_start=0.1, window_end=0.3)
    assert [s for s in range(20) if in_window(s, 20, config)] == [2, 3, 4, 5]


def test_non_finite_maps_raise_and_random_control_moves_the_same_distance(tiny_unet, context):
    space = SamplerSpace.from_sigma(3.0)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    with pytest.raises(AnchoringError):
        anchor_latent(latent, space, lambda x: torch.full((1, 77, 8, 8), float("nan")), [TARGET], CONFIG)
    one_step = replace(CONFIG, max_iterations=1)
    gradient = anchor_latent(latent, space, grad_pass_for(tiny_unet, context, 700, space), [TARGET], one_step)
    random = anchor_latent(latent, space, grad_pass_for(tiny_unet, context, 700, space), [TARGET], one_step,
                           direction="random", generator=torch.Generator().manual_seed(0))
    first_step = lambda r: float(space.to_unet_input(r.latent - latent).norm())  # noqa: E731
    assert first_step(random) == pytest.approx(first_step(gradient), rel=0.05)


def hook_counts(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_session_window_log_and_failure_leave_no_hooks(tiny_unet, context):
    config = replace(CONFIG, window_end=0.5, max_iterations=2, save_masks=True)
    session = AnchoringSession(tiny_unet, config, [TARGET])
    before = hook_counts(tiny_unet)
    latent = torch.randn(1, 4, 16, 16)
    space = SamplerSpace.from_sigma(3.0)

    def forward(x):
        assert hook_counts(tiny_unet) > before  # hooks exist only during our grad pass
        return tiny_unet(space.to_unet_input(x), 700, encoder_hidden_states=context)

    outputs = [session.maybe_anchor(latent, space, step, 4, forward) for step in range(4)]
    assert hook_counts(tiny_unet) == before
    assert [torch.equal(out, latent) for out in outputs] == [False, False, True, True]
    assert len(session.steps) == 2 and session.log_lines()[0].startswith("step 1: loss ")
    assert session.infotext_summary().startswith("steps=2;updates=4;first=")
    grid = session.mask_grid(0)
    assert grid.size[0] > 3 * 128 and grid.size[1] > 3 * 128  # cat, black (cat), frog

    def failing(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    broken = AnchoringSession(tiny_unet, config, [TARGET])
    assert broken.maybe_anchor(latent, space, 0, 4, failing) is latent
    assert broken.failed and "OutOfMemoryError" in broken.warnings[0]
    assert broken.maybe_anchor(latent, space, 1, 4, forward) is latent  # stays off afterwards
    assert hook_counts(tiny_unet) == before


def test_auto_objective_is_separate_enhance_on_a_unet(tiny_unet, context):
    """The default ``auto`` anchors a UNet exactly as Separate-and-Enhance does, and not as another
    objective would (an MM-DiT's: tests/test_joint_attention.py)."""
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    space = SamplerSpace.from_sigma(3.0)

    def anchored(objective):
        session = AnchoringSession(tiny_unet, replace(CONFIG, objective=objective, max_iterations=2), [TARGET])
        forward = lambda x: tiny_unet(space.to_unet_input(x), 700, encoder_hidden_states=context)  # noqa: E731
        return session.config.objective, session.maybe_anchor(latent, space, 0, 4, forward)

    (name, auto), (_, chosen), (_, other) = (anchored(o) for o in ("auto", "separate_enhance", "attend_excite_paper"))
    assert name == "separate_enhance" and torch.equal(auto, chosen) and not torch.equal(auto, other)
