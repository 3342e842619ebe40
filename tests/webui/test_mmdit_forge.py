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

from mmdit_checks import (assert_anchors_with_a_falling_loss, assert_auto_is_the_mmdit_objective,
                          assert_off_is_the_image_without_the_extension, assert_plain_with_a_message,
                          assert_xyz_enabled_and_block_axes, payload, require_files)
from test_forge import Forge
from training_checks import assert_training_refused_on_an_mmdit
from webui_host import (SPEC, assert_no_failure, assert_sampler_continues_from_the_anchored_latent,
                        checkout_in_extensions, checkout_linked, ela_args, infotext, pixels)

MODELS = {"sd35": "tiny-sd35.safetensors", "flux": "tiny-flux.safetensors"}
FIXTURE = "forge-tiny-dit"
REQUIRED = [f"webui/models/Stable-diffusion/{name}" for name in MODELS.values()] + [f"{FIXTURE}/scripts"]
# Flux dev is guidance-distilled: one pass per step (cfg 1), Forge's distilled guidance 3.5.
FIELDS = {"sd35": {"scheduler": "Simple"}, "flux": {"scheduler": "Simple", "cfg_scale": 1}}
BASELINES = {f"{model}/{sampler}": (model, payload(sampler_name=sampler, **FIELDS[model]))
             for model in MODELS for sampler in ("Euler", "DPM++ 2M")}
# Joint blocks of tiny-sd35 (make_tiny_forge_sd35.py's default --depth); tiny-flux has one
# double block, where every block choice reads the same.
SD35_JOINT_BLOCKS = 2
TIMESTEP_SAMPLER = {"sd35": "ELA anchors SD3 / SD3.5 (MM-DiT) models under k-diffusion samplers",
                    "flux": "ELA anchors Flux (MM-DiT) models under k-diffusion samplers"}


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


def start(root: Path, workdir: Path, name: str, env: dict[str, str], extra_flags: tuple[str, ...] = ()) -> Forge:
    return Forge(root, workdir, name, env,
                 ("--ckpt", str(root / "webui" / "models" / "Stable-diffusion" / MODELS["sd35"]), *extra_flags))


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
def dit_lora_dir(dit_workdir) -> Path:
    return dit_workdir / "lora"


@pytest.fixture(scope="module")
def dit_forge(dit_root, dit_workdir, dit_absent, dit_lora_dir):
    """With the extension, its debug routes and a Lora folder of the tests' own."""
    with fixture_linked(dit_root), checkout_in_extensions(dit_root), \
            start(dit_root, dit_workdir, "dit-with-ela", {"ELA_DEBUG": "1"}, ("--lora-dir", str(dit_lora_dir))) as server:
        yield server


@pytest.mark.parametrize("name", list(BASELINES))
def test_dit_off_is_byte_identical_to_no_extension(dit_forge, dit_absent, name):
    if dit_absent is None:
        pytest.skip("the checkout was linked before the tests started: no extension-free baseline")
    model, request = BASELINES[name]
    assert_off_is_the_image_without_the_extension(use(dit_forge, model), request, dit_absent[name])


@pytest.mark.parametrize("model", list(MODELS))
def test_dit_default_objective_is_attend_excite_paper(dit_forge, model):
    assert_auto_is_the_mmdit_objective(use(dit_forge, model), payload(**FIELDS[model]))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_dit_on_anchors_with_a_falling_loss(dit_forge, model, sampler):
    """Forge samples under inference mode; the grad pass reads the joint attention through
    backend.nn.mmditx / backend.nn.flux, replaced for the pass only (Flux at cfg 1: one pass a step)."""
    assert_anchors_with_a_falling_loss(use(dit_forge, model), payload(sampler_name=sampler, **FIELDS[model]))


@pytest.mark.parametrize("model", list(MODELS))
def test_dit_sampler_continues_from_the_anchored_latent(dit_forge, model):
    assert_sampler_continues_from_the_anchored_latent(use(dit_forge, model), "Euler", 0,
                                                      payload(sampler_name="Euler", **FIELDS[model]))


@pytest.mark.parametrize("model", list(MODELS))
def test_dit_weights_made_grad_capable_give_the_same_images(dit_forge, dit_absent, model):
    """ELA swaps Forge's inference-tensor weights for normal copies: off afterwards is still the
    image of Forge without the extension, and on repeats itself."""
    server = use(dit_forge, model)
    request = BASELINES[f"{model}/Euler"][1]
    on = server.txt2img(**request, **ela_args())
    assert server.txt2img(**request, **ela_args())["images"] == on["images"]
    if dit_absent is not None:
        assert server.txt2img(**request)["images"][0] == dit_absent[f"{model}/Euler"]


@pytest.mark.parametrize("model", list(MODELS))
def test_dit_timestep_sampler_is_plain_with_a_message(dit_forge, model):
    assert_plain_with_a_message(use(dit_forge, model), payload(sampler_name="DDIM", **FIELDS[model]),
                                TIMESTEP_SAMPLER[model])


@pytest.mark.parametrize("model", list(MODELS))
def test_dit_batch_anchors_every_image(dit_forge, model):
    result = use(dit_forge, model).txt2img(**payload(batch_size=2, **FIELDS[model]), **ela_args())
    assert len(result["images"]) == 2
    for text in result["info"]["infotexts"]:
        assert "ELA log: steps=3;" in text, text
        assert_no_failure(text)


def test_sd35_xyz_enabled_and_block_axes(dit_forge):
    """Forge's X/Y/Z plot is A1111's (its API takes the same args), with the ELA axes."""
    assert_xyz_enabled_and_block_axes(use(dit_forge, "sd35"), payload(**FIELDS["sd35"]), SD35_JOINT_BLOCKS)


def test_dit_grad_pass_failure_generates_as_if_off(dit_forge):
    server = use(dit_forge, "flux")
    off = server.txt2img(**payload(**FIELDS["flux"]))
    server.post("/ela/v1/debug/fault", {"kind": "error", "step": 0})
    failed = server.txt2img(**payload(**FIELDS["flux"]), **ela_args())
    assert "anchoring stopped at step 1, image continues unanchored: RuntimeError: grad pass failed (injected)" \
        in infotext(failed)
    assert pixels(failed["images"][0]) == pixels(off["images"][0])


def test_sd35_token_route_reads_the_clip_columns_then_t5s(dit_forge):
    """SD3.5's context: Forge's CLIP-L/G chunks (77 columns each), then T5's ids when the setting
    ``sd3_enable_t5`` is on (else zeros there). The tiny fixture's T5 is too narrow for Forge to
    encode with T5 on, so generation is checked with it off."""
    server = use(dit_forge, "sd35")
    prompt = {"prompt": "a black cat and a green frog", "entities": SPEC}
    answer = server.post("/ela/v1/tokens", prompt)
    assert {entity["word"]: entity["columns"] for entity in answer["entities"]} == {"cat": [3], "frog": [7]}
    assert answer["sot_columns"] == [0]
    server.post("/sdapi/v1/options", {"sd3_enable_t5": True})
    try:
        with_t5 = server.post("/ela/v1/tokens", prompt)
    finally:
        server.post("/sdapi/v1/options", {"sd3_enable_t5": False})
    columns = {entity["word"]: entity["columns"] for entity in with_t5["entities"]}
    assert columns["cat"][0] == 3 and columns["frog"][0] == 7
    assert min(columns["cat"][1:]) >= 77 and min(columns["frog"][1:]) >= 77, columns
    texts = {token["column"]: token["text"] for token in with_t5["tokens"]}
    assert "".join(texts[c] for c in columns["frog"] if c >= 77) == "frog"
    result = server.txt2img(**payload(**FIELDS["sd35"]), **ela_args())
    assert "ELA log: steps=3;" in infotext(result)


def test_flux_token_route_reads_the_t5_columns(dit_forge):
    """Flux's context is T5's alone (its CLIP-L gives only the pooled vector): no start token,
    the end token is the background column."""
    answer = use(dit_forge, "flux").post("/ela/v1/tokens", {"prompt": "a black cat and a green frog", "entities": SPEC})
    columns = {entity["word"]: entity["columns"] for entity in answer["entities"]}
    texts = {token["column"]: token["text"] for token in answer["tokens"]}
    assert "".join(texts[c] for c in columns["cat"]) == "cat"
    assert "".join(texts[c] for c in columns["frog"]) == "frog"
    assert answer["sot_columns"] == [max(texts) + 1]
    assert answer["warnings"] == []


@pytest.mark.parametrize("model, family", [("sd35", "SD3 / SD3.5 (MM-DiT)"), ("flux", "Flux (MM-DiT)")])
def test_dit_training_is_refused_with_what_it_supports(dit_forge, dit_lora_dir, model, family):
    """Training (S&E's key projections) is UNet-only: ``POST /ela/v1/train`` says so with SD3.5 or
    Flux loaded, before any work (no file, no patch, the same image after)."""
    assert_training_refused_on_an_mmdit(use(dit_forge, model), dit_lora_dir, payload(**FIELDS[model]), family)


@pytest.mark.parametrize("model", list(MODELS))
def test_dit_hires_and_img2img_anchor(dit_forge, model):
    server = use(dit_forge, model)
    hires = server.txt2img(**payload(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6,
                                     hr_second_pass_steps=4, hr_additional_modules=["Use same choices"],
                                     **FIELDS[model]), **ela_args())
    assert "ELA log: steps=3;" in infotext(hires) and ";hires_steps=" in infotext(hires), infotext(hires)
    assert_no_failure(infotext(hires))
    init = server.txt2img(**payload(**FIELDS[model]))["images"][0]
    img2img = server.img2img(**payload(init_images=[init], denoising_strength=0.5, **FIELDS[model]), **ela_args())
    assert "ELA log: steps=" in infotext(img2img) and "ELA log: steps=0" not in infotext(img2img)
    assert_no_failure(infotext(img2img))
