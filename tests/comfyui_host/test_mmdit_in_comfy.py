"""The node pack on MM-DiT models in a real ComfyUI (v0.3.64, CPU), through the example workflows
``ela_comfy/workflows/sd3_api.json`` and ``flux_api.json`` with the tiny random models of
``comfy-host/mmdit`` (``make_tiny_sd3.py``: MMDiT depth 2 + full-size random CLIP-L + TAESD3;
``make_tiny_flux.py``: Flux with 1 double block, 770 MB) and of ``make_tiny_sd35.py`` (SD3.5
Large's q/k RMS norms; those and SD3.5 Medium's dual attention in block 0), which run the SD3
workflow with their checkpoints. Users' text encoders are too big here:
SD3's TripleCLIPLoader and Flux's DualCLIPLoader are replaced by CLIPLoader(tiny CLIP-L,
``type=sd3``), so the conditioning is CLIP-L's 77 columns (T5's columns are tested host-free,
tests/test_comfy_mmdit_glue.py). Flux samples at cfg 1, as its guidance-distilled models do: no
unconditional batch.

Images are noise: these check the mechanics (anchoring runs with a falling loss and changes the
image; off and absent are pixel-identical; nothing outlives a prompt).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from comfy_host import CHECKOUT, GRID_NODE, SAMPLER_NODE, WORKFLOW, comfy_root_or_skip, without_ela
from test_comfyui import api_from_ui

TINY = {"sd3": "diffusion_models/tiny-sd3-mmdit.safetensors", "flux": "diffusion_models/tiny-flux.safetensors",
        "clip": "text_encoders/tiny-clip-l.safetensors", "sd3_vae": "vae/tiny-taesd3.safetensors",
        "flux_vae": "vae/tiny-taef1.safetensors", "sd3_ckpt": "checkpoints/tiny-sd3.safetensors"}
TINY_CLIP = {"class_type": "CLIPLoader", "inputs": {"clip_name": "tiny-clip-l.safetensors", "type": "sd3",
                                                    "device": "default"}}
# The SD3 workflow's checkpoint, per model; the SD3.5 ones come from make_tiny_sd35.py.
SD3_CHECKPOINTS = {"sd3": "tiny-sd3.safetensors", "sd35-large": "tiny-sd35-large.safetensors",
                   "sd35-medium": "tiny-sd35-medium.safetensors"}
MODELS = [*SD3_CHECKPOINTS, "flux"]


@pytest.fixture(scope="module")
def tiny_models(comfy):
    missing = [path for path in TINY.values() if not (comfy.root / "ComfyUI" / "models" / path).exists()]
    if missing:
        pytest.skip(f"tiny MM-DiT models missing ({', '.join(missing)}): run comfy-host/mmdit/make_tiny_sd3.py "
                    "and make_tiny_flux.py")
    return comfy


def host_with(comfy, model: str):
    """The host, or a skip saying how to build ``model`` if it is an SD3.5 not built yet."""
    skip_unless_built(comfy.root, model)
    return comfy


def skip_unless_built(root: Path, model: str) -> None:
    checkpoint = SD3_CHECKPOINTS.get(model)
    if model.startswith("sd35") and not (root / "ComfyUI" / "models" / "checkpoints" / checkpoint).exists():
        pytest.skip(f"{checkpoint} missing: run tests/comfyui_host/make_tiny_sd35.py")


def mmdit_workflow(model: str, steps: int = 8, seed: int = 42, size: int = 64, **ela) -> dict:
    """The example workflow of ``model``'s family on the tiny models; ``ela`` changes the node's inputs."""
    family = "flux" if model == "flux" else "sd3"
    prompt = json.loads((WORKFLOW.parent / f"{family}_api.json").read_text())
    prompt["12"] = json.loads(json.dumps(TINY_CLIP))
    if family == "sd3":
        prompt["1"]["inputs"]["ckpt_name"] = SD3_CHECKPOINTS[model]
    else:
        prompt["1"]["inputs"]["unet_name"] = "tiny-flux.safetensors"
        prompt["13"]["inputs"]["vae_name"] = "tiny-taef1.safetensors"
    prompt["4"]["inputs"].update(width=size, height=size)
    prompt[SAMPLER_NODE]["inputs"].update(steps=steps, seed=seed)
    prompt["5"]["inputs"].update(ela)
    return prompt


def differs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("model", MODELS)
def test_anchoring_changes_the_image_and_the_loss_falls(tiny_models, model):
    comfy = host_with(tiny_models, model)
    on = comfy.run(mmdit_workflow(model))
    off = comfy.run(mmdit_workflow(model, enabled=False))
    anchored, updates, first, last = on.summary()
    assert (anchored, updates) == (3, 15), on.text()
    assert last < first, on.text()
    assert "anchoring stopped" not in on.text() and "left unanchored" not in on.text(), on.text()
    assert differs(on.pixels(), off.pixels()) > 0.5
    grid = on.pixels(GRID_NODE)
    assert grid.shape[0] > 64 and grid.shape[1] > 64
    target = os.environ.get(f"ELA_COMFY_MASK_GRID_{model.upper().replace('-', '_')}")
    if target:
        shutil.copy(comfy.root / "output" / on.entry["outputs"][GRID_NODE]["images"][0]["filename"], target)


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_the_default_objective_anchors_as_attend_excite_paper(tiny_models, model):
    """The workflows' ``auto`` (the node's default) is ``attend_excite_paper`` on an MM-DiT: the same
    pixels, and not those of the UNets' ``separate_enhance``."""
    comfy = host_with(tiny_models, model)
    auto, chosen, other = (comfy.run(mmdit_workflow(model, steps=4, max_iterations=2, objective=objective)).pixels()
                           for objective in ("auto", "attend_excite_paper", "separate_enhance"))
    assert np.array_equal(auto, chosen)
    assert differs(auto, other) > 0


@pytest.mark.parametrize("model", MODELS)
def test_off_and_a_plain_run_after_an_anchored_one_are_pixel_identical_to_no_node(tiny_models, model):
    comfy = host_with(tiny_models, model)
    absent = comfy.run(without_ela(mmdit_workflow(model)))
    off = comfy.run(mmdit_workflow(model, enabled=False))
    assert np.array_equal(off.pixels(), absent.pixels())
    assert comfy.run(mmdit_workflow(model)).summary()[0] == 3
    again = comfy.run(without_ela(mmdit_workflow(model)))
    assert np.array_equal(again.pixels(), absent.pixels())


@pytest.mark.parametrize("model", SD3_CHECKPOINTS)
def test_every_joint_block_choice_anchors(tiny_models, model):
    """Each joint block choice anchors (on SD3.5 Medium, ``early`` reads block 0 alone, a dual-attention
    block); SD3 through UNETLoader + CLIPLoader + VAELoader, as users load a bare MMDiT. Separate-and-
    Enhance's objective: its loss falls on the tiny random models in two passes, where the MM-DiT
    default's (``attend_excite_paper``, a max over tokens) may not (0.8394 -> 0.8399 on ``early``)."""
    comfy = host_with(tiny_models, model)
    for choice in ("early", "middle", "all"):
        prompt = mmdit_workflow(model, steps=4, joint_blocks=choice, max_iterations=2, objective="separate_enhance")
        if model == "sd3":
            prompt["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny-sd3-mmdit.safetensors",
                                                                   "weight_dtype": "default"}}
            prompt["13"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-taesd3.safetensors"}}
            prompt["7"]["inputs"]["vae"] = ["13", 0]
        anchored, updates, first, last = comfy.run(prompt).summary()
        assert (anchored, updates) == (2, 4) and last < first, (choice, anchored, updates, first, last)


@pytest.mark.parametrize("model", ["sd35-large", "sd35-medium"])
def test_the_capture_reads_the_joint_attention_never_attn2(model):
    """On SD3.5 the maps come from each read block's joint attention, with its RMS-normed queries;
    SD3.5 Medium's image-only ``attn2`` also reaches the attention hook (block 0) and is passed
    over. In ComfyUI's Python with the node and sampler the server runs (joint_capture_in_comfy.py):
    the server cannot tell which attention the maps came from."""
    root = comfy_root_or_skip()
    skip_unless_built(root, model)
    result = subprocess.run([str(root / "venv" / "bin" / "python"), str(Path(__file__).with_name(
        "joint_capture_in_comfy.py")), str(CHECKOUT), SD3_CHECKPOINTS[model]], cwd=root / "ComfyUI",
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(root / "ComfyUI"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert (found["qk_norm"], found["dual_attention"]) == ("rms", [0] if model == "sd35-medium" else [])
    assert found["report"].startswith("ELA log: steps=2;updates=10;"), found["report"]
    kept = [call for call in found["calls"] if call["kept"]]
    assert sorted(call["block"] for call in kept) == [0, 1]  # the default middle third of 2 blocks
    assert all(call["queries"] == ["attn"] and call["length"] == call["text"] + call["image"] for call in kept)
    passed_over = [call for call in found["calls"] if not call["kept"]]
    assert [(call["block"], call["queries"], call["length"]) for call in passed_over] == \
        ([(0, ["attn2"], 16)] if model == "sd35-medium" else [])


def test_sd35_medium_with_skip_layer_guidance(tiny_models):
    """SD3.5 Medium's recommended SkipLayerGuidanceSD3 before the node: its extra skipped-layer pass
    (a post-CFG function) and the grad pass leave each other alone."""
    comfy = host_with(tiny_models, "sd35-medium")

    def with_slg(prompt: dict) -> dict:
        prompt["14"] = {"class_type": "SkipLayerGuidanceSD3", "inputs": {
            "model": ["1", 0], "layers": "1", "scale": 3.0, "start_percent": 0.0, "end_percent": 0.5}}
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if value == ["1", 0] and node["class_type"] != "SkipLayerGuidanceSD3":
                    node["inputs"][name] = ["14", 0]
        return prompt

    plain = comfy.run(without_ela(mmdit_workflow("sd35-medium")))
    absent = comfy.run(with_slg(without_ela(mmdit_workflow("sd35-medium"))))
    assert differs(absent.pixels(), plain.pixels()) > 0.5
    on = comfy.run(with_slg(mmdit_workflow("sd35-medium")))
    anchored, updates, first, last = on.summary()
    assert (anchored, updates) == (3, 15) and last < first, on.text()
    assert differs(on.pixels(), absent.pixels()) > 0.5
    off = comfy.run(with_slg(mmdit_workflow("sd35-medium", enabled=False)))
    assert np.array_equal(off.pixels(), absent.pixels())


def test_a_batch_of_two_at_cfg_1_anchors_both_flux_images(tiny_models):
    comfy = tiny_models
    prompt = mmdit_workflow("flux", steps=4, max_iterations=2)
    prompt["4"]["inputs"]["batch_size"] = 2
    on = comfy.run(prompt)
    assert on.summary()[:2] == (2, 4), on.text()
    off = comfy.run(without_ela(prompt))
    for anchored, unanchored in zip(on.entry["outputs"]["8"]["images"], off.entry["outputs"]["8"]["images"]):
        assert not np.array_equal(comfy.image(anchored), comfy.image(unanchored))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_ui_workflows_are_the_api_workflows(tiny_models, family):
    """The drag-and-drop examples queue exactly the API-format ones (with the server's node
    definitions), and the API ones run once their model names are the tiny models'."""
    comfy = tiny_models
    _, object_info = comfy.request("GET", "/object_info")
    folder = WORKFLOW.parent
    api = json.loads((folder / f"{family}_api.json").read_text())
    assert api_from_ui(json.loads((folder / f"{family}_ui.json").read_text()), object_info) == api
    assert comfy.run(mmdit_workflow(family, steps=2)).ok
