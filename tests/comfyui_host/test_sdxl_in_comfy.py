"""SDXL through the node pack with ComfyUI's own classes (see sdxl_in_comfy.py): no server, no
SDXL text encoders (random conditioning), a small random UNet in SDXL's layout."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from comfy_host import CHECKOUT, comfy_root_or_skip


def test_sdxl_layout_and_pooled_conditioning_anchor():
    root = comfy_root_or_skip()
    result = subprocess.run([str(root / "venv" / "bin" / "python"), str(Path(__file__).with_name("sdxl_in_comfy.py")),
                             str(CHECKOUT)], cwd=root / "ComfyUI", capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(root / "ComfyUI"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    # SDXL's lowest-resolution up level with cross-attention: output_blocks 0-2 (ELA's up_lowest).
    assert found["layers"] == [f"output_blocks.{block}.1.transformer_blocks.0.attn2" for block in range(3)]
    # Both encoders (CLIP-G padding with 0, CLIP-L with the end id) place the words alike.
    assert found["columns"] == "cat 3 (black 2); frog 7 (green 6)"
    for sampler, run in found["samplers"].items():
        first, last = map(float, run["report"].split("first=")[1].split(";")[0].split("->"))
        assert run["report"].startswith("ELA log: steps=3;updates=15;") and last < first, (sampler, run["report"])
        assert run["changed"] > 0 and run["plain_again_identical"], (sampler, run)
    assert found["weights_restored"]
