"""The fidelity command: its judgements by hand, and the whole command on a tiny random benchmark model
(figures printed, never asserted: a random model's scores mean nothing)."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmark.commands.fidelity import PARTS, layout_followed, localisation_scenes, main, same_place
from benchmark.judge.evaluate import Report
from benchmark.judge.metrics import mask_iou
from benchmark.models.autoencoder import LATENT_SHAPE, AutoencoderConfig, SceneAutoencoder
from benchmark.models.model import ModelConfig, build_model, load_model, scheduler_config
from benchmark.paths import BUNDLED_WEIGHTS


def square(x0: int, y0: int, side: int = 6) -> np.ndarray:
    mask = np.zeros((32, 32), bool)
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


def report(*masks: np.ndarray) -> Report:
    status = ["ok" if mask.any() else "missing" for mask in masks]
    return Report(status=status, masks=list(masks), components=[], matched=[None] * len(masks))


def test_layout_followed_needs_every_object_in_its_own_strip():
    assert layout_followed(report(square(2, 10), square(20, 4)))
    assert not layout_followed(report(square(20, 4), square(2, 10)))  # swapped
    assert not layout_followed(report(square(2, 10), np.zeros((32, 32), bool)))  # one missing
    assert layout_followed(report(square(1, 1, 4), square(12, 20, 4), square(24, 2, 4)))  # thirds
    merged = report(square(2, 10), square(20, 4))
    merged.status[1] = "merged"  # a blob holding two objects is no object found
    assert not layout_followed(merged)


def test_same_place_allows_an_eighth_of_the_side():
    reference = report(square(2, 10), square(20, 4))
    assert same_place(reference, report(square(5, 10), square(20, 6)))  # moved 3 and 2 pixels
    assert not same_place(reference, report(square(7, 10), square(20, 4)))  # moved 5
    assert not same_place(reference, report(square(2, 10), np.zeros((32, 32), bool)))


def test_a_rendered_mask_has_iou_one_with_itself():
    for scene in localisation_scenes(3):
        assert 2 <= len(scene.objects) <= 3
        for obj in scene.objects:
            assert mask_iou(obj.mask, obj.mask) == 1.0
            quarter = obj.mask[::4, ::4]  # a map-sized mask, upsampled by the IoU
            assert mask_iou(quarter, np.repeat(np.repeat(quarter, 4, 0), 4, 1)) == 1.0


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A random benchmark model unlike the bundled one: the learned 4x16x16 autoencoder latent (random
    weights), three levels with SD's layout (no cross-attention at the lowest), small widths;
    exported as ``load_model`` reads it."""
    config = ModelConfig(text_hidden=32, text_heads=2, block_channels=(16, 32, 32), unet_heads=2, attention_levels=2)
    unet, text_encoder = build_model(config, seed=3, latent_shape=LATENT_SHAPE)
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    state.update({f"autoencoder.{k}": v for k, v in SceneAutoencoder(AutoencoderConfig()).state_dict().items()})
    path = tmp_path_factory.mktemp("tiny-model") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    latent = {"kind": "autoencoder", "config": asdict(AutoencoderConfig())}
    path.with_suffix(".json").write_text(json.dumps({"model_config": asdict(config), "latent": latent,
                                                     "scheduler_config": scheduler_config(clip_sample=False),
                                                     "step": 0}))
    return path


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_the_command_on_a_tiny_model_prints_every_part_for_both_models(tiny_weights, capsys):
    sizes = ["--prompts-per-family", "1", "--seeds", "2", "--steps", "3", "--steer-families", "held_out",
             "--scenes", "2", "--timesteps", "500", "--finetune-steps", "2"]
    torch.manual_seed(0)
    assert load_model(tiny_weights).latent_shape == (4, 16, 16)
    main(["--weights", str(tiny_weights), *sizes])
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[1].split()[-2:] == ["tiny", "bundled"]
    for part in PARTS:
        assert any(line.startswith(f"{part} ") for line in lines[2:])
    main(["--weights", str(tiny_weights), "--parts", "c,d", "--json", *sizes])
    report_json = json.loads(capsys.readouterr().out)
    assert set(report_json["model"]) == set(report_json["reference_model"]) == {"c", "d"}
    assert report_json["model"]["c"]["images"] == 2
