"""SD3 (MM-DiT) in the real AUTOMATIC1111 WebUI (``ELA_WEBUI``), through its HTTP API.

The host is the one ``real-host/setup.sh`` prepares, with the tiny random SD3 of
``shared/webui-mmdit/make_tiny_a1111_sd3.py`` added (its checkpoint, the fixed-name TAESD decoder
its images are decoded with, and the offline tokenizer cache its text encoders load by name).
Without them every test here skips and says which file is missing. Each server here starts on
the SD3 checkpoint with its own settings file (TAESD decoding, T5 off as A1111 defaults).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdit_checks import (assert_no_function_replaced, assert_off_is_the_image_without_the_extension,
                          assert_plain_with_a_message, payload, require_files)
from webui_host import SPEC, WebUI, checkout_in_extensions, checkout_linked

SD3_FILES = ["webui/models/Stable-diffusion/tiny-sd3.safetensors", "webui/models/VAE-taesd/taesd3_decoder.pth",
             "webui/models/VAE-approx/vaeapprox-sd3.pt", "hf-home-tiny/hub"]
SD3_SETTINGS = {"sd_vae_decode_method": "TAESD", "sd3_enable_t5": False}
# Off must equal the host without the extension for each of these.
BASELINES = {"Euler": payload(), "DPM++ 2M": payload(sampler_name="DPM++ 2M")}
UNANCHORED = "ELA cannot anchor SD3 / SD3.5 (MM-DiT) models yet: generated without ELA"


def start_sd3(root: Path, workdir: Path, name: str, env: dict[str, str]) -> WebUI:
    """A1111 on tiny-sd3 (API only): its settings file written first, tokenizers from the cache."""
    (workdir / f"{name}-config.json").write_text(json.dumps(SD3_SETTINGS))
    return WebUI(root, workdir, name, {"HF_HOME": str(root / "hf-home-tiny"), **env},
                 extra_flags=("--ckpt", "models/Stable-diffusion/tiny-sd3.safetensors"))


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
def sd3(sd3_root, workdir, sd3_absent):
    with checkout_in_extensions(sd3_root), start_sd3(sd3_root, workdir, "sd3-with-ela", {"ELA_DEBUG": "1"}) as server:
        yield server


@pytest.mark.parametrize("sampler", list(BASELINES))
def test_sd3_off_is_byte_identical_to_no_extension(sd3, sd3_absent, sampler):
    if sd3_absent is None:
        pytest.skip("the checkout was linked before the tests started: no extension-free baseline")
    assert_off_is_the_image_without_the_extension(sd3, BASELINES[sampler], sd3_absent[sampler])


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_sd3_on_is_plain_with_a_message(sd3, sampler):
    """The engine cannot anchor MM-DiT joint attention yet: ELA on says so and changes nothing."""
    assert_plain_with_a_message(sd3, payload(sampler_name=sampler), UNANCHORED)
    assert_no_function_replaced(sd3)


def test_sd3_token_route_reads_the_clip_columns(sd3):
    """SD3's context starts with A1111's CLIP-L/G chunks (77 columns each), tokenised as SD1's."""
    answer = sd3.post("/ela/v1/tokens", {"prompt": "a black cat and a green frog", "entities": SPEC})
    assert {entity["word"]: entity["columns"] for entity in answer["entities"]} == {"cat": [3], "frog": [7]}
    assert answer["sot_columns"] == [0]
    assert any("SD3" in warning for warning in answer["warnings"])
