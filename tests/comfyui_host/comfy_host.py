"""A real ComfyUI for the node pack's host tests, driven through its HTTP API.

``ELA_COMFY`` names a folder prepared by the project's ``comfy-host/setup.sh`` (``$ELA_COMFY/ComfyUI``
with the tiny SD1.5-shaped checkpoint, ``$ELA_COMFY/venv``). ``ComfyUI`` starts it with this checkout
linked into ``custom_nodes`` as the only custom node pack, and stops it. Without the variable every
test here skips and says why.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

CHECKOUT = Path(__file__).resolve().parents[2]
WORKFLOW = CHECKOUT / "ela_comfy" / "workflows" / "txt2img_api.json"
RUN_SH = Path(os.environ.get("ELA_COMFY_RUN_SH", CHECKOUT.parent / "shared" / "comfy-host" / "run.sh"))
PACK_NAME = "ela-node-pack-under-test"
CHECKPOINT = "tiny-sd15.safetensors"
ELA_NODE, REPORT_NODE, SAMPLER_NODE, SAVE_NODE, GRID_NODE = "5", "9", "6", "8", "10"
EMBEDDING_NAME = "ela-test-embedding"
SUMMARY = re.compile(r"ELA log: steps=(\d+);updates=(\d+);first=([\d.]+)->([\d.]+);last=([\d.]+)->([\d.]+)")


def comfy_root_or_skip() -> Path:
    root = os.environ.get("ELA_COMFY")
    if not root:
        pytest.skip("ELA_COMFY is not set: point it at a ComfyUI prepared by comfy-host/setup.sh to run these")
    path = Path(root)
    if not (path / "ComfyUI" / "main.py").exists() or not (path / "venv").exists():
        pytest.skip(f"ELA_COMFY={root} holds no prepared ComfyUI (ComfyUI/main.py and venv/)")
    if not (path / "ComfyUI" / "models" / "checkpoints" / CHECKPOINT).exists():
        pytest.skip(f"{CHECKPOINT} is not in {root}/ComfyUI/models/checkpoints")
    if not RUN_SH.exists():
        pytest.skip(f"{RUN_SH} not found: set ELA_COMFY_RUN_SH to the host's run.sh")
    return path


@contextlib.contextmanager
def write_embedding(root: Path):
    """A random two-vector CLIP-L embedding in the host's embeddings folder, removed afterwards."""
    path = root / "ComfyUI" / "models" / "embeddings" / f"{EMBEDDING_NAME}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.randn(2, 768, generator=torch.Generator().manual_seed(0))}, str(path))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


class ComfyUI:
    """The server on a free port with this checkout as its only custom node pack."""

    def __init__(self, root: Path, port: int = 8190):
        self.root, self.port = root, port
        self.log = root / f"comfyui-{port}.log"
        env = {**os.environ, "ROOT": str(root), "PORT": str(port), "NODES": str(CHECKOUT),
               "NODES_NAME": PACK_NAME, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(["bash", str(RUN_SH), "--disable-all-custom-nodes", "--whitelist-custom-nodes",
                                 PACK_NAME], env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"ComfyUI did not start: {result.stderr[-3000:]}")
        self.pid = int(result.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        try:
            os.kill(self.pid, 15)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def queue(self, prompt: dict) -> str:
        status, answer = self.request("POST", "/prompt", {"prompt": prompt, "client_id": "ela-tests"})
        assert status == 200, answer
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, history = self.request("GET", f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    (entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict) -> "Result":
        """Queue ``prompt`` with a unique SaveImage prefix (so nothing is served from the cache
        without running) and return its result."""
        prompt = copy.deepcopy(prompt)
        for node in prompt.values():
            if node["class_type"] == "SaveImage":
                node["inputs"]["filename_prefix"] = f"ela-test-{uuid.uuid4().hex[:8]}"
        entry = self.wait(self.queue(prompt))
        return Result(self, prompt, entry)

    def image(self, descriptor: dict) -> np.ndarray:
        query = urllib.parse.urlencode({"filename": descriptor["filename"], "subfolder": descriptor["subfolder"],
                                        "type": descriptor["type"]})
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/view?{query}", timeout=60) as response:
            return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))

    def free(self) -> None:
        """Unload models and drop the node cache, so the next prompt runs every node again."""
        self.request("POST", "/free", {"free_memory": True, "unload_models": True})
        time.sleep(1.5)


class Result:
    def __init__(self, server: ComfyUI, prompt: dict, entry: dict):
        self.server, self.prompt, self.entry = server, prompt, entry

    @property
    def ok(self) -> bool:
        return self.entry["status"].get("status_str") == "success"

    def pixels(self, node: str = SAVE_NODE) -> np.ndarray:
        assert self.ok, self.entry["status"]
        return self.server.image(self.entry["outputs"][node]["images"][0])

    def text(self, node: str = REPORT_NODE) -> str:
        assert self.ok, self.entry["status"]
        return "\n".join(self.entry["outputs"][node]["text"])

    def summary(self) -> tuple[int, int, float, float]:
        """(anchored steps, updates, first loss, last loss of the first anchored step)."""
        match = SUMMARY.search(self.text())
        assert match, self.text()
        return int(match[1]), int(match[2]), float(match[3]), float(match[4])

    def executed(self, node: str) -> bool:
        """Whether ``node`` ran in this prompt (not served from ComfyUI's cache)."""
        cached = [data["nodes"] for kind, data in self.entry["status"]["messages"] if kind == "execution_cached"]
        return not any(node in nodes for nodes in cached)


def workflow(sampler: str = "euler", steps: int = 8, seed: int = 42, size: int = 64, **ela) -> dict:
    """The repository's example workflow on the tiny checkpoint; ``ela`` changes the node's inputs."""
    prompt = json.loads(WORKFLOW.read_text())
    prompt["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    prompt["4"]["inputs"].update(width=size, height=size)
    prompt[SAMPLER_NODE]["inputs"].update(sampler_name=sampler, steps=steps, seed=seed)
    prompt[ELA_NODE]["inputs"].update(ela)
    return prompt


def without_ela(prompt: dict) -> dict:
    """The same workflow with the ELA nodes removed: the sampler takes the checkpoint's model."""
    plain = {key: copy.deepcopy(node) for key, node in prompt.items()
             if node["class_type"] not in ("ElaAnchoring", "ElaReport")
             and not any(isinstance(value, list) and value[0] == REPORT_NODE for value in node["inputs"].values())}
    plain[SAMPLER_NODE]["inputs"]["model"] = ["1", 0]
    return plain
