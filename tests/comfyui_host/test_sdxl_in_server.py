"""An SDXL-family model anchored in the real ComfyUI server (not only in-process,
test_sdxl_in_comfy.py): the example workflow ``ela_comfy/workflows/sdxl_api.json`` with its
checkpoint replaced by the tiny KOALA-700M-shaped SDXL UNet of ``make_tiny_sdxl.py`` (the smallest
SDXL ComfyUI's detection accepts: SDXL's text encoders, pooled ``y`` and sampling), loaded as users
load a bare UNet: UNETLoader, DualCLIPLoader(type=sdxl) with a full-size random CLIP-L and CLIP-G,
VAELoader. Images are noise: this checks the mechanics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from comfy_host import GRID_NODE, SAMPLER_NODE, WORKFLOW, without_ela

FILES = ("diffusion_models/tiny-sdxl-koala.safetensors", "text_encoders/tiny-clip-l.safetensors",
         "text_encoders/tiny-clip-g.safetensors", "vae/tiny-sd-vae.safetensors")


@pytest.fixture(scope="module")
def sdxl_host(comfy):
    missing = [path for path in FILES if not (comfy.root / "ComfyUI" / "models" / path).exists()]
    if missing:
        pytest.skip(f"tiny SDXL missing ({', '.join(missing)}): run tests/comfyui_host/make_tiny_sdxl.py")
    return comfy


def sdxl_workflow(steps: int = 8, size: int = 128, **ela) -> dict:
    prompt = json.loads((WORKFLOW.parent / "sdxl_api.json").read_text())
    prompt["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny-sdxl-koala.safetensors",
                                                           "weight_dtype": "default"}}
    prompt["12"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "tiny-clip-l.safetensors",
                                                                "clip_name2": "tiny-clip-g.safetensors",
                                                                "type": "sdxl", "device": "default"}}
    prompt["13"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-sd-vae.safetensors"}}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if value == ["1", 1]:
                node["inputs"][name] = ["12", 0]
            elif value == ["1", 2]:
                node["inputs"][name] = ["13", 0]
    prompt["4"]["inputs"].update(width=size, height=size)
    prompt[SAMPLER_NODE]["inputs"]["steps"] = steps
    prompt["5"]["inputs"].update(ela)
    return prompt


def test_sdxl_anchors_in_the_server_and_off_is_the_plain_image(sdxl_host):
    comfy = sdxl_host
    absent = comfy.run(without_ela(sdxl_workflow()))
    on = comfy.run(sdxl_workflow())
    anchored, updates, first, last = on.summary()
    assert (anchored, updates) == (3, 15) and last < first, on.text()
    assert "left unanchored" not in on.text() and "anchoring stopped" not in on.text(), on.text()
    assert np.abs(on.pixels().astype(int) - absent.pixels().astype(int)).mean() > 0.5
    assert on.pixels(GRID_NODE).shape[0] > 64
    off = comfy.run(sdxl_workflow(enabled=False))
    assert np.array_equal(off.pixels(), absent.pixels())
    again = comfy.run(without_ela(sdxl_workflow()))
    assert np.array_equal(again.pixels(), absent.pixels())
