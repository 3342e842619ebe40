"""Fixtures that start the real WebUI (see webui_host.py); without ELA_WEBUI every test skips."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from webui_host import BASELINE_PAYLOADS, WebUI, checkout_linked, link_checkout, webui_root_or_skip


@pytest.fixture(scope="session")
def webui_root() -> Path:
    return webui_root_or_skip()


@pytest.fixture(scope="session")
def workdir():
    with tempfile.TemporaryDirectory(prefix="ela-webui-") as folder:
        yield Path(folder)


@pytest.fixture(scope="session")
def absent_images(webui_root, workdir):
    """Images from a host WITHOUT the extension for BASELINE_PAYLOADS, or None where the checkout is
    linked by someone else (then it cannot be absent). Requested by `host` so it runs first."""
    if checkout_linked(webui_root):
        return None
    server = WebUI(webui_root, workdir, "absent", {})
    try:
        return {name: server.txt2img(**payload)["images"][0] for name, payload in BASELINE_PAYLOADS.items()}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def host(webui_root, workdir, absent_images):
    """The WebUI with the extension linked, its UI built and its debug routes on (ELA_DEBUG=1)."""
    link = link_checkout(webui_root)
    try:
        server = WebUI(webui_root, workdir, "with-ela", {"ELA_DEBUG": "1"}, with_ui=True,
                       ready_path="/ela/v1/debug/hooks")
        try:
            yield server
        finally:
            server.stop()
    finally:
        if link is not None:
            link.unlink()
