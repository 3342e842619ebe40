"""SD3.5 and Flux (MM-DiT) in the real Forge (``ELA_FORGE``), through its HTTP API.

The host is the one ``forge-host/setup.sh`` prepares, with the tiny random SD3.5 and Flux of
``shared/webui-mmdit/make_tiny_forge_{sd35,flux}.py`` added: their checkpoints and the fixture
extension ``forge-tiny-dit`` (Forge detects a model family by its full-size configs; the fixture
adds detection classes that match only the tiny weights), linked into ``webui/extensions`` for
the module's servers and removed afterwards. Without them every test here skips and says what is
missing. Forge's "Automatic" schedule ends these models' sigmas in two zeros (NaN latents), so the
requests ask for "Simple", as Forge's own Flux preset does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from mmdit_checks import (assert_no_function_replaced, assert_off_is_the_image_without_the_extension,
                          assert_plain_with_a_message, payload, require_files)
from test_forge import Forge
from webui_host import SPEC, checkout_in_extensions, checkout_linked

MODELS = {"sd35": "tiny-sd35.safetensors", "flux": "tiny-flux.safetensors"}
FIXTURE = "forge-tiny-dit"
REQUIRED = [f"webui/models/Stable-diffusion/{name}" for name in MODELS.values()] + [f"{FIXTURE}/scripts"]
# Flux dev is guidance-distilled: one pass per step (cfg 1), Forge's distilled guidance 3.5.
FIELDS = {"sd35": {"scheduler": "Simple"}, "flux": {"scheduler": "Simple", "cfg_scale": 1}}
BASELINES = {f"{model}/{sampler}": (model, payload(sampler_name=sampler, **FIELDS[model]))
             for model in MODELS for sampler in ("Euler", "DPM++ 2M")}
UNANCHORED = {"sd35": "ELA cannot anchor SD3 / SD3.5 (MM-DiT) models yet: generated without ELA",
              "flux": "ELA cannot anchor Flux (MM-DiT) models yet: generated without ELA"}


@pytest.fixture(scope="module")
def dit_root() -> Path:
    import os

    root = os.environ.get("ELA_FORGE")
    if not root:
        pytest.skip("ELA_FORGE is not set: point it at a prepared Forge (webui/ and venv/) to run these")
    require_files(Path(root), REQUIRED, "run shared/webui-mmdit/make_tiny_forge_sd35.py and make_tiny_forge_flux.py "
                                        "(FORGE_ROOT=<forge host>) to run the SD3.5 and Flux tests")
    return Path(root)


@contextlib.contextmanager
def fixture_linked(root: Path):
    """The tiny-model detection fixture in ``webui/extensions`` for the block (left alone if there)."""
    link = root / "webui" / "extensions" / FIXTURE
    made = not link.exists()
    if made:
        link.symlink_to(root / FIXTURE, target_is_directory=True)
    try:
        yield
    finally:
        if made:
            link.unlink()


def start(root: Path, workdir: Path, name: str, env: dict[str, str]) -> Forge:
    return Forge(root, workdir, name, env, ("--ckpt", str(root / "webui" / "models" / "Stable-diffusion" / MODELS["sd35"])))


def use(server: Forge, model: str) -> Forge:
    if server.checkpoint != MODELS[model]:
        server.load_checkpoint(MODELS[model])
        server.checkpoint = MODELS[model]
    return server


@pytest.fixture(scope="module")
def dit_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ela-forge-dit")


@pytest.fixture(scope="module")
def dit_absent(dit_root, dit_workdir):
    if checkout_linked(dit_root):
        return None
    with fixture_linked(dit_root), start(dit_root, dit_workdir, "dit-absent", {}) as server:
        return {name: use(server, model).txt2img(**request)["images"][0] for name, (model, request) in BASELINES.items()}


@pytest.fixture(scope="module")
def dit_forge(dit_root, dit_workdir, dit_absent):
    with fixture_linked(dit_root), checkout_in_extensions(dit_root), \
            start(dit_root, dit_workdir, "dit-with-ela", {"ELA_DEBUG": "1"}) as server:
        yield server


@pytest.mark.parametrize("name", list(BASELINES))
def test_dit_off_is_byte_identical_to_no_extension(dit_forge, dit_absent, name):
    if dit_absent is None:
        pytest.skip("the checkout was linked before the tests started: no extension-free baseline")
    model, request = BASELINES[name]
    assert_off_is_the_image_without_the_extension(use(dit_forge, model), request, dit_absent[name])


@pytest.mark.parametrize("model", list(MODELS))
def test_dit_on_is_plain_with_a_message(dit_forge, model):
    server = use(dit_forge, model)
    assert_plain_with_a_message(server, payload(**FIELDS[model]), UNANCHORED[model])
    assert_no_function_replaced(server)


def test_sd35_token_route_reads_the_clip_columns(dit_forge):
    """SD3.5's context starts with Forge's CLIP-L/G chunks (77 columns each)."""
    answer = use(dit_forge, "sd35").post("/ela/v1/tokens", {"prompt": "a black cat and a green frog", "entities": SPEC})
    assert {entity["word"]: entity["columns"] for entity in answer["entities"]} == {"cat": [3], "frog": [7]}
