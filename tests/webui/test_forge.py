"""The extension inside the real Forge (lllyasviel/stable-diffusion-webui-forge), through its HTTP API.

Forge is not a package either: ``ELA_FORGE`` names a folder holding a Forge checkout in ``webui/``
(its ``repositories/`` in place, a checkpoint it can load in ``webui/models/Stable-diffusion/``)
and its venv in ``venv/``. Without it every test here skips and says why. The tiny random model
draws noise, so these check mechanics: off changes nothing, on anchors with a falling loss in
every sampler family while Forge samples under inference mode, the sampler continues from the
written latent, no hook outlives a generation, bad input and a failing grad pass degrade to "as
if off", and the weights ELA swaps for grad-capable copies give the same images.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ela_ext.config import ElaConfig

from webui_host import SCRIPT_TITLE, WebUI, _free_port, checkout_linked, decode_png, link_checkout, txt2img_payload

SAMPLERS = ["Euler a", "DPM++ 2M", "Heun", "DDIM", "PLMS", "UniPC"]
BASELINE_SAMPLERS = ["Euler a", "DPM++ 2M", "DDIM"]
SPEC = "black cat | green frog"
# 128 px: the tiny model's lowest up level is then 4x4, enough pixels for two entity masks.
SIZE = {"width": 128, "height": 128}
# Offline on CPU, full precision, API only; the first checkpoint in models/Stable-diffusion.
FORGE_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
               "--skip-python-version-check", "--no-download-sd-model", "--always-cpu", "--all-in-fp32", "--api",
               "--nowebui", "--server-name", "127.0.0.1", "--no-prompt-history"]


class Forge(WebUI):
    """A Forge process; the stdlib HTTP calls, readiness wait and stop are ``WebUI``'s."""

    def __init__(self, root: Path, workdir: Path, name: str, env: dict[str, str]):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        launch_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                      "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
                      "OMP_NUM_THREADS": "1", "COMMANDLINE_ARGS": "", **env}
        flags = [*FORGE_FLAGS, "--port", str(self.port), "--ui-settings-file", str(workdir / f"{name}-config.json"),
                 "--ui-config-file", str(workdir / f"{name}-ui-config.json")]
        with open(self.log, "w") as log:
            process = subprocess.Popen([str(root / "venv" / "bin" / "python"), "launch.py", *flags], cwd=root / "webui",
                                       env=launch_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = process.pid
        self._process = process
        try:
            self._wait_ready("/sdapi/v1/sd-models")
            # Forge loads the checkpoint at the first generation; the debug routes need it loaded.
            self.txt2img(**txt2img_payload("Euler a", steps=1))
        except BaseException:
            self.stop()
            raise

    def _alive(self) -> bool:
        return self._process.poll() is None  # our child: an exited one is a zombie until waited

    def stop(self) -> None:
        super().stop()
        self._process.wait(timeout=30)


def ela_args(**changes) -> dict:
    """``alwayson_scripts`` for ELA on; the window covers half of the 6 steps (3 anchored)."""
    config = ElaConfig(**{"enabled": True, "entities": SPEC, "window_end": 0.5, **changes})
    return {"alwayson_scripts": {SCRIPT_TITLE: {"args": config.as_args()}}}


def pixels(image_b64: str) -> list:
    return np.asarray(Image.open(io.BytesIO(decode_png(image_b64)))).tolist()


def infotext(result: dict, index: int = 0) -> str:
    return result["info"]["infotexts"][index]


@pytest.fixture(scope="module")
def forge_root() -> Path:
    root = os.environ.get("ELA_FORGE")
    if not root:
        pytest.skip("ELA_FORGE is not set: point it at a prepared Forge (webui/ and venv/) to run these")
    root_path = Path(root)
    if not (root_path / "webui" / "launch.py").is_file() or not (root_path / "webui" / "backend").is_dir() \
            or not (root_path / "venv" / "bin" / "python").is_file():
        pytest.skip(f"ELA_FORGE={root} holds no prepared Forge (webui/launch.py, webui/backend/, venv/)")
    return root_path


@pytest.fixture(scope="module")
def forge_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ela-forge")


@pytest.fixture(scope="module")
def absent_images(forge_root, forge_workdir):
    """Images from Forge WITHOUT the extension, or None where the checkout is linked by someone
    else (then it cannot be absent). Requested by ``forge`` so it runs first."""
    if checkout_linked(forge_root):
        return None
    server = Forge(forge_root, forge_workdir, "absent", {})
    try:
        return {sampler: server.txt2img(**txt2img_payload(sampler, **SIZE))["images"][0]
                for sampler in BASELINE_SAMPLERS}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def forge(forge_root, forge_workdir, absent_images):
    """Forge with the extension linked and its debug routes on (ELA_DEBUG=1)."""
    link = link_checkout(forge_root)
    try:
        server = Forge(forge_root, forge_workdir, "with-ela", {"ELA_DEBUG": "1"})
        try:
            yield server
        finally:
            server.stop()
    finally:
        if link is not None:
            link.unlink()


def hook_counts(forge) -> dict:
    return forge.get("/ela/v1/debug/hooks")["hooks"]


def test_the_script_is_loaded_by_forge(forge):
    names = [script["name"] for script in forge.get("/sdapi/v1/script-info")]
    assert SCRIPT_TITLE.lower() in names


@pytest.mark.parametrize("sampler", BASELINE_SAMPLERS)
def test_off_is_byte_identical_to_no_extension(forge, absent_images, sampler):
    payload = txt2img_payload(sampler, **SIZE)
    no_entry = forge.txt2img(**payload)
    disabled = forge.txt2img(**payload, alwayson_scripts={SCRIPT_TITLE: {"args": [False, SPEC]}})
    assert disabled["images"] == no_entry["images"]
    assert "ELA" not in infotext(no_entry) and "ELA" not in infotext(disabled)
    if absent_images is None:
        pytest.skip("the checkout was linked before the tests started: no extension-free baseline")
    assert no_entry["images"][0] == absent_images[sampler]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_on_changes_the_image_and_the_loss_falls(forge, sampler):
    payload = txt2img_payload(sampler, **SIZE)
    hooks_before = hook_counts(forge)
    off = forge.txt2img(**payload)
    on = forge.txt2img(**payload, **ela_args())
    assert hook_counts(forge) == hooks_before
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    assert f"ELA: entities={SPEC};" in infotext(on) and "ELA warnings" not in infotext(on)
    debug = forge.get("/ela/v1/debug/calls")
    steps = debug["steps"]
    assert [log["step"] for log in steps] == [0, 1, 2], steps
    for log in steps:
        assert log["updates"] >= 1 and log["losses"][-1] < log["losses"][0], log
    anchored_calls = [call for call in debug["calls"] if call["x_anchored"] is not None]
    assert len(anchored_calls) == 3 and all(call["step"] is not None for call in anchored_calls)


def _relative_residual(target: np.ndarray, regressors: list[np.ndarray]) -> float:
    design = np.stack(regressors, axis=1)
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(np.linalg.norm(design @ coefficients - target) / np.linalg.norm(target))


@pytest.mark.parametrize("sampler, history", [("Euler", 0), ("DDIM", 0), ("DPM++ 2M", 1)])
def test_sampler_continues_from_the_anchored_latent(forge, sampler, history):
    """As in test_webui.py: the sampler's next latent is affine in the ANCHORED latent and the
    outputs, not in the latent it passed in, so the write reached Forge's sampler state."""
    forge.txt2img(**txt2img_payload(sampler, **SIZE), **ela_args())
    calls = forge.get("/ela/v1/debug/calls")["calls"]
    checked = 0
    for k, call in enumerate(calls[:-1]):
        if call["x_anchored"] is None or k < history:
            continue
        outputs = [np.asarray(calls[k - h]["output"][0]) for h in range(history + 1)]
        following = np.asarray(calls[k + 1]["x_in"][0])
        assert _relative_residual(following, [np.asarray(call["x_anchored"][0]), *outputs]) < 1e-4
        assert _relative_residual(following, [np.asarray(call["x_in"][0]), *outputs]) > 1e-3
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("args, warning", [
    (ela_args(entities="dog | cat"), "not found in the prompt: 'dog'"),
    (ela_args(entities="cat"), "needs at least two entities"),
])
def test_bad_entity_warns_and_gives_the_baseline_image(forge, args, warning):
    payload = txt2img_payload("Euler a", **SIZE)
    hooks_before = hook_counts(forge)
    off = forge.txt2img(**payload)
    failed = forge.txt2img(**payload, **args)
    assert hook_counts(forge) == hooks_before
    assert warning in infotext(failed)
    assert pixels(failed["images"][0]) == pixels(off["images"][0])


def test_grad_pass_failure_generates_as_if_off(forge):
    payload = txt2img_payload("Euler a", **SIZE)
    off = forge.txt2img(**payload)
    forge.post("/ela/v1/debug/fault", {"kind": "error", "step": 0})
    failed = forge.txt2img(**payload, **ela_args())
    assert ("anchoring stopped at step 1, image continues unanchored: RuntimeError: grad pass failed (injected)"
            in infotext(failed))
    assert pixels(failed["images"][0]) == pixels(off["images"][0])


def test_weights_made_grad_capable_give_the_same_images(forge, absent_images):
    """ELA replaces Forge's inference-tensor UNet weights by normal copies: off must still be
    byte-identical afterwards, and on must repeat itself."""
    payload = txt2img_payload("Euler a", **SIZE)
    on = forge.txt2img(**payload, **ela_args())
    off_after = forge.txt2img(**payload)
    assert forge.txt2img(**payload, **ela_args())["images"] == on["images"]
    if absent_images is None:
        pytest.skip("the checkout was linked before the tests started: no extension-free baseline")
    assert off_after["images"][0] == absent_images["Euler a"]


def test_batch_and_hires_anchor_every_image(forge):
    batch = forge.txt2img(**txt2img_payload("Euler a", batch_size=2, n_iter=2, **SIZE), **ela_args())
    assert len(batch["images"]) == 4
    assert all("ELA log: steps=3;" in text for text in batch["info"]["infotexts"])
    # Forge's API fails a hires request without hr_additional_modules (TypeError on None).
    hires = forge.txt2img(**txt2img_payload("DPM++ 2M", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                                            denoising_strength=0.6, hr_additional_modules=["Use same choices"],
                                            **SIZE), **ela_args())
    assert "ELA log: steps=3;" in infotext(hires) and "ELA warnings" not in infotext(hires)
    # The hires pass anchors too: its sessions follow the first pass's in the debug log.
    assert len(forge.get("/ela/v1/debug/calls")["steps"]) > 3
