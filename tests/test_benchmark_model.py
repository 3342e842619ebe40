"""Benchmark model: real CLIP token ids, SD's layout with an anchorable up-block, exact latent codec,
caption-independent EOS columns, and (when committed weights exist) the loaded ``BenchmarkModel``: its
latent named by the JSON, its codec and seeded noise, deterministic sampling."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import shutil

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from benchmark.models.attention import anchor_layers
from benchmark.models.clip_tokenizer import BOS_ID, EOS_ID, encode, load_tokenizer
from benchmark.models.model import ModelConfig, build_model, decode_images, encode_images, load_model
from benchmark.models.scenes import training_scene
from benchmark.paths import BUNDLED_WEIGHTS

needs_weights = pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason="no committed weights: export with "
                                   "`python -m benchmark.models.train --name RUN --export`")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_tokenizer_ids_are_real_clip_ids(tokenizer):
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = encode(tokenizer, ["a red circle and a blue square"])[0]
    assert ids.shape == (77,) and ids[0] == BOS_ID
    assert ids[1:9].tolist() == [320, 736, 7117, 537, 320, 1746, 3999, EOS_ID]
    assert (ids[9:] == EOS_ID).all()  # SD pads with EOS


def test_latent_codec_is_exact():
    images = np.stack([training_scene(s).image for s in range(3)])
    latents = encode_images(images)
    assert latents.shape == (3, 12, 16, 16)
    assert np.array_equal(decode_images(latents), images)


def test_model_layout_and_forward(tokenizer):
    unet, text_encoder = build_model(ModelConfig())
    layers = anchor_layers(unet)
    assert layers and all(any(m is l for m in unet.up_blocks[0].modules()) for l in layers)
    context = text_encoder(encode(tokenizer, ["a red circle", "a circle and a star"]))[0]
    assert context.shape == (2, 77, 64)
    out = unet(torch.randn(2, 12, 16, 16), torch.tensor([10, 500]), encoder_hidden_states=context).sample
    assert out.shape == (2, 12, 16, 16)


def test_eos_and_padding_columns_carry_no_caption(tokenizer):
    _, text_encoder = build_model(ModelConfig())
    with torch.no_grad():
        context = text_encoder(encode(tokenizer, ["a red circle", "a blue star and a green cross"]))[0]
    eos_column = text_encoder.eos_column
    assert torch.equal(context[0, 4:], eos_column.expand(73, -1))  # "a red circle" ends at column 3
    assert torch.equal(context[1, 9:], eos_column.expand(68, -1))
    assert torch.equal(context[0, 0], context[1, 0])  # BOS sees only itself (causal)
    assert not torch.allclose(context[0, 2], context[1, 2])  # word columns differ


@needs_weights
def test_loaded_model_round_trips_images_and_seeds_noise_by_latent_shape():
    model = load_model(BUNDLED_WEIGHTS)
    assert model.latent_shape == (12, 16, 16) and model.weights_path == BUNDLED_WEIGHTS
    assert model.meta["step"] > 0 and "latent" not in model.meta  # the bundled file predates latent kinds
    images = np.stack([training_scene(s).image for s in range(3)])
    latents = model.encode(images)
    assert latents.shape == (3, *model.latent_shape)
    decoded = model.decode(latents)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, images)
    noise = model.initial_noise([5, 6, 7])
    assert noise.shape == (3, *model.latent_shape)
    assert torch.equal(noise[1:], model.initial_noise([6, 7]))  # one latent per seed, whatever the batch
    # the noise every reported result was sampled from: a change here changes every table
    assert torch.equal(noise[0], torch.randn(12, 16, 16, generator=torch.Generator().manual_seed(5)))


@needs_weights
def test_weights_json_names_the_latent_kind(tmp_path):
    meta = json.loads(BUNDLED_WEIGHTS.with_suffix(".json").read_text())
    weights = tmp_path / "model.safetensors"
    shutil.copyfile(BUNDLED_WEIGHTS, weights)
    weights.with_suffix(".json").write_text(json.dumps({**meta, "latent": {"kind": "pixel_unshuffle"}}))
    assert load_model(weights).latent_shape == (12, 16, 16)
    weights.with_suffix(".json").write_text(json.dumps({**meta, "latent": {"kind": "no_such_latent"}}))
    with pytest.raises(ValueError, match="no_such_latent"):
        load_model(weights)


COMMITTED = [BUNDLED_WEIGHTS, BUNDLED_WEIGHTS.with_name("latent_model.safetensors")]


@needs_weights
@pytest.mark.parametrize("weights", COMMITTED, ids=lambda path: path.stem)
def test_committed_weights_sample_deterministically(weights):
    from ela_ext.config import ElaConfig
    model = load_model(weights)
    prompts = ["a red circle and a blue square", "a star and a triangle"]

    def images(eta):
        latents = model.sample(prompts, ElaConfig(), [7, 8], num_steps=4, generator=torch.Generator().manual_seed(7),
                               step_options={"eta": eta}).latents
        return model.decode(latents)

    a, b = images(0.0), images(0.0)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    ancestral = images(1.0)  # DDIM's fresh noise reaches the sampler through step_options
    assert np.array_equal(ancestral, images(1.0)) and not np.array_equal(ancestral, a)


@needs_weights
def test_committed_mmdit_samples_deterministically_and_anchors():
    from ela_ext.config import ElaConfig
    model = load_model(BUNDLED_WEIGHTS.with_name("mmdit.safetensors"))
    assert model.backbone == "mmdit" and model.latent_shape == (4, 16, 16)
    prompts = ["a red circle and a blue square", "a star and a triangle"]
    off = model.sample(prompts, ElaConfig(), [7, 8], num_steps=4)
    images = model.decode(off.latents)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, model.decode(model.sample(prompts, ElaConfig(), [7, 8], num_steps=4).latents))
    on = model.sample(prompts, ElaConfig(enabled=True, window_end=0.5), [7, 8], num_steps=4)
    assert [log.step for log in on.session.steps] == [0, 1] and not on.session.warnings
    assert not torch.equal(on.latents, off.latents)


def test_grounding_loss_rewards_attention_on_the_own_object(tokenizer):
    from benchmark.models.train import grounding_loss
    from benchmark.models.scenes import render, Scene

    image, objects = render([("circle", "red", (2, 2, 14, 14)), ("square", "blue", (18, 18, 30, 30))])
    scene = Scene(image, objects, "a red circle and a blue square")
    ids = encode(tokenizer, [scene.caption])
    circle, square = 3, 7  # columns of the shape words
    own, swapped = torch.full((1, 64, 77), 1e-3), torch.full((1, 64, 77), 1e-3)
    pooled = [torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(o.mask).float()[None, None], 8).flatten()
              for o in objects]
    own[0, :, circle], own[0, :, square] = pooled[0], pooled[1]
    swapped[0, :, circle], swapped[0, :, square] = pooled[1], pooled[0]
    assert grounding_loss(own, [scene], ids) < 0.15 < 0.8 < grounding_loss(swapped, [scene], ids)
    dropped = encode(tokenizer, [""])  # an empty caption has no words to ground
    assert grounding_loss(own, [scene], dropped) == 0
