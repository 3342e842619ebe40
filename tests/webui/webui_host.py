"""A real AUTOMATIC1111 WebUI driven through its HTTP API (as sd-webui-controlnet's tests/web_api do).

The WebUI is not a package: ``ELA_WEBUI`` names a folder prepared by the project's
``real-host/setup.sh`` (``$ELA_WEBUI/webui`` with its ``run.sh`` flags, ``$ELA_WEBUI/venv``). The
fixtures in conftest.py link this checkout into its ``extensions/``, start it on a free port, wait for the API and
stop it; the link is removed afterwards. Without the variable every test here skips and says why,
which is what CI sees. Only the standard library talks to the server, so this runs from the
project's own venv while the server runs in the host's.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

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
                 ready_path: str = "/sdapi/v1/sd-models"):
        """Start it; ``with_ui`` builds the Gradio UI too (needed for infotext paste fields).

        With the UI the server answers (404) before the API routes exist, and extensions' routes
        come last (``on_app_started``): it is ready once GET ``ready_path`` answers 200.

        Settings, UI config and the log go to ``workdir`` and prompt history is off, so the
        prepared WebUI folder is left as it was.
        """
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        launch_env = {**os.environ, "ROOT": str(root), "PORT": str(self.port), "LOG": str(self.log),
                      "OMP_NUM_THREADS": "1", **env}
        flags = ["--ui-settings-file", str(workdir / f"{name}-config.json"),
                 "--ui-config-file", str(workdir / f"{name}-ui-config.json"), "--no-prompt-history"]
        started = subprocess.run(["bash", str(RUN_SH), *flags, *([] if with_ui else ["--nowebui"])],
                                 env=launch_env, capture_output=True, text=True, check=True)
        self.pid = int(started.stdout.strip().splitlines()[-1])
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.stop()
            raise

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

    def png_info(self, image_b64: str) -> dict:
        return self.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + image_b64})


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


def txt2img_payload(sampler: str = "Euler a", **fields) -> dict:
    """A small, fast generation: the tiny host model draws noise, so this checks mechanics only."""
    return {"prompt": "a black cat and a green frog", "negative_prompt": "", "seed": 1234,
            "sampler_name": sampler, "steps": 6, "width": 64, "height": 64, "cfg_scale": 7, **fields}


# Generated once by a host without the extension; `host` must give the same bytes when ELA is off.
BASELINE_PAYLOADS = {sampler: txt2img_payload(sampler) for sampler in ("Euler a", "DDIM", "Heun")}


def decode_png(image_b64: str) -> bytes:
    return base64.b64decode(image_b64.split(",", 1)[-1])
