"""The diffusers adapter: the engine inside a plain diffusers loop, real tokenizer, real UNet."""

import pytest
import torch

from benchmark.models.tiny_unet import CONTEXT_DIM
from ela_ext.config import ElaConfig, replace
from ela_ext.diffusers_adapter import sample, sampler_space
from ela_ext.tokens import EntityNotInPromptError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPT = "a black cat and a green frog"


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=CONTEXT_DIM, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77)
    return transformers.CLIPTextModel(config).eval()


SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "euler": lambda: diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012),
}


def run(unet, text_encoder, tokenizer, scheduler_name, config, spec=None):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    return sample(unet, text_encoder, tokenizer, SCHEDULERS[scheduler_name](), [PROMPT], config, latents,
                  num_steps=6, entity_specs=None if spec is None else [spec])


@pytest.mark.parametrize("scheduler_name", sorted(SCHEDULERS))
def test_anchoring_changes_the_result_and_lowers_the_loss(tiny_unet, text_encoder, clip_tokenizer, scheduler_name):
    off = run(tiny_unet, text_encoder, clip_tokenizer, scheduler_name, ElaConfig())
    again = run(tiny_unet, text_encoder, clip_tokenizer, scheduler_name, ElaConfig())
    assert torch.equal(off.latents, again.latents) and off.session is None
    # ELA's own masks through the adapter (ela_enhance); at this step (3x the default) on the random
    # tiny UNet, Separate-and-Enhance's loss does not end every anchored step lower.
    config = replace(ElaConfig(enabled=True, entities="black cat | green frog", objective="ela_enhance"),
                     window_end=0.5, max_iterations=4, loss_threshold=0.0, step_size=0.3)
    on = run(tiny_unet, text_encoder, clip_tokenizer, scheduler_name, config)
    assert not torch.equal(on.latents, off.latents)
    assert [e.word for e in on.targets[0].entities] == ["cat", "frog"]
    assert on.targets[0].entities[0].attributes[0].word == "black"
    assert len(on.session.steps) == 3
    assert all(log.losses[-1] < log.losses[0] for log in on.session.steps)


def test_empty_spec_detects_entities_and_a_missing_word_is_named(tiny_unet, text_encoder, clip_tokenizer):
    detected = run(tiny_unet, text_encoder, clip_tokenizer, "ddim",
                   replace(ElaConfig(enabled=True), max_iterations=1))
    assert [e.word for e in detected.targets[0].entities] == ["cat", "frog"]
    with pytest.raises(EntityNotInPromptError, match="dog"):
        run(tiny_unet, text_encoder, clip_tokenizer, "ddim", ElaConfig(enabled=True), spec="cat | dog")


def test_scheduler_kinds_map_to_sampler_spaces():
    euler, ddim = SCHEDULERS["euler"](), SCHEDULERS["ddim"]()
    euler.set_timesteps(10)
    ddim.set_timesteps(10)
    assert sampler_space(euler, 0, euler.timesteps[0]).kind == "sigma"
    assert sampler_space(ddim, 0, ddim.timesteps[0]).kind == "timestep"
    # both describe the same noise level at the same timestep
    assert sampler_space(ddim, 0, euler.timesteps[0]).sigma == pytest.approx(float(euler.sigmas[0]), rel=1e-3)


def test_a_single_entity_is_refused_before_sampling(tiny_unet, text_encoder, clip_tokenizer):
    from ela_ext.entities import EntitySpecError

    with pytest.raises(EntitySpecError, match="at least two entities"):
        run(tiny_unet, text_encoder, clip_tokenizer, "ddim", ElaConfig(enabled=True), spec="black cat")
