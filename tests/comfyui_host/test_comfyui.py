"""The node pack in a real ComfyUI (v0.3.64, CPU, the tiny random SD1.5-shaped checkpoint), driven
through its HTTP API with the repository's example workflow ``ela_comfy/workflows/txt2img_api.json``.

Its images are noise: these tests check the mechanics (the pack loads, anchoring changes the image
with a falling loss under each sampler, off and absent are pixel-identical, nothing outlives a
prompt, bad input gives a warning and the plain image), not image quality.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest
from comfy_host import (CHECKPOINT, ELA_NODE, EMBEDDING_NAME, GRID_NODE, PACK_NAME, SAMPLER_NODE, WORKFLOW,
                        without_ela, workflow)

from ela_ext.config import API_FIELDS

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "heun", "ddim", "uni_pc", "heunpp2", "dpm_2_ancestral",
            "dpmpp_2s_ancestral"]
PROMPT = "a black cat and a green frog"


def assert_anchored(result, steps: int = 3) -> None:
    """8 steps, window 0-0.3: steps 0, 1 and 2 anchored, the first step's loss falling."""
    anchored, updates, first, last = result.summary()
    assert (anchored, updates) == (steps, 5 * steps), result.text()
    assert last < first, result.text()


def test_the_pack_loads_with_every_setting(comfy):
    status, info = comfy.request("GET", "/object_info/ElaAnchoring")
    assert status == 200 and "ElaAnchoring" in info, info
    inputs = info["ElaAnchoring"]["input"]["required"]
    # Every ElaConfig field but save_masks (the report node's IMAGE output takes its place).
    assert set(inputs) == {"model", "clip", "text", *API_FIELDS} - {"save_masks"}
    assert info["ElaAnchoring"]["output"] == ["MODEL", "ELA_RUN"]
    status, info = comfy.request("GET", "/object_info/ElaReport")
    assert status == 200 and info["ElaReport"]["output"] == ["IMAGE", "STRING"]
    failed = [line for line in comfy.log_text().splitlines() if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not [line for line in failed if PACK_NAME in line], failed


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_anchoring_changes_the_image_and_the_loss_falls(comfy, sampler):
    on = comfy.run(workflow(sampler))
    off = comfy.run(workflow(sampler, enabled=False))
    assert_anchored(on)
    assert np.abs(on.pixels().astype(int) - off.pixels().astype(int)).mean() > 0.5
    assert off.text() == "ELA off"
    grid = on.pixels(GRID_NODE)
    assert grid.shape[0] > 64 and grid.shape[1] > 64  # the grid, not the blank placeholder
    if sampler == "euler" and os.environ.get("ELA_COMFY_MASK_GRID"):
        shutil.copy(comfy.root / "output" / on.entry["outputs"][GRID_NODE]["images"][0]["filename"],
                    os.environ["ELA_COMFY_MASK_GRID"])


def test_a_batch_of_two_anchors_both_images(comfy):
    prompt = workflow("euler")
    prompt["4"]["inputs"]["batch_size"] = 2
    on = comfy.run(prompt)
    off = comfy.run(without_ela(prompt))
    assert_anchored(on)
    images = on.entry["outputs"]["8"]["images"]
    plain = off.entry["outputs"]["8"]["images"]
    assert len(images) == len(plain) == 2
    for anchored, unanchored in zip(images, plain):
        assert not np.array_equal(comfy.image(anchored), comfy.image(unanchored))


@pytest.mark.parametrize("sampler", ["euler", "heun", "uni_pc"])
def test_off_is_pixel_identical_to_the_workflow_without_the_node(comfy, sampler):
    off = comfy.run(workflow(sampler, enabled=False))
    absent = comfy.run(without_ela(workflow(sampler)))
    assert np.array_equal(off.pixels(), absent.pixels())


def rerun_plain(prompt: dict, negative: str) -> dict:
    """The plain workflow with an equivalent negative prompt (same tokens: ComfyUI drops empty
    words), so the sampler runs again on the model already loaded instead of being cached."""
    plain = without_ela(prompt)
    plain["3"]["inputs"]["text"] = negative
    return plain


def test_no_patch_outlives_its_prompt(comfy):
    before = comfy.run(rerun_plain(workflow("euler", seed=7), "blurry"))
    assert_anchored(comfy.run(workflow("euler", seed=7)))
    after = comfy.run(rerun_plain(workflow("euler", seed=7), "blurry "))
    assert after.executed(SAMPLER_NODE) and not after.executed("1")  # the same loaded model sampled again
    assert np.array_equal(before.pixels(), after.pixels())


def with_lora(prompt: dict) -> dict:
    """A LoRA on the cross-attention keys (the host's random one) between the checkpoint and the
    rest: ComfyUI patches it into the UNet's weights when it loads the model."""
    prompt["30"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "tiny-attn2k-lora.safetensors",
        "strength_model": 1.0, "strength_clip": 1.0}}
    for key, node in prompt.items():
        for name, value in node["inputs"].items():
            if key != "30" and isinstance(value, list) and value[0] == "1" and value[1] in (0, 1):
                node["inputs"][name] = ["30", value[1]]
    return prompt


def test_a_lora_patched_model_anchors_and_is_given_back_as_it_was(comfy):
    """ELA swaps the UNet's weights for copies during a run; with a LoRA patched into them, the
    plain image after an anchored run must still be the one before it."""
    before = comfy.run(with_lora(rerun_plain(workflow("euler", seed=5), "blurry")))
    anchored = comfy.run(with_lora(workflow("euler", seed=5)))
    assert_anchored(anchored)
    assert not np.array_equal(anchored.pixels(), before.pixels())
    after = comfy.run(with_lora(rerun_plain(workflow("euler", seed=5), "blurry ")))
    assert after.executed(SAMPLER_NODE)
    assert np.array_equal(before.pixels(), after.pixels())


def with_sampler_node(prompt: dict, kind: str) -> dict:
    """The workflow with KSamplerAdvanced, SamplerCustom or SamplerCustomAdvanced in place of
    KSampler, same settings."""
    ksampler = prompt[SAMPLER_NODE]["inputs"]
    common = {"model": ksampler["model"], "positive": ksampler["positive"], "negative": ksampler["negative"],
              "latent_image": ksampler["latent_image"], "cfg": ksampler["cfg"]}
    if kind == "KSamplerAdvanced":
        prompt[SAMPLER_NODE] = {"class_type": kind, "inputs": {
            **common, "add_noise": "enable", "noise_seed": ksampler["seed"], "steps": ksampler["steps"],
            "sampler_name": ksampler["sampler_name"], "scheduler": ksampler["scheduler"], "start_at_step": 0,
            "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
        return prompt
    prompt["20"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": ksampler["sampler_name"]}}
    prompt["21"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ksampler["model"], "scheduler": ksampler["scheduler"], "steps": ksampler["steps"], "denoise": 1.0}}
    if kind == "SamplerCustom":
        prompt[SAMPLER_NODE] = {"class_type": kind, "inputs": {
            **common, "add_noise": True, "noise_seed": ksampler["seed"], "sampler": ["20", 0], "sigmas": ["21", 0]}}
        return prompt
    prompt["22"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": ksampler["seed"]}}
    prompt["23"] = {"class_type": "CFGGuider", "inputs": {
        "model": ksampler["model"], "positive": ksampler["positive"], "negative": ksampler["negative"],
        "cfg": ksampler["cfg"]}}
    prompt[SAMPLER_NODE] = {"class_type": kind, "inputs": {
        "noise": ["22", 0], "guider": ["23", 0], "sampler": ["20", 0], "sigmas": ["21", 0],
        "latent_image": ksampler["latent_image"]}}
    return prompt


@pytest.mark.parametrize("kind", ["KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"])
def test_the_other_stock_samplers_anchor(comfy, kind):
    on = comfy.run(with_sampler_node(workflow("euler"), kind))
    off = comfy.run(with_sampler_node(workflow("euler", enabled=False), kind))
    assert_anchored(on)
    assert not np.array_equal(on.pixels(), off.pixels())
    # The same sampling as KSampler's: the anchored images agree.
    assert np.array_equal(on.pixels(), comfy.run(workflow("euler")).pixels())


def test_long_prompt_weights_and_an_embedding_anchor_in_the_second_chunk(comfy):
    text = ("a photo of " + ", ".join(["highly detailed"] * 40)
            + f", a (red cube:1.2) and a ((embedding:{EMBEDDING_NAME}))")
    prompt = workflow("euler", text=text, entities=f"red cube | embedding:{EMBEDDING_NAME}")
    prompt["2"]["inputs"]["text"] = text
    result = comfy.run(prompt)
    assert_anchored(result)
    message = result.text(ELA_NODE)
    assert message.startswith("ELA entities: cube "), message
    columns = [int(number) for number in re.findall(r"(?<![\w-])\d+", message)]
    assert len(columns) == 4 and all(column > 77 for column in columns), message  # cube, red, 2 vectors
    assert "embedding:" + EMBEDDING_NAME in message


@pytest.mark.parametrize("case, change, warning", [
    ("entity not in the prompt", {"entities": "cat | dog"}, "not found in the prompt: 'dog'"),
    ("empty prompt", {"text": "", "entities": "", "conditioning": ""}, "ELA needs at least two entities, found 0"),
    ("NaN setting", {"lambda_weight": float("nan")}, "lambda_weight must be in [0.0, 1.0], got nan"),
    ("single entity", {"entities": "cat"}, "ELA needs at least two entities, found 1"),
    ("conditioning from another prompt", {"conditioning": "a green frog and a black cat"},
     "the sampler's positive conditioning is not this node's prompt"),
])
def test_bad_input_gives_a_warning_and_the_plain_image(comfy, case, change, warning):
    change = dict(change)
    conditioning = change.pop("conditioning", PROMPT)
    prompt = workflow("euler", **change)
    prompt["2"]["inputs"]["text"] = conditioning
    result = comfy.run(prompt)
    assert warning in result.text(), result.text()
    assert "ELA log: steps=0" in result.text()
    assert np.array_equal(result.pixels(), comfy.run(without_ela(prompt)).pixels()), case


def test_a_combined_conditioning_gives_a_warning_and_the_plain_image(comfy):
    prompt = workflow("euler")
    prompt["41"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 1]}}
    prompt["42"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0],
                                                                    "conditioning_2": ["41", 0]}}
    prompt[SAMPLER_NODE]["inputs"]["positive"] = ["42", 0]
    result = comfy.run(prompt)
    assert "the positive conditioning has 2 parts (combined or area conditioning)" in result.text()
    assert np.array_equal(result.pixels(), comfy.run(without_ela(prompt)).pixels())


def test_a_nan_latent_gives_a_warning_and_the_plain_image(comfy):
    """A non-finite value inside sampling (here the starting latent times NaN): the engine's
    check stops anchoring at the first anchored step, the sampler goes on as without the node."""
    prompt = workflow("euler")
    prompt["40"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["4", 0], "multiplier": float("nan")}}
    prompt[SAMPLER_NODE]["inputs"]["latent_image"] = ["40", 0]
    result = comfy.run(prompt)
    assert "anchoring stopped at step 1, image continues unanchored: AnchoringError: non-finite" in result.text()
    assert np.array_equal(result.pixels(), comfy.run(without_ela(prompt)).pixels())


def test_an_interrupt_leaves_nothing_behind(comfy):
    before = comfy.run(rerun_plain(workflow("euler", seed=11), "blurry"))
    long_run = workflow("euler", seed=11, steps=40, window_end=1.0, loss_threshold=0.0)
    prompt_id = comfy.queue(long_run)
    for _ in range(600):
        _, queue = comfy.request("GET", "/queue")
        if queue.get("queue_running"):
            break
        time.sleep(0.1)
    time.sleep(3)  # inside the sampling: 40 anchored steps take about 20 s here
    comfy.request("POST", "/interrupt", {})
    entry = comfy.wait(prompt_id)
    assert entry["status"]["status_str"] == "error", entry["status"]
    assert "ELA: sampling stopped (InterruptProcessingException) before the run ended" in comfy.log_text()
    after = comfy.run(rerun_plain(workflow("euler", seed=11), "blurry  "))
    assert after.executed(SAMPLER_NODE)
    assert np.array_equal(before.pixels(), after.pixels())


def test_cost_of_an_anchored_image(comfy):
    """Wall time of the whole workflow, anchored (defaults) against plain, 64x64, 20 Euler steps,
    three seeds each; printed for the README (pytest -s)."""
    timings = {"plain": [], "anchored": []}
    for seed in (101, 102, 103):
        for kind in ("plain", "anchored"):
            prompt = workflow("euler", steps=20, seed=seed)
            prompt = without_ela(prompt) if kind == "plain" else prompt
            start = time.perf_counter()
            assert comfy.run(prompt).ok
            timings[kind].append(time.perf_counter() - start)
    ratio = float(np.median(timings["anchored"]) / np.median(timings["plain"]))
    print(f"\nComfyUI cost: plain {np.median(timings['plain']):.2f} s, anchored {np.median(timings['anchored']):.2f} s, "
          f"ratio {ratio:.2f} (64x64, 20 euler steps, window 0-0.3, 5 iterations)")
    assert 1.0 < ratio < 10.0


def api_from_ui(ui: dict, object_info: dict) -> dict:
    """What the front end queues for a UI-format workflow: each node's widget values assigned to its
    widget inputs in the server's ``input_order`` (a seed's "control after generate" value skipped),
    its links to the other inputs."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        values = iter(node["widgets_values"])
        inputs = {}
        for name in info["input_order"].get("required", []) + info["input_order"].get("optional", []):
            linked = [slot for slot in node["inputs"] if slot["name"] == name]
            if linked:
                _, origin, origin_slot, target, _, kind = links[linked[0]["link"]]
                assert target == node["id"] and kind == object_info[
                    next(n["type"] for n in ui["nodes"] if n["id"] == origin)]["output"][origin_slot]
                inputs[name] = [str(origin), origin_slot]
            else:
                inputs[name] = next(values)
                if len(specs[name]) > 1 and specs[name][1].get("control_after_generate"):
                    assert next(values) == "fixed"
        assert next(values, None) is None, f"{node['type']}: widget values left over"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("family", ["txt2img", "sdxl"])
def test_the_ui_workflows_are_the_api_workflows(comfy, family):
    """The drag-and-drop (UI format) examples queue exactly the API-format ones, read with the
    running server's node definitions; the API ones validate (a 400 would name the input)."""
    folder = WORKFLOW.parent
    _, object_info = comfy.request("GET", "/object_info")
    api = json.loads((folder / f"{family}_api.json").read_text())
    assert api_from_ui(json.loads((folder / f"{family}_ui.json").read_text()), object_info) == api
    api["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    api["4"]["inputs"].update(width=64, height=64)
    api[SAMPLER_NODE]["inputs"]["steps"] = 4
    assert comfy.run(api).ok
