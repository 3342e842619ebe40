"""The extension inside the real WebUI, through its HTTP API (see conftest.py for the host).

The tiny host model draws noise, so these check mechanics, not pictures: off changes nothing, on
anchors with a falling loss in every sampler family, the sampler continues from the written
latent, no hook outlives a generation, bad input degrades to "as if off", files and infotext.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from dataclasses import dataclass

import pytest

from ela_ext.config import LAYER_CHOICES, OBJECTIVE_NAMES, ElaConfig

from webui_host import (BASELINES, CHECKPOINTS, EMBEDDING_NAME, EMBEDDING_VECTORS, SAMPLER_HISTORIES, SAMPLERS,
                        SCRIPT_TITLE, SIZE, SPEC,
                        assert_bad_input_gives_the_off_image, assert_hires_and_img2img_anchor,
                        assert_off_is_byte_identical_to_no_extension, assert_on_changes_the_image_and_the_loss_falls,
                        assert_sampler_continues_from_the_anchored_latent, decode_image, ela_args, hook_counts,
                        assert_no_failure, infotext, pixels, txt2img_payload, use_model, xyz_args, xyz_axis,
                        xyz_cells)

MODELS = list(CHECKPOINTS)


def test_script_is_always_on_with_args_in_config_order(host):
    scripts = {script["name"]: script for script in host.get("/sdapi/v1/script-info")
               if script["name"] == SCRIPT_TITLE.lower()}
    assert len(scripts) == 1 and scripts[SCRIPT_TITLE.lower()]["is_alwayson"]
    args = scripts[SCRIPT_TITLE.lower()]["args"]
    assert [arg["value"] for arg in args] == ElaConfig().as_args()


@pytest.mark.parametrize("name", list(BASELINES))
def test_off_is_byte_identical_to_no_extension(webui, absent_images, name):
    model, payload = BASELINES[name]
    assert_off_is_byte_identical_to_no_extension(use_model(webui, model), payload, absent_images, name)


@pytest.mark.parametrize("model_host", MODELS, indirect=True)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_on_changes_the_image_and_the_loss_falls(model_host, sampler):
    assert_on_changes_the_image_and_the_loss_falls(model_host, sampler)


@pytest.mark.parametrize("model_host", MODELS, indirect=True)
@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
def test_every_objective_anchors_with_a_falling_loss(model_host, objective):
    """Each objective in the dropdown reads what it needs through the real host (A&E's paper form:
    the prompt's text-token columns, on SDXL from both encoders' layout)."""
    assert_on_changes_the_image_and_the_loss_falls(model_host, "Euler a", objective=objective)


@pytest.mark.parametrize("model_host", MODELS, indirect=True)
@pytest.mark.parametrize("sampler, history", SAMPLER_HISTORIES)
def test_sampler_continues_from_the_anchored_latent(model_host, sampler, history):
    """The write must reach the sampler's own state, not only the UNet (the fit: see webui_host)."""
    assert_sampler_continues_from_the_anchored_latent(model_host, sampler, history)


@pytest.mark.parametrize("prompt, args, warning", [
    ("a black cat and a green frog", ela_args(entities="dog | cat"), "not found in the prompt: 'dog'"),
    ("a black cat and a green frog", ela_args(entities="cat"), "needs at least two entities"),
    ("a black cat and a green frog", ela_args(entities="cat | | frog"), "is empty"),
    ("a black cat and a green frog", {"alwayson_scripts": {SCRIPT_TITLE: {"args": [True, SPEC, 5.0]}}},
     "lambda_weight must be in"),
    ("a black cat and a green frog", {"alwayson_scripts": {SCRIPT_TITLE: {"args": [True, SPEC, "abc"]}}},
     "lambda_weight must be a float, got 'abc'"),
    ("a black cat and a green frog", {"alwayson_scripts": {SCRIPT_TITLE: {"args": [True, SPEC, 0.3, 0, 0.5, "abc"]}}},
     "max_iterations must be a int, got 'abc'"),
    ("a black cat and a green frog", {"alwayson_scripts": {SCRIPT_TITLE: {"args": [True, SPEC, 0.3, 0, 0.5, "inf"]}}},
     "max_iterations must be a int, got 'inf'"),
    ("a black cat AND a green frog", ela_args(), "not found in the prompt: 'green', 'frog'"),
])
def test_bad_input_generates_as_if_off_and_leaves_no_hook(host, prompt, args, warning):
    payload = txt2img_payload("Euler a", prompt=prompt, **SIZE)
    off = assert_bad_input_gives_the_off_image(host, payload, args, warning)
    # Nothing of the failed generation carries over into the next one.
    assert host.txt2img(**payload)["images"] == off["images"]


def test_and_prompt_anchors_the_first_sub_prompt(host):
    result = host.txt2img(**txt2img_payload("Euler a", prompt="a black cat and a green frog AND a forest", **SIZE),
                          **ela_args())
    assert "AND prompt: entities are anchored in the first sub-prompt only" in infotext(result)
    assert host.get("/ela/v1/debug/calls")["steps"]


def test_batch_anchors_every_image(host):
    batch = host.txt2img(**txt2img_payload("Euler a", batch_size=2, n_iter=2, **SIZE), **ela_args())
    assert len(batch["images"]) == 4
    assert all("ELA log: steps=3;" in text for text in batch["info"]["infotexts"])


@pytest.mark.parametrize("model_host", MODELS, indirect=True)
@pytest.mark.parametrize("sampler", ["Euler a", "DDIM"])
def test_hires_and_img2img_anchor(model_host, sampler):
    assert_hires_and_img2img_anchor(model_host, sampler)


@pytest.fixture
def output_folder(host, tmp_path):
    """txt2img saves into tmp_path; the test host's settings file is its own, so this changes
    nothing of the prepared WebUI. (override_settings cannot do it: the API fixes the folder first.)"""
    previous = host.get("/sdapi/v1/options")["outdir_txt2img_samples"]
    host.post("/sdapi/v1/options", {"outdir_txt2img_samples": str(tmp_path)})
    yield tmp_path
    host.post("/sdapi/v1/options", {"outdir_txt2img_samples": previous})


@pytest.mark.parametrize("save_images, save_masks", [(True, True), (True, False), (False, True)])
def test_mask_grids_are_saved_and_returned_when_asked(host, output_folder, save_images, save_masks):
    result = host.txt2img(**txt2img_payload("Euler a", save_images=save_images, **SIZE),
                          **ela_args(save_masks=save_masks))
    assert len(list(output_folder.rglob("*-ela-masks.*"))) == (1 if save_images and save_masks else 0)
    assert len(list(output_folder.rglob("*.png"))) == (1 + save_masks if save_images else 0)
    assert len(result["images"]) == (2 if save_masks else 1)
    if save_masks:
        grid = decode_image(result["images"][1])
        assert grid.width > 128 and grid.height > 20


def test_infotext_round_trip_through_png_info(host):
    config = ElaConfig(enabled=True, entities=SPEC, lambda_weight=0.4, window_end=0.5, max_iterations=3,
                       step_size=0.2, binarization="mean")
    result = host.txt2img(**txt2img_payload("Euler a", **SIZE),
                          alwayson_scripts={SCRIPT_TITLE: {"args": config.as_args()}})
    png_info = host.png_info(result["images"][0])
    parameters = png_info["parameters"]
    assert ElaConfig.from_infotext(parameters["ELA"]) == config
    assert parameters["ELA log"].startswith("steps=3;")
    # The API's "infotext" goes through the script's infotext_fields, as PNG Info's paste does.
    pasted = host.txt2img(**txt2img_payload("Euler a", **SIZE), infotext=png_info["info"])
    assert pasted["images"] == result["images"]


PLAIN_COLUMNS = {"cat": [3], "frog": [7]}
# SD 2.x's OpenCLIP tokeniser has CLIP's BPE vocabulary (same ids) but pads with id 0, which is
# also the id of "!"; SDXL conditions on a CLIP-L and an OpenCLIP-bigG encoder side by side.
TOKEN_ROUTE_CASES = [
    ("a black cat and a green frog", PLAIN_COLUMNS),
    ("a (black:1.3) cat and a [green] frog", PLAIN_COLUMNS),
    ("a ((black cat)) and a green frog", PLAIN_COLUMNS),
    ("a black cat <lora:some_lora:0.8> and a green frog", PLAIN_COLUMNS),
    ("a black cat BREAK a green frog", {"cat": [3], "frog": [77 + 3]}),
]
LONG_PROMPT = "a black cat, " + "very " * 80 + "detailed, a green quetzalcoatl"


@pytest.mark.parametrize("model_host", MODELS, indirect=True)
@pytest.mark.parametrize("prompt, expected", TOKEN_ROUTE_CASES)
def test_token_route_columns(model_host, prompt, expected):
    answer = model_host.post("/ela/v1/tokens", {"prompt": prompt, "entities": SPEC})
    assert {entity["word"]: entity["columns"] for entity in answer["entities"]} == expected
    assert answer["warnings"] == []
    texts = {token["column"]: token["text"] for token in answer["tokens"]}
    assert all(texts[column] == word for word, columns in expected.items() for column in columns)


@pytest.mark.parametrize("model_host", MODELS, indirect=True)
def test_token_route_lists_the_text_tokens_only(model_host):
    """No start, end or padding token (SD2's padding id 0 included) is offered as a chip."""
    answer = model_host.post("/ela/v1/tokens", {"prompt": "a black cat and a green frog!", "entities": SPEC})
    assert [(token["column"], token["text"]) for token in answer["tokens"]] == list(enumerate(
        ["a", "black", "cat", "and", "a", "green", "frog", "!"], start=1))


@pytest.mark.parametrize("prompt", [prompt for prompt, _ in TOKEN_ROUTE_CASES] + [LONG_PROMPT])
def test_sdxl_both_encoders_anchor_the_route_columns(webui, prompt):
    """Generation checks that SDXL's second encoder places the entities where the first does
    (and refuses to anchor if not): every route case anchors on SDXL."""
    server = use_model(webui, "sdxl")
    spec = "black cat | green quetzalcoatl" if prompt == LONG_PROMPT else SPEC
    result = server.txt2img(**txt2img_payload("Euler a", prompt=prompt, **SIZE), **ela_args(entities=spec))
    assert_no_failure(infotext(result))
    assert "ELA log: steps=3;" in infotext(result)


@pytest.mark.parametrize("model_host", MODELS, indirect=True)
def test_token_route_long_prompt_and_multi_token_word(model_host):
    host = model_host
    prompt = LONG_PROMPT
    answer = host.post("/ela/v1/tokens", {"prompt": prompt, "entities": "black cat | green quetzalcoatl"})
    assert answer["sot_columns"] == [0, 77]
    columns = {entity["word"]: entity["columns"] for entity in answer["entities"]}
    assert columns["cat"] == [3]
    assert len(columns["quetzalcoatl"]) > 1 and min(columns["quetzalcoatl"]) > 77
    pieces = {token["column"]: token for token in answer["tokens"]}
    assert "".join(pieces[c]["text"] for c in columns["quetzalcoatl"]) == "quetzalcoatl"
    assert {pieces[c]["word"] for c in columns["quetzalcoatl"]} == {"quetzalcoatl"}


def test_token_route_detects_and_rejects(host):
    detected = host.post("/ela/v1/tokens", {"prompt": "a black cat and a green frog", "entities": ""})
    assert detected["spec"] == SPEC
    single = host.post("/ela/v1/tokens", {"prompt": "a black cat", "entities": "cat"})
    assert single["warnings"] and "two entities" in single["warnings"][0]
    for bad_spec, reason in [("dog | cat", "dog"), ("cat | | frog", "empty")]:
        status, payload = host.request("POST", "/ela/v1/tokens", {"prompt": "a black cat and a frog", "entities": bad_spec})
        assert status == 422 and reason in payload["detail"]


FAULT_WARNINGS = {"nan": "AnchoringError: non-finite cross-attention maps",
                  "oom": "OutOfMemoryError: CUDA out of memory (injected)",
                  "error": "RuntimeError: grad pass failed (injected)"}


@dataclass(frozen=True)
class Reference:
    """A short generation's results with ELA off and on, and the hook counts taken before them:
    what a generation disturbed by a fault, an interrupt or a skip must leave as it was."""
    payload: dict
    hooks: dict
    off: dict
    on: dict


@pytest.fixture
def reference(host) -> Reference:
    payload = txt2img_payload("Euler a", **SIZE)
    hooks = hook_counts(host)
    return Reference(payload, hooks, host.txt2img(**payload), host.txt2img(**payload, **ela_args()))


def _generate_with_fault(host, reference: Reference, kind: str, step: int) -> dict:
    """Inject a ``kind`` fault into the grad pass at anchoring step ``step`` and generate the
    reference payload with ELA on; no hook may outlive it."""
    host.post("/ela/v1/debug/fault", {"kind": kind, "step": step})
    failed = host.txt2img(**reference.payload, **ela_args())
    assert hook_counts(host) == reference.hooks
    return failed


@pytest.mark.parametrize("kind", FAULT_WARNINGS)
def test_grad_pass_failure_at_the_first_step_generates_as_if_off(host, reference, kind):
    failed = _generate_with_fault(host, reference, kind, step=0)
    warning = f"anchoring stopped at step 1, image continues unanchored: {FAULT_WARNINGS[kind]}"
    assert warning in infotext(failed) and f"ELA: {warning}" in host.log.read_text()
    # Pixels: the PNG bytes also hold the infotext, which has the ELA keys.
    assert pixels(failed["images"][0]) == pixels(reference.off["images"][0])
    assert host.get("/ela/v1/debug/calls")["steps"] == []
    # The fault was for one generation: the next one anchors as if it never happened.
    assert host.txt2img(**reference.payload, **ela_args())["images"] == reference.on["images"]


@pytest.mark.parametrize("kind", FAULT_WARNINGS)
def test_grad_pass_failure_at_a_later_step_stops_anchoring(host, reference, kind):
    failed = _generate_with_fault(host, reference, kind, step=1)
    assert f"anchoring stopped at step 2, image continues unanchored: {FAULT_WARNINGS[kind]}" in infotext(failed)
    assert [log["step"] for log in host.get("/ela/v1/debug/calls")["steps"]] == [0]
    # Step 0 was anchored before the failure, so the image is neither the off one nor the fully
    # anchored one (steps 0-2): it is step 0's anchored latent sampled on without ELA.
    assert pixels(failed["images"][0]) != pixels(reference.off["images"][0])
    assert pixels(failed["images"][0]) != pixels(reference.on["images"][0])


def _call_while_sampling(host, payload: dict, route: str) -> dict:
    """POST ``payload`` to txt2img in a thread, POST ``route`` once sampling reached step 1, and
    return the txt2img answer (it must be a 200: an interrupt is not an error)."""
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(answer=host.request("POST", "/sdapi/v1/txt2img", payload)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while host.get("/sdapi/v1/progress?skip_current_image=true")["state"]["sampling_step"] < 1:
            assert worker.is_alive() and time.monotonic() < deadline, f"sampling never started: {host.log_tail()}"
            time.sleep(0.05)
        host.post(route, {})
    finally:
        worker.join(timeout=600)
    status, result = outcome["answer"]
    assert status == 200, (status, result, host.log_tail())
    result["info"] = json.loads(result["info"])
    return result


def _assert_nothing_left_behind(host, reference: Reference) -> None:
    assert hook_counts(host) == reference.hooks
    assert host.txt2img(**reference.payload)["images"] == reference.off["images"]
    assert host.txt2img(**reference.payload, **ela_args())["images"] == reference.on["images"]


def test_interrupt_inside_the_window_leaves_nothing_behind(host, reference):
    # Every one of 40 steps anchored: the interrupt lands while anchoring.
    _call_while_sampling(host, {**txt2img_payload("Euler a", steps=40, **SIZE), **ela_args(window_end=1.0)},
                         "/sdapi/v1/interrupt")
    assert 1 <= len(host.get("/ela/v1/debug/calls")["steps"]) < 40
    _assert_nothing_left_behind(host, reference)


def test_skip_inside_the_window_ends_that_image_only(host, reference):
    # Steps 0-9 of 40 anchored: the skip lands while anchoring the first image; the second
    # image must then be anchored from its first step, exactly as when generated alone.
    long = txt2img_payload("Euler a", steps=40, **SIZE)
    late_window = ela_args(window_end=0.25)
    result = _call_while_sampling(host, {**long, "n_iter": 2, **late_window}, "/sdapi/v1/skip")
    skipped, following = result["info"]["infotexts"]
    assert 1 <= int(re.search(r"ELA log: steps=(\d+);", skipped).group(1)) < 10, skipped
    # Each image's infotext reports its own anchoring (not the batch's first image's).
    assert "ELA log: steps=10;" in following
    alone = host.txt2img(**{**long, "seed": long["seed"] + 1}, **late_window)
    assert pixels(result["images"][1]) == pixels(alone["images"][0])
    _assert_nothing_left_behind(host, reference)


@pytest.mark.parametrize("img2img", [False, True])
def test_xyz_enabled_and_lambda_axes_override_the_accordion_per_cell(host, img2img):
    payload = txt2img_payload("Euler a", **SIZE)
    if img2img:
        payload = {**payload, "init_images": [host.txt2img(**payload)["images"][0]], "denoising_strength": 0.8}
    generate = host.img2img if img2img else host.txt2img
    enabled = xyz_axis(host, "[ELA] Enabled", img2img)
    lambda_axis = xyz_axis(host, "[ELA] Lambda (attenuation weight)", img2img)
    # The accordion is off; the X axis turns ELA on for half of the cells. Lambda weighs ELA's
    # attenuation term, so the objective is one of ELA's (the default, separate_enhance, has none).
    grid = generate(**payload, **ela_args(enabled=False, objective="ela_enhance"),
                    **xyz_args((enabled, "", ["False", "True"]), (lambda_axis, "0.2, 0.6", [])))
    cells = xyz_cells(grid)
    assert len(cells) == 4
    plain_off = pixels(generate(**payload)["images"][0])
    off_cells = [image for image, text in cells if "ELA" not in text]
    assert len(off_cells) == 2 and all(pixels(image) == plain_off for image in off_cells)
    on_cells = {weight: (image, text) for weight in (0.2, 0.6) for image, text in cells
                if f"ELA: entities={SPEC};lambda={weight};" in text}
    assert set(on_cells) == {0.2, 0.6}
    for weight, (image, text) in on_cells.items():
        assert "ELA log: steps=" in text and "ELA log: steps=0" not in text
        # A cell is the image the accordion would give with the same values.
        assert pixels(image) == pixels(generate(**payload, **ela_args(lambda_weight=weight, objective="ela_enhance"))
                                       ["images"][0])
    assert pixels(on_cells[0.2][0]) != pixels(on_cells[0.6][0])


def test_xyz_objective_dropdown_and_entities_axes(host):
    objective = xyz_axis(host, "[ELA] Objective")
    entities = xyz_axis(host, "[ELA] Entities")
    grid = host.txt2img(**txt2img_payload("Euler a", **SIZE), **ela_args(),
                        **xyz_args((objective, "", ["ela", "iou"]), (entities, f"{SPEC}, cat | frog", [])))
    texts = [text for _, text in xyz_cells(grid)]
    assert len(texts) == 4
    for spec in (SPEC, "cat | frog"):
        for name in ("ela", "iou"):
            (text,) = [text for text in texts if f"ELA: entities={spec};" in text and f";objective={name};" in text]
            assert "ELA log: steps=" in text
            assert_no_failure(text)


def test_xyz_layers_dropdown_axis_reaches_the_capture(host):
    """Each ``[ELA] Layers`` cell reads its own UNet layers: it is the image the accordion gives
    with that choice, and the choices anchor differently."""
    payload = txt2img_payload("Euler a", **SIZE)
    layers = xyz_axis(host, "[ELA] Layers")
    grid = host.txt2img(**payload, **ela_args(), **xyz_args((layers, "", list(LAYER_CHOICES))))
    cells = xyz_cells(grid)
    assert len(cells) == len(LAYER_CHOICES)
    images = {}
    for choice in LAYER_CHOICES:
        ((image, text),) = [(image, text) for image, text in cells if f";layers={choice};" in text]
        assert "ELA log: steps=" in text and "ELA log: steps=0" not in text, text
        assert_no_failure(text)
        assert pixels(image) == pixels(host.txt2img(**payload, **ela_args(layers=choice))["images"][0])
        images[choice] = pixels(image)
    assert all(images[a] != images[b] for a, b in itertools.combinations(LAYER_CHOICES, 2))


@pytest.mark.parametrize("label, values, fragment", [
    ("[ELA] Window start", "0.1", ";start=0.1;"),
    ("[ELA] Window end", "0.8", ";end=0.8;"),
    ("[ELA] Iterations per step", "2", ";iters=2;"),
    ("[ELA] Step size", "0.25", ";step=0.25;"),
    ("[ELA] Loss threshold", "0.2", ";threshold=0.2;"),
])
def test_xyz_numeric_axes_land_in_the_cell_infotext(host, label, values, fragment):
    grid = host.txt2img(**txt2img_payload("Euler a", **SIZE), **ela_args(),
                        **xyz_args((xyz_axis(host, label), values, [])))
    ((_, text),) = xyz_cells(grid)
    assert fragment in text and "ELA log: steps=" in text, text


def test_xyz_out_of_range_value_warns_and_gives_the_off_image(host):
    payload = txt2img_payload("Euler a", **SIZE)
    lambda_axis = xyz_axis(host, "[ELA] Lambda (attenuation weight)")
    grid = host.txt2img(**payload, **ela_args(), **xyz_args((lambda_axis, "5", [])))
    ((image, text),) = xyz_cells(grid)
    assert "lambda_weight must be in [0.0, 1.0], got 5.0: generated without ELA" in text
    assert pixels(image) == pixels(host.txt2img(**payload)["images"][0])


def test_embedding_name_maps_to_all_its_vectors_and_anchors(host):
    """A textual-inversion embedding (made by the tests, 3 vectors) named as an entity takes the
    columns of all its vectors, in the token route and in generation, and anchoring works on it."""
    prompt = f"a black cat and a green {EMBEDDING_NAME}"
    spec = f"black cat | green {EMBEDDING_NAME}"
    answer = host.post("/ela/v1/tokens", {"prompt": prompt, "entities": spec})
    vectors = list(range(7, 7 + EMBEDDING_VECTORS))
    assert {entity["word"]: entity["columns"] for entity in answer["entities"]} == {"cat": [3], EMBEDDING_NAME: vectors}
    assert answer["entities"][1]["attributes"] == [{"word": "green", "columns": [6]}]
    assert answer["warnings"] == []
    assert [token["word"] for token in answer["tokens"] if token["column"] in vectors] == [EMBEDDING_NAME] * 3
    detected = host.post("/ela/v1/tokens", {"prompt": prompt, "entities": ""})
    assert detected["spec"] == spec

    payload = txt2img_payload("Euler a", prompt=prompt, **SIZE)
    off = host.txt2img(**payload)
    on = host.txt2img(**payload, **ela_args(entities=spec))
    assert f"TI hashes: \"{EMBEDDING_NAME}:" in infotext(off)  # the WebUI used the embedding
    assert f"ELA: entities={spec};" in infotext(on) and "ELA log: steps=3;" in infotext(on)
    assert_no_failure(infotext(on))
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    for log in host.get("/ela/v1/debug/calls")["steps"]:
        assert log["updates"] >= 1 and log["losses"][-1] < log["losses"][0], log
