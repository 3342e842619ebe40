"""Fixtures that start the real WebUI (see webui_host.py); without ELA_WEBUI every test skips."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

# The checks shared in webui_host.py assert too: pytest explains their failures as it does a test's.
pytest.register_assert_rewrite("webui_host")

from webui_host import (BASELINES, WebUI, checkout_in_extensions, images_without_extension,  # noqa: E402
                        use_model, webui_root_or_skip, write_embedding)


@pytest.fixture(scope="session")
def webui_root() -> Path:
    return webui_root_or_skip()


@pytest.fixture(scope="session")
def workdir():
    with tempfile.TemporaryDirectory(prefix="ela-webui-") as folder:
        yield Path(folder)


@pytest.fixture(scope="session")
def absent_images(webui_root, workdir):
    """Images from a host WITHOUT the extension for BASELINES, or None where the checkout is
    linked by someone else (then it cannot be absent). Requested by `webui` so it runs first."""
    return images_without_extension(WebUI, webui_root, workdir, BASELINES)


@pytest.fixture(scope="session")
def webui(webui_root, workdir, absent_images):
    """The WebUI with the extension linked, its UI built and its debug routes on (ELA_DEBUG=1),
    reading embeddings from a folder of the tests' own that holds the test embedding."""
    embeddings = workdir / "embeddings"
    write_embedding(embeddings)
    with checkout_in_extensions(webui_root), WebUI(webui_root, workdir, "with-ela", {"ELA_DEBUG": "1"},
                                                   with_ui=True, ready_path="/ela/v1/debug/hooks",
                                                   extra_flags=("--embeddings-dir", str(embeddings))) as server:
        yield server


@pytest.fixture
def host(webui):
    """The WebUI with the tiny SD1 checkpoint loaded."""
    return use_model(webui, "sd1")


@pytest.fixture
def model_host(webui, request):
    """The WebUI with ``request.param``'s checkpoint loaded (parametrise with indirect=True over
    webui_host.CHECKPOINTS); skips where the host lacks it."""
    return use_model(webui, request.param)
