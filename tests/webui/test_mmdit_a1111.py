"""SD3 (MM-DiT) in the real AUTOMATIC1111 WebUI (``ELA_WEBUI``), through its HTTP API.

The host is the one ``real-host/setup.sh`` prepares, with the tiny random SD3 of
``shared/webui-mmdit/make_tiny_a1111_sd3.py`` added (its checkpoint, the fixed-name TAESD decoder
its images are decoded with, and the offline tokenizer cache its text encoders load by name).
Without them every test here skips and says which file is missing. Each server here starts on
the SD3 checkpoint with its own settings file (TAESD decoding, T5 off as A1111 defaults); the one
with the extension builds its UI too (the training tab) and has a Lora folder of its own.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from ela_ext.config import JOINT_BLOCK_CHOICES, ElaConfig

from mmdit_checks import (assert_anchors_with_a_falling_loss, assert_auto_is_the_mmdit_objective,
                          assert_off_is_the_image_without_the_extension, assert_plain_with_a_message,
                          assert_xyz_enabled_and_block_axes, payload, require_files)
from test_training import click_train
from training_checks import MMDIT_REFUSAL, assert_no_job_left, assert_training_refused_on_an_mmdit, lora_files
from webui_host import (SCRIPT_TITLE, SPEC, WebUI, assert_bad_input_gives_the_off_image, assert_no_failure,
                        assert_sampler_continues_from_the_anchored_latent, checkout_in_extensions, checkout_linked,
                        ela_args, infotext, pixels)

SD3_FILES = ["webui/models/Stable-diffusion/tiny-sd3.safetensors", "webui/models/VAE-taesd/taesd3_decoder.pth",
             "webui/models/VAE-approx/vaeapprox-sd3.pt", "hf-home-tiny/hub"]
SD3_SETTINGS = {"sd_vae_decode_method": "TAESD", "sd3_enable_t5": False}
# Joint blocks of tiny-sd3 (make_tiny_a1111_sd3.py's default --depth).
SD3_JOINT_BLOCKS = 2
# Off must equal the host without the extension for each of these.
BASELINES = {"Euler": payload(), "DPM++ 2M": payload(sampler_name="DPM++ 2M")}
TIMESTEP_SAMPLER = ("ELA anchors SD3 / SD3.5 (MM-DiT) models under k-diffusion samplers (Euler, DPM++, ...), "
                    "not DDIM / PLMS / UniPC: image left unanchored")


def start_sd3(root: Path, workdir: Path, name: str, env: dict[str, str], with_ui: bool = False,
              ready_path: str = "/sdapi/v1/sd-models", extra_flags: tuple[str, ...] = ()) -> WebUI:
    """A1111 on tiny-sd3 (API only unless ``with_ui``): its settings file written first,
    tokenizers from the cache; ``ready_path`` and ``extra_flags`` as ``WebUI`` takes them."""
    (workdir / f"{name}-config.json").write_text(json.dumps(SD3_SETTINGS))
    return WebUI(root, workdir, name, {"HF_HOME": str(root / "hf-home-tiny"), **env}, with_ui=with_ui,
                 ready_path=ready_path,
                 extra_flags=("--ckpt", "models/Stable-diffusion/tiny-sd3.safetensors", *extra_flags))


@pytest.fixture(scope="module")
def sd3_root(webui_root) -> Path:
    require_files(webui_root, SD3_FILES, "run shared/webui-mmdit/make_tiny_a1111_sd3.py "
                                         "(A1111_ROOT=<host> FORGE_ROOT=<forge host>) to run the SD3 tests")
    return webui_root


@pytest.fixture(scope="module")
def sd3_absent(sd3_root, workdir):
    """The baselines' first images from A1111 WITHOUT the extension (None if someone else linked it)."""
    if checkout_linked(sd3_root):
        return None
    with start_sd3(sd3_root, workdir, "sd3-absent", {}) as server:
        return {name: server.txt2img(**request)["images"][0] for name, request in BASELINES.items()}


@pytest.fixture(scope="module")
def sd3_lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sd3-lora")


@pytest.fixture(scope="module")
def sd3(sd3_root, workdir, sd3_absent, sd3_lora_dir):
    """With the extension, its debug routes, the UI (the training tab) and a Lora folder of its own."""
    with checkout_in_extensions(sd3_root), \
            start_sd3(sd3_root, workdir, "sd3-with-ela", {"ELA_DEBUG": "1"}, with_ui=True,
                      ready_path="/ela/v1/debug/hooks", extra_flags=("--lora-dir", str(sd3_lora_dir))) as server:
        yield server


@pytest.mark.parametrize("sampler", list(BASELINES))
def test_sd3_off_is_byte_identical_to_no_extension(sd3, sd3_absent, sampler):
    if sd3_absent is None:
        pytest.skip("the checkout was linked before the tests started: no extension-free baseline")
    assert_off_is_the_image_without_the_extension(sd3, BASELINES[sampler], sd3_absent[sampler])


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Heun"])
def test_sd3_on_anchors_with_a_falling_loss(sd3, sampler):
    """The grad pass reads SD3's joint attention (A1111's mmdit.attention, wrapped for the pass
    only) and the k-diffusion sampler continues on the flow latent it was given."""
    assert_anchors_with_a_falling_loss(sd3, payload(sampler_name=sampler))


@pytest.mark.parametrize("blocks", JOINT_BLOCK_CHOICES)
def test_sd3_every_block_choice_anchors(sd3, blocks):
    assert_anchors_with_a_falling_loss(sd3, payload(), joint_blocks=blocks)


def test_sd3_default_objective_is_attend_excite_paper(sd3):
    assert_auto_is_the_mmdit_objective(sd3, payload())


def test_sd3_xyz_enabled_and_block_axes(sd3):
    """A cell's ``[ELA] MM-DiT blocks`` value reaches SD3's joint-attention capture and its infotext."""
    assert_xyz_enabled_and_block_axes(sd3, payload(), SD3_JOINT_BLOCKS)


@pytest.mark.parametrize("sampler, history", [("Euler", 0), ("DPM++ 2M", 1)])
def test_sd3_sampler_continues_from_the_anchored_latent(sd3, sampler, history):
    assert_sampler_continues_from_the_anchored_latent(sd3, sampler, history, payload(sampler_name=sampler))


def test_sd3_timestep_sampler_is_plain_with_a_message(sd3):
    assert_plain_with_a_message(sd3, payload(sampler_name="DDIM"), TIMESTEP_SAMPLER)


def test_sd3_hires_and_batch_anchor_every_image_and_pass(sd3):
    result = sd3.txt2img(**payload(batch_size=2, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                                   denoising_strength=0.6, hr_second_pass_steps=4), **ela_args())
    for text in result["info"]["infotexts"]:
        assert "ELA log: steps=3;" in text and ";hires_steps=2;" in text, text
        assert_no_failure(text)


def test_sd3_img2img_anchors(sd3):
    init = sd3.txt2img(**payload())["images"][0]
    result = sd3.img2img(**payload(init_images=[init], denoising_strength=0.5), **ela_args())
    assert "ELA log: steps=" in infotext(result) and "ELA log: steps=0" not in infotext(result)
    assert_no_failure(infotext(result))


def test_sd3_infotext_round_trip_through_png_info(sd3):
    config = ElaConfig(enabled=True, entities=SPEC, window_end=0.5, max_iterations=2, joint_blocks="all")
    result = sd3.txt2img(**payload(), alwayson_scripts={SCRIPT_TITLE: {"args": config.as_args()}})
    png_info = sd3.png_info(result["images"][0])
    assert ElaConfig.from_infotext(png_info["parameters"]["ELA"]) == config
    assert png_info["parameters"]["ELA log"].startswith("steps=3;")


def test_sd3_bad_entity_gives_the_off_image(sd3):
    assert_bad_input_gives_the_off_image(sd3, payload(), ela_args(entities="dog | cat"), "not found in the prompt: 'dog'")


def test_sd3_grad_pass_failure_generates_as_if_off(sd3):
    off = sd3.txt2img(**payload())
    sd3.post("/ela/v1/debug/fault", {"kind": "error", "step": 0})
    failed = sd3.txt2img(**payload(), **ela_args())
    assert "anchoring stopped at step 1, image continues unanchored: RuntimeError: grad pass failed (injected)" \
        in infotext(failed)
    assert pixels(failed["images"][0]) == pixels(off["images"][0])


@pytest.mark.parametrize("prompt, expected", [
    ("a black cat and a green frog", {"cat": [3], "frog": [7]}),
    ("a (black:1.3) cat BREAK a green frog", {"cat": [3], "frog": [77 + 3]}),
])
def test_sd3_token_route_reads_the_clip_columns(sd3, prompt, expected):
    """SD3's context starts with A1111's CLIP-L/G chunks (77 columns each), tokenised as SD1's; T5
    is off (A1111's default), so its columns hold no words. Generation anchors the same columns."""
    answer = sd3.post("/ela/v1/tokens", {"prompt": prompt, "entities": SPEC})
    assert {entity["word"]: entity["columns"] for entity in answer["entities"]} == expected
    assert answer["warnings"] == []
    result = sd3.txt2img(**payload(prompt=prompt), **ela_args())
    assert "ELA log: steps=3;" in infotext(result)
    assert_no_failure(infotext(result))


def test_sd3_training_is_refused_with_what_it_supports(sd3, sd3_lora_dir):
    """Training (S&E's key projections) is UNet-only: ``POST /ela/v1/train`` and the training
    tab's button say so with SD3 loaded and do nothing (no file, no patch, the same image after)."""
    assert_training_refused_on_an_mmdit(sd3, sd3_lora_dir, payload(), "SD3 / SD3.5 (MM-DiT)")
    before = sd3.txt2img(**payload())["images"][0]
    message, _ = click_train(sd3, "sd3-from-the-tab", "a black cat and a green frog")
    assert f"Not trained: the loaded model is SD3 / SD3.5 (MM-DiT): {MMDIT_REFUSAL}" in html.unescape(message), message
    assert_no_job_left(sd3)
    assert lora_files(sd3_lora_dir) == []
    assert sd3.txt2img(**payload())["images"][0] == before
