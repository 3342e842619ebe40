"""A real AUTOMATIC1111 WebUI driven through its HTTP API (as sd-webui-controlnet's tests/web_api do).

The WebUI is not a package: ``ELA_WEBUI`` names a folder prepared by the project's
``real-host/setup.sh`` (``$ELA_WEBUI/webui`` with its ``run.sh`` flags, ``$ELA_WEBUI/venv``). The
fixtures in conftest.py link this checkout into its ``extensions/``, start it on a free port, wait for the API and
stop it; the link is removed afterwards. Without the variable every test here skips and says why,
which is what CI sees. Only the standard library talks to the server, so this runs from the
project's own venv while the server runs in the host's.

The second half holds what test_webui.py (A1111) and test_forge.py (Forge) both check, so the two
hosts are held to the same assertions: off changes nothing, on anchors with a falling loss, the
sampler continues from the written latent, bad input gives the off image and leaves no hook.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ela_ext.config import ElaConfig

CHECKOUT = Path(__file__).resolve().parents[2]
SCRIPT_TITLE = "Entity Anchoring (ELA)"
# run.sh prepares the flags the WebUI needs offline on CPU; it lives beside setup.sh.
RUN_SH = Path(os.environ.get("ELA_WEBUI_RUN_SH", CHECKOUT.parent / "shared" / "real-host" / "run.sh"))
START_TIMEOUT_S = 180


def webui_root_or_skip() -> Path:
    root = os.environ.get("ELA_WEBUI")
    if not root:
        pytest.skip("ELA_WEBUI is not set: point it at a WebUI prepared by real-host/setup.sh to run these")
    root_path = Path(root)
    if not (root_path / "webui" / "launch.py").is_file() or not (root_path / "venv").is_dir():
        pytest.skip(f"ELA_WEBUI={root} holds no prepared WebUI (webui/launch.py and venv/)")
    if not RUN_SH.is_file():
        pytest.skip(f"{RUN_SH} not found: set ELA_WEBUI_RUN_SH to the host's run.sh")
    return root_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebUI:
    """One running WebUI process and the stdlib HTTP calls the tests make to it."""

    def __init__(self, root: Path, workdir: Path, name: str, env: dict[str, str], with_ui: bool = False,
                 ready_path: str = "/sdapi/v1/sd-models", extra_flags: tuple[str, ...] = ()):
        """Start it; ``with_ui`` builds the Gradio UI too (needed for infotext paste fields);
        ``extra_flags`` are more WebUI flags (an attention backend, an embeddings folder).

        With the UI the server answers (404) before the API routes exist, and extensions' routes
        come last (``on_app_started``): it is ready once GET ``ready_path`` answers 200.

        Settings, UI config and the log go to ``workdir`` and prompt history is off, so the
        prepared WebUI folder is left as it was.
        """
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.checkpoint: str | None = None  # the one use_model last loaded (None: the start one)
        launch_env = {**os.environ, "ROOT": str(root), "PORT": str(self.port), "LOG": str(self.log),
                      "OMP_NUM_THREADS": "1", **env}
        flags = ["--ui-settings-file", str(workdir / f"{name}-config.json"),
                 "--ui-config-file", str(workdir / f"{name}-ui-config.json"), "--no-prompt-history", *extra_flags]
        started = subprocess.run(["bash", str(RUN_SH), *flags, *([] if with_ui else ["--nowebui"])],
                                 env=launch_env, capture_output=True, text=True, check=True)
        self.pid = int(started.stdout.strip().splitlines()[-1])
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> WebUI:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _wait_ready(self, ready_path: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self._alive():
                raise RuntimeError(f"WebUI exited during start:\n{self.log_tail()}")
            try:
                if self.request("GET", ready_path)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"WebUI API not ready after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if not self._alive():
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._alive():
            os.kill(self.pid, signal.SIGKILL)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def get(self, path: str) -> dict:
        status, payload = self.request("GET", path)
        assert status == 200, (path, status, payload)
        return payload

    def post(self, path: str, body: dict) -> dict:
        status, payload = self.request("POST", path, body)
        assert status == 200, (path, status, payload, self.log_tail())
        return payload

    def txt2img(self, **fields) -> dict:
        result = self.post("/sdapi/v1/txt2img", fields)
        result["info"] = json.loads(result["info"])
        return result

    def img2img(self, **fields) -> dict:
        result = self.post("/sdapi/v1/img2img", fields)
        result["info"] = json.loads(result["info"])
        return result

    def png_info(self, image_b64: str) -> dict:
        return self.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + image_b64})

    def has_checkpoint(self, checkpoint: str) -> bool:
        return any(Path(model["filename"]).name == checkpoint for model in self.get("/sdapi/v1/sd-models"))

    def load_checkpoint(self, checkpoint: str) -> None:
        """Switch the model as a user does (A1111 loads it at once)."""
        self.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoint})


# The tiny checkpoints the prepared hosts hold (real-host/setup.sh: all three; forge-host: sd1 and
# sdxl), by the name the tests use. The first is what a host starts with.
CHECKPOINTS = {"sd1": "tiny-sd1.safetensors", "sd2-v": "tiny-sd2-v.safetensors", "sdxl": "tiny-sdxl.safetensors"}


def use_model(server: WebUI, model: str) -> WebUI:
    """``server`` with ``model``'s checkpoint loaded (POST /sdapi/v1/options, as a user switches);
    skips, saying so, where the host was prepared without it."""
    checkpoint = CHECKPOINTS[model]
    if server.checkpoint != checkpoint:
        if not server.has_checkpoint(checkpoint):
            pytest.skip(f"{checkpoint} is not in {server.root}/webui/models/Stable-diffusion: "
                        f"prepare the host with the current setup.sh to run the {model} tests")
        server.load_checkpoint(checkpoint)
        server.checkpoint = checkpoint
    return server


# A textual-inversion embedding for the tiny SD1 checkpoint (CLIP width 64), made by the tests in
# the folder the test host reads embeddings from (--embeddings-dir): three vectors under one name.
EMBEDDING_NAME = "elafrogemb"
EMBEDDING_VECTORS = 3
TINY_SD1_CLIP_WIDTH = 64


def write_embedding(folder: Path, name: str = EMBEDDING_NAME, vectors: int = EMBEDDING_VECTORS,
                    width: int = TINY_SD1_CLIP_WIDTH) -> Path:
    """A one-tensor ``.safetensors`` embedding, a format the WebUI loads (its safe unpickler
    refuses the ``.pt`` files current torch writes: they hold a ``.format_version`` entry)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    generator = torch.Generator().manual_seed(7)
    save_file({"emb_params": torch.randn(vectors, width, generator=generator) * 0.3}, str(path))
    return path


def link_checkout(root: Path) -> Path | None:
    """Link the checkout into extensions/; None when it is already there (then it is left alone)."""
    extensions = root / "webui" / "extensions"
    for entry in extensions.iterdir():
        if entry.resolve() == CHECKOUT:
            return None
    link = extensions / "ela-under-test"
    link.symlink_to(CHECKOUT, target_is_directory=True)
    return link


def checkout_linked(root: Path) -> bool:
    return any(entry.resolve() == CHECKOUT for entry in (root / "webui" / "extensions").iterdir())


@contextlib.contextmanager
def checkout_in_extensions(root: Path) -> Iterator[None]:
    """The checkout linked into ``root``'s extensions/ for the block; a link made here is removed
    afterwards, one made by someone else is left alone."""
    link = link_checkout(root)
    try:
        yield
    finally:
        if link is not None:
            link.unlink()


def images_without_extension(host_class: type[WebUI], root: Path, workdir: Path,
                             baselines: dict[str, tuple[str, dict]]) -> dict[str, str] | None:
    """The first image of each ``(model, payload)`` (same keys) from a host WITHOUT the extension,
    started as ``host_class`` under the name "absent", for the models the host has; None where the
    checkout is linked by someone else (then it cannot be absent). What ``absent_images`` returns."""
    if checkout_linked(root):
        return None
    images = {}
    with host_class(root, workdir, "absent", {}) as server:
        for name, (model, payload) in baselines.items():
            if server.has_checkpoint(CHECKPOINTS[model]):
                images[name] = use_model(server, model).txt2img(**payload)["images"][0]
    return images


def absent_image_or_skip(absent_images: dict[str, str] | None, name: str) -> str:
    """The extension-free image for baseline ``name``; skips where there is none to compare with."""
    if absent_images is None:
        pytest.skip("the checkout was linked before the tests started: no extension-free baseline")
    if name not in absent_images:
        pytest.skip(f"the host has no checkpoint for baseline {name!r}")
    return absent_images[name]


def txt2img_payload(sampler: str = "Euler a", **fields) -> dict:
    """A small, fast generation: the tiny host model draws noise, so this checks mechanics only."""
    return {"prompt": "a black cat and a green frog", "negative_prompt": "", "seed": 1234,
            "sampler_name": sampler, "steps": 6, "width": 64, "height": 64, "cfg_scale": 7, **fields}


def baselines(samplers: dict[str, tuple[str, ...]], **fields) -> dict[str, tuple[str, dict]]:
    """``{"model/sampler": (model, payload)}``: what a host without the extension generates once
    and the host with it must repeat byte for byte when ELA is off."""
    return {f"{model}/{sampler}": (model, txt2img_payload(sampler, **fields))
            for model, names in samplers.items() for sampler in names}


BASELINES = baselines({"sd1": ("Euler a", "DDIM", "Heun"), "sd2-v": ("Euler a", "DDIM"), "sdxl": ("Euler a", "DDIM")})


def decode_png(image_b64: str) -> bytes:
    return base64.b64decode(image_b64.split(",", 1)[-1])


def decode_image(image_b64: str) -> Image.Image:
    return Image.open(io.BytesIO(decode_png(image_b64)))


# What test_webui.py and test_forge.py both check, on either host (``server`` is a started WebUI or Forge).

SAMPLERS = ["Euler a", "DPM++ 2M", "Heun", "DDIM", "PLMS", "UniPC"]
# (sampler, history): how many earlier outputs besides this call's its next latent depends on.
SAMPLER_HISTORIES = [("Euler", 0), ("DDIM", 0), ("DPM++ 2M", 1)]
SPEC = "black cat | green frog"
# 128 px: the tiny model's lowest up level is then 4x4, enough pixels for two entity masks.
SIZE = {"width": 128, "height": 128}


def ela_args(**changes) -> dict:
    """``alwayson_scripts`` for ELA on; the window covers half of the 6 steps (3 anchored)."""
    config = ElaConfig(**{"enabled": True, "entities": SPEC, "window_end": 0.5, **changes})
    return {"alwayson_scripts": {SCRIPT_TITLE: {"args": config.as_args()}}}


XYZ_SCRIPT = "x/y/z plot"


def xyz_axis(server, label: str, img2img: bool = False) -> int:
    """The axis type index the X/Y/Z plot's API takes, as /sdapi/v1/script-info lists its axes."""
    (script,) = [script for script in server.get("/sdapi/v1/script-info")
                 if script["name"] == XYZ_SCRIPT and script["is_img2img"] == img2img]
    return script["args"][0]["choices"].index(label)


def xyz_args(x: tuple[int, str, list], y: tuple[int, str, list] = (0, "", [])) -> dict:
    """``script_args`` of the X/Y/Z plot: each axis (type index, typed values, dropdown values);
    legend on, each cell's own image returned after the grid, seeds kept."""
    return {"script_name": XYZ_SCRIPT,
            "script_args": [*x, *y, 0, "", [], True, True, False, False, False, False, False, 0, False]}


def xyz_cells(result: dict) -> list[tuple[str, str]]:
    """(image, infotext) of each cell: the response holds the grid first, then the cells."""
    return list(zip(result["images"][1:], result["info"]["infotexts"][1:]))


def pixels(image_b64: str) -> list:
    """The decoded pixels as nested lists, so ``==`` compares them all. Not the PNG bytes: those
    also hold the infotext, which has the ELA keys when ELA was asked for."""
    return np.asarray(decode_image(image_b64)).tolist()


def infotext(result: dict, index: int = 0) -> str:
    return result["info"]["infotexts"][index]


def hook_counts(server: WebUI) -> dict:
    """The live ELA hooks by kind (debug route): the same before and after any generation."""
    return server.get("/ela/v1/debug/hooks")["hooks"]


def relative_residual(target: np.ndarray, regressors: list[np.ndarray]) -> float:
    """How far ``target`` is from the best linear combination of ``regressors`` (per image row)."""
    design = np.stack(regressors, axis=1)
    coefficients, *_ = np.linalg.lstsq(design, target, rcond=None)
    return float(np.linalg.norm(design @ coefficients - target) / np.linalg.norm(target))


def assert_off_is_byte_identical_to_no_extension(server: WebUI, payload: dict,
                                                 absent_images: dict[str, str] | None, name: str) -> None:
    """No ELA entry and ELA sent disabled give the same bytes and no ELA key in the infotext, and
    the same bytes as the host without the extension gave for ``absent_images[name]``."""
    no_entry = server.txt2img(**payload)
    disabled = server.txt2img(**payload, alwayson_scripts={SCRIPT_TITLE: {"args": [False, SPEC]}})
    assert disabled["images"] == no_entry["images"]
    assert "ELA" not in infotext(no_entry) and "ELA" not in infotext(disabled)
    assert no_entry["images"][0] == absent_image_or_skip(absent_images, name)


def assert_on_changes_the_image_and_the_loss_falls(server: WebUI, sampler: str, **changes) -> None:
    """ELA on changes the pixels, says so in the infotext, leaves no hook, and anchors steps 0-2
    (the window) with at least one update each and a falling loss. Warnings may report mask
    fallbacks (the tiny random host model's start-of-text map is no background), never that
    anchoring stopped or left the image unanchored. ``changes``: ELA settings other than the defaults."""
    payload = txt2img_payload(sampler, **SIZE)
    hooks_before = hook_counts(server)
    off = server.txt2img(**payload)
    on = server.txt2img(**payload, **ela_args(**changes))
    assert hook_counts(server) == hooks_before
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    assert f"ELA: entities={SPEC};" in infotext(on)
    assert "anchoring stopped" not in infotext(on) and "unanchored" not in infotext(on)
    debug = server.get("/ela/v1/debug/calls")
    steps = debug["steps"]
    assert [log["step"] for log in steps] == [0, 1, 2], steps
    for log in steps:
        assert log["updates"] >= 1 and log["losses"][-1] < log["losses"][0], log
    anchored_calls = [call for call in debug["calls"] if call["x_anchored"] is not None]
    assert len(anchored_calls) == 3 and all(call["step"] is not None for call in anchored_calls)


def assert_sampler_continues_from_the_anchored_latent(server: WebUI, sampler: str, history: int,
                                                      request: dict | None = None) -> None:
    """The sampler's next latent is an affine function of its current latent and this call's (and,
    for a multistep sampler, the last ``history`` calls') outputs. It must fit the ANCHORED latent,
    not the one the sampler passed in: that shows the write reached the sampler's own state, not
    only the UNet. ``request``: the generation (default: ``txt2img_payload(sampler)`` at SIZE). The
    objective is Separate-and-Enhance's on every model: on the tiny random Flux the MM-DiT default's
    (``attend_excite_paper``) moves the latent too little to tell the two apart."""
    server.txt2img(**(request or txt2img_payload(sampler, **SIZE)), **ela_args(objective="separate_enhance"))
    calls = server.get("/ela/v1/debug/calls")["calls"]
    checked = 0
    for k, call in enumerate(calls[:-1]):
        if call["x_anchored"] is None or k < history:
            continue
        outputs = [np.asarray(calls[k - h]["output"][0]) for h in range(history + 1)]
        following = np.asarray(calls[k + 1]["x_in"][0])
        anchored = np.asarray(call["x_anchored"][0])
        passed_in = np.asarray(call["x_in"][0])
        assert relative_residual(following, [anchored, *outputs]) < 1e-4
        assert relative_residual(following, [passed_in, *outputs]) > 1e-3
        checked += 1
    assert checked >= 2


def assert_bad_input_gives_the_off_image(server: WebUI, payload: dict, args: dict, warning: str) -> dict:
    """Generating ``payload`` with the bad ELA ``args`` warns ``warning`` in the infotext, leaves no
    hook and gives the pixels of ELA off; returns the off result for further checks."""
    hooks_before = hook_counts(server)
    off = server.txt2img(**payload)
    failed = server.txt2img(**payload, **args)
    assert hook_counts(server) == hooks_before
    assert warning in infotext(failed)
    assert pixels(failed["images"][0]) == pixels(off["images"][0])
    return off


def sampling_passes(calls: list[dict]) -> list[list[int]]:
    """The sampling steps each pass of the last ELA generation evaluated (debug calls: a pass's
    first evaluations count 0, 1, 2, ...; a hires pass starts again at 0)."""
    passes: list[list[int]] = []
    for call in calls:
        if call["step"] == 0 and (not passes or 0 in passes[-1]):
            passes.append([])
        if call["step"] is not None and passes:
            passes[-1].append(call["step"])
    return [sorted(set(steps)) for steps in passes]


def window_steps(steps_run: int, window_end: float = 0.5) -> list[int]:
    """The steps a window [0, window_end) anchors out of the ``steps_run`` a pass ran."""
    return [step for step in range(steps_run) if step / steps_run < window_end]


def assert_every_step_anchored_with_a_falling_loss(server: WebUI, expected_steps: list[int]) -> None:
    steps = server.get("/ela/v1/debug/calls")["steps"]
    assert [log["step"] for log in steps] == expected_steps, steps
    for log in steps:
        assert log["updates"] >= 1 and log["losses"][-1] < log["losses"][0], log


def assert_no_failure(text: str) -> None:
    assert "anchoring stopped" not in text and "unanchored" not in text, text


def mask_png(width: int, height: int) -> str:
    """An inpainting mask (base64 PNG): the left half white (repainted), the right half kept."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def assert_hires_and_img2img_anchor(server: WebUI, sampler: str, **hires_fields) -> None:
    """Hires fix anchors both passes, each over its own window, and ``ELA log`` reports both (the
    hires pass as ``hires_`` keys). img2img at strength 0.5 runs only the end of the schedule and
    the window counts over the steps it ran. Inpainting anchors the masked half and leaves the
    kept half exactly as the WebUI does with ELA off."""
    hires = server.txt2img(**txt2img_payload(sampler, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                                             denoising_strength=0.6, hr_second_pass_steps=4, **hires_fields,
                                             **SIZE), **ela_args())
    first_pass, hires_pass = sampling_passes(server.get("/ela/v1/debug/calls")["calls"])
    assert len(first_pass) == 6 and 0 < len(hires_pass) <= 4
    expected = window_steps(len(first_pass)) + window_steps(len(hires_pass))
    assert_every_step_anchored_with_a_falling_loss(server, expected)
    text = infotext(hires)
    assert "ELA log: steps=3;" in text and f";hires_steps={len(window_steps(len(hires_pass)))};" in text, text
    assert_no_failure(text)

    init = server.txt2img(**txt2img_payload(sampler, **SIZE))["images"][0]
    img2img = {**txt2img_payload(sampler, **SIZE), "init_images": [init], "denoising_strength": 0.5}
    anchored = server.img2img(**img2img, **ela_args())
    (steps_run,) = sampling_passes(server.get("/ela/v1/debug/calls")["calls"])
    assert 0 < len(steps_run) < 6
    assert_every_step_anchored_with_a_falling_loss(server, window_steps(len(steps_run)))
    assert f"ELA log: steps={len(window_steps(len(steps_run)))};" in infotext(anchored)
    assert_no_failure(infotext(anchored))

    inpaint = {**img2img, "mask": mask_png(SIZE["width"], SIZE["height"]), "mask_blur": 0, "inpainting_fill": 1,
               "inpaint_full_res": False, "denoising_strength": 0.75}
    off = np.asarray(decode_image(server.img2img(**inpaint)["images"][0]))
    on_result = server.img2img(**inpaint, **ela_args())
    on = np.asarray(decode_image(on_result["images"][0]))
    assert "ELA log: steps=" in infotext(on_result) and "ELA log: steps=0" not in infotext(on_result)
    kept = slice(SIZE["width"] // 2, None)
    assert np.array_equal(on[:, kept], off[:, kept])
    assert not np.array_equal(on[:, : SIZE["width"] // 2], off[:, : SIZE["width"] // 2])
