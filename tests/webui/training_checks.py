"""What test_training.py (A1111) and test_forge.py (Forge) both check about ``POST /ela/v1/train``.

The ``test_*`` functions here are imported by both modules, which collect them as their own and
provide the fixtures ``training_host`` (the server with the tiny SD1 checkpoint loaded) and
``lora_dir`` (the server's ``--lora-dir``).

A run trains on the loaded tiny checkpoint and writes into the server's ``--lora-dir``; the host's
own built-in Lora extension then loads the file from a ``<lora:name:S>`` tag. So the key names,
the metadata and the file are checked by the code that users run, and every check compares real
images: the model after training gives the bytes it gave before, strength 0 gives the image
without the LoRA, strength 1 another one.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from safetensors import safe_open

from webui_host import SIZE, WebUI, hook_counts, pixels, txt2img_payload

TRAIN_PROMPTS = ["a black cat and a green frog", "a red bag and a yellow clock"]
# ss_base_model_version per test model: what files the LoRA under the model's version in the Lora tab.
BASE_MODEL_VERSIONS = {"sd1": "sd_v1", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
# A learning rate far above the paper's, so that a few steps move the tiny model's keys visibly.
FAST = {"steps": 4, "learning_rate": 0.05, "batch_size": 2, **SIZE}


def train_body(name: str, /, **changes) -> dict:
    return {"name": name, "prompts": TRAIN_PROMPTS, "objective": "separate_enhance", **FAST, **changes}


def lora_files(lora_dir: Path) -> list[str]:
    """Everything in the folder, temporary files included."""
    return sorted(path.name for path in lora_dir.iterdir()) if lora_dir.exists() else []


def assert_trained_lora_loads(server: WebUI, lora_dir: Path, name: str, model: str,
                              assert_all_keys_loaded: Callable[[str], None]) -> None:
    """Train keys and queries, then: the same image as before training (bytes), no hook left, a
    file with to_k and to_q keys and the model's version; ``<lora:name:1>`` changes the image, ``<lora:name:0>`` gives the
    image without it; ``assert_all_keys_loaded(file name)`` reads the host's log."""
    payload = txt2img_payload(**SIZE)
    before = server.txt2img(**payload)["images"][0]
    hooks_before = hook_counts(server)
    result = server.post("/ela/v1/train", train_body(name, projections=["to_k", "to_q"]))
    assert result["lora"] == name and result["steps"] == FAST["steps"]
    assert result["seconds"] > 0 and 0 < result["loss_first"] < 10 and 0 < result["loss_last"] < 10
    assert hook_counts(server) == hooks_before
    # Listed at once (the Lora extension re-read its folder), before any prompt names it.
    assert name in [lora["name"] for lora in server.get("/sdapi/v1/loras")]
    assert server.txt2img(**payload)["images"][0] == before

    path = lora_dir / f"{name}.safetensors"
    assert lora_files(lora_dir).count(path.name) == 1 and not [f for f in lora_files(lora_dir) if f.endswith(".tmp")]
    with safe_open(str(path), framework="pt") as file:
        keys, metadata = list(file.keys()), file.metadata()
    assert all(key.startswith("lora_unet_") for key in keys), keys
    assert {re.search(r"_attn2_(to_[kq])\.", key).group(1) for key in keys} == {"to_k", "to_q"}, keys
    assert metadata["ss_base_model_version"] == BASE_MODEL_VERSIONS[model]
    assert metadata["ss_output_name"] == name

    with_lora = server.txt2img(**{**payload, "prompt": f"{payload['prompt']} <lora:{name}:1>"})["images"][0]
    at_zero = server.txt2img(**{**payload, "prompt": f"{payload['prompt']} <lora:{name}:0>"})["images"][0]
    assert pixels(with_lora) != pixels(before)
    assert pixels(at_zero) == pixels(before)
    assert_all_keys_loaded(path.name)
    assert server.txt2img(**payload)["images"][0] == before


def test_training_interrupt_leaves_no_file_and_the_model_unchanged(training_host: WebUI, lora_dir: Path) -> None:
    """Interrupt (``POST /sdapi/v1/interrupt`` from another thread, as the UI's button) during a
    long run: the progress endpoint showed the run, a generation asked for meanwhile waited for the
    queue lock (and then gave the image of before), the answer is 409 with the reason, no file, no
    hook, and the model gives the image it gave before."""
    server = training_host
    payload = txt2img_payload(**SIZE)
    before = server.txt2img(**payload)["images"][0]
    hooks_before, files_before = hook_counts(server), lora_files(lora_dir)
    answer: dict = {}
    run = threading.Thread(target=lambda: answer.update(
        zip(("status", "body"), server.request("POST", "/ela/v1/train", train_body("interrupted", steps=100_000)))))
    run.start()
    progress = _wait_for_training_progress(server)
    queued: dict = {}
    generation = threading.Thread(target=lambda: queued.update(server.txt2img(**payload)))
    generation.start()
    generation.join(timeout=3)
    assert generation.is_alive() and run.is_alive(), "a generation ran beside training"
    server.post("/sdapi/v1/interrupt", {})
    run.join(timeout=300)
    generation.join(timeout=300)
    assert not run.is_alive(), "training did not stop on interrupt"
    assert queued["images"][0] == before
    assert answer["status"] == 409 and "interrupted" in answer["body"]["detail"], answer
    assert progress["state"]["job"] == "ela_train" and "ELA training: step" in progress["textinfo"]
    assert progress["state"]["sampling_steps"] == 100_000 and 0 < progress["progress"] < 1
    assert lora_files(lora_dir) == files_before
    assert hook_counts(server) == hooks_before
    assert server.txt2img(**payload)["images"][0] == before


def _wait_for_training_progress(server: WebUI) -> dict:
    """The WebUI's progress (what its progress bar polls) once training has taken two steps."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        progress = server.get("/sdapi/v1/progress?skip_current_image=true")
        if progress["state"]["sampling_step"] >= 2 and progress["state"]["job"] == "ela_train":
            return progress
        time.sleep(0.2)
    raise AssertionError("training never reported progress")


# (request changes, status, reason): bad input, and failures inside training (debug faults).
BAD_REQUESTS = [
    ({"prompts": ["a cat"]}, 422, "at least two entities"),
    ({"prompts": []}, 422, "no training prompts"),
    ({"entities": ["black cat | green frog"]}, 422, "1 entity specs for 2 prompts"),
    ({"entities": ["black cat | green frog", "red bag | blue car"]}, 422, "prompt 2"),
    ({"learning_rate": float("nan")}, 422, "learning_rate must be a positive number"),
    ({"steps": 0}, 422, "steps and batch_size must be at least 1"),
    ({"objective": "nope"}, 422, "objective 'nope' is not one of"),
    ({"projections": ["to_out"]}, 422, "projections ('to_out',) must be some of"),
    ({"name": "../outside"}, 422, "no folders"),
    ({"width": 100}, 422, "multiples of 8"),
    ({"preservation": 0.5}, 422, "needs preservation prompts"),
    ({"preservation": 0.5, "preservation_prompts": ["a cat " * 80]}, 422, "preservation prompt 1"),
    ({"prompts": ["a cat and a frog" + ", on a sunny day" * 20], "entities": ["cat | frog"]}, 422,
     "longer than 75 tokens"),
]
FAULTS = [("nan", 422, "non-finite training loss"), ("oom", 422, "out of memory")]


def assert_refused(server: WebUI, lora_dir: Path, body: dict, status: int, reason: str,
                   fault: str | None = None, request: dict | None = None) -> None:
    """``body`` (after arming ``fault`` for the run's second UNet call) answers ``status`` with
    ``reason``; no file is written, no hook left, the WebUI's job state is ended, and the model
    gives the image it gave before (``request``, default ``txt2img_payload`` at SIZE)."""
    payload = request or txt2img_payload(**SIZE)
    before = server.txt2img(**payload)["images"][0]
    hooks_before, files_before = hook_counts(server), lora_files(lora_dir)
    if fault is not None:
        server.post("/ela/v1/debug/fault", {"kind": fault, "step": 1})
    answer_status, answer = server.request("POST", "/ela/v1/train", body)
    assert answer_status == status and reason in answer["detail"], (answer_status, answer)
    assert_no_job_left(server)
    assert lora_files(lora_dir) == files_before
    assert hook_counts(server) == hooks_before
    assert server.txt2img(**payload)["images"][0] == before


def assert_no_job_left(server: WebUI) -> None:
    """The WebUI's job state as its progress bar reads it: no job, none counted, none interrupted."""
    state = server.get("/sdapi/v1/progress?skip_current_image=true")["state"]
    assert state["job"] == "" and state["job_count"] == 0 and not state["interrupted"], state


# What POST /ela/v1/train and the tab answer with an MM-DiT loaded, after "the loaded model is <family>".
MMDIT_REFUSAL = ("training supports SD 1.x / 2.x / SDXL UNets (their cross-attention key projections); "
                 "MM-DiT models are anchored at generation but not trained")


def assert_training_refused_on_an_mmdit(server: WebUI, lora_dir: Path, request: dict, family: str) -> None:
    """With an MM-DiT (``family`` as the message names it) loaded, training answers 409 saying
    what it supports, before any work: no file, no hook or replaced host function, the job state
    ended, and ``request`` gives the image it gave before."""
    assert_refused(server, lora_dir, train_body("on-an-mmdit"), 409, f"the loaded model is {family}: {MMDIT_REFUSAL}",
                   request=request)


def test_training_with_the_preservation_term(training_host: WebUI, lora_dir: Path) -> None:
    """S&E's preservation term runs the whole UNet twice per step (tuned and untuned) on the
    single-concept prompts: trains, writes the file, and the model gives the image it gave before."""
    payload = txt2img_payload(**SIZE)
    before = training_host.txt2img(**payload)["images"][0]
    result = training_host.post("/ela/v1/train", train_body("preserved", steps=2, preservation=0.5,
                                                           preservation_prompts=["a cat", "a green frog"]))
    assert result["steps"] == 2 and (lora_dir / "preserved.safetensors").is_file()
    assert training_host.txt2img(**payload)["images"][0] == before


@pytest.mark.parametrize("changes, status, reason", BAD_REQUESTS)
def test_training_bad_input_answers_with_the_reason(training_host, lora_dir, changes, status, reason):
    assert_refused(training_host, lora_dir, train_body("refused", **changes), status, reason)


@pytest.mark.parametrize("fault, status, reason", FAULTS)
def test_a_failing_training_run_answers_with_the_reason(training_host, lora_dir, fault, status, reason):
    assert_refused(training_host, lora_dir, train_body("failed"), status, reason, fault=fault)


def test_a_taken_lora_name_is_refused_unless_overwrite(training_host: WebUI, lora_dir: Path) -> None:
    """A second run under a taken name answers 409 and leaves the first file as it was;
    ``overwrite`` replaces it."""
    training_host.post("/ela/v1/train", train_body("taken", steps=1))
    first = (lora_dir / "taken.safetensors").read_bytes()
    assert_refused(training_host, lora_dir, train_body("taken", steps=1, seed=1), 409, "exists")
    assert (lora_dir / "taken.safetensors").read_bytes() == first
    training_host.post("/ela/v1/train", train_body("taken", steps=1, seed=1, overwrite=True))
    assert (lora_dir / "taken.safetensors").read_bytes() != first
