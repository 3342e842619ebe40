"""Fixtures that start the real ComfyUI (see comfy_host.py); without ELA_COMFY every test skips."""

from __future__ import annotations

import pytest

# The helpers in comfy_host.py assert too: pytest explains their failures as it does a test's.
pytest.register_assert_rewrite("comfy_host")

from comfy_host import ComfyUI, comfy_root_or_skip, write_embedding  # noqa: E402


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI with this checkout as its only custom node pack and the tests' embedding."""
    root = comfy_root_or_skip()
    with write_embedding(root):
        server = ComfyUI(root)
        try:
            yield server
        finally:
            server.stop()
