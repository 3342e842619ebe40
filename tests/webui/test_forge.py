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

import os
import subprocess
from pathlib import Path

import pytest

from training_checks import (assert_trained_lora_loads, test_a_failing_training_run_answers_with_the_reason,  # noqa: F401
                             test_a_taken_lora_name_is_refused_unless_overwrite,
                             test_training_bad_input_answers_with_the_reason,
                             test_training_interrupt_leaves_no_file_and_the_model_unchanged,
                             test_training_with_the_preservation_term)
from webui_host import (CHECKPOINTS, SAMPLER_HISTORIES, SAMPLERS, SIZE, SCRIPT_TITLE, SPEC, WebUI, _free_port,
                        absent_image_or_skip,
                        assert_bad_input_gives_the_off_image, assert_hires_and_img2img_anchor, assert_no_failure,
                        assert_off_is_byte_identical_to_no_extension, assert_on_changes_the_image_and_the_loss_falls,
                        assert_sampler_continues_from_the_anchored_latent, baselines, checkout_in_extensions,
                        ela_args, images_without_extension, infotext, pixels, txt2img_payload, use_model)

# The tiny checkpoints forge-host/setup.sh builds.
FORGE_MODELS = ["sd1", "sdxl"]
# Generated once by Forge without the extension; `forge` must give the same bytes when ELA is off.
FORGE_BASELINES = baselines({model: ("Euler a", "DPM++ 2M", "DDIM") for model in FORGE_MODELS}, **SIZE)
# Forge's API fails a hires request without hr_additional_modules (TypeError on None).
FORGE_HIRES_FIELDS = {"hr_additional_modules": ["Use same choices"]}
# Offline on CPU, full precision, API only; tiny-sd1 (else the first checkpoint in models/Stable-diffusion).
FORGE_FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
               "--skip-python-version-check", "--no-download-sd-model", "--always-cpu", "--all-in-fp32", "--api",
               "--nowebui", "--server-name", "127.0.0.1", "--no-prompt-history"]


class Forge(WebUI):
    """A Forge process; the stdlib HTTP calls, readiness wait and stop are ``WebUI``'s."""

    def __init__(self, root: Path, workdir: Path, name: str, env: dict[str, str], extra_flags: tuple[str, ...] = ()):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.checkpoint: str | None = None
        launch_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                      "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
                      "OMP_NUM_THREADS": "1", "COMMANDLINE_ARGS": "", **env}
        # Pinned where the host has it: the first checkpoint by natural sort would otherwise be
        # tiny-flux, which the MM-DiT recipes (shared/webui-mmdit) add beside it.
        sd1 = root / "webui" / "models" / "Stable-diffusion" / CHECKPOINTS["sd1"]
        if "--ckpt" not in extra_flags and sd1.is_file():
            extra_flags = ("--ckpt", str(sd1), *extra_flags)
        flags = [*FORGE_FLAGS, "--port", str(self.port), "--ui-settings-file", str(workdir / f"{name}-config.json"),
                 "--ui-config-file", str(workdir / f"{name}-ui-config.json"), *extra_flags]
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

    def load_checkpoint(self, checkpoint: str) -> None:
        """Forge loads a newly chosen checkpoint at the next generation; the token and debug
        routes read the loaded model, so one short generation loads it here."""
        super().load_checkpoint(checkpoint)
        self.txt2img(**txt2img_payload("Euler a", steps=1))

    def stop(self) -> None:
        super().stop()
        self._process.wait(timeout=30)


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
    """Images from Forge WITHOUT the extension for FORGE_BASELINES, or None where the checkout is
    linked by someone else (then it cannot be absent). Requested by ``forge_server`` so it runs first."""
    return images_without_extension(Forge, forge_root, forge_workdir, FORGE_BASELINES)


@pytest.fixture(scope="module")
def lora_dir(forge_workdir) -> Path:
    return forge_workdir / "lora"


@pytest.fixture(scope="module")
def forge_server(forge_root, forge_workdir, absent_images, lora_dir):
    """Forge with the extension linked, its debug routes on (ELA_DEBUG=1) and a Lora folder of the
    tests' own (trained LoRAs go there, not into the prepared Forge)."""
    with checkout_in_extensions(forge_root), \
            Forge(forge_root, forge_workdir, "with-ela", {"ELA_DEBUG": "1"}, ("--lora-dir", str(lora_dir))) as server:
        yield server


@pytest.fixture
def forge(forge_server):
    """Forge with the tiny SD1 checkpoint loaded."""
    return use_model(forge_server, "sd1")


@pytest.fixture
def training_host(forge):
    """For the tests imported from training_checks."""
    return forge


@pytest.fixture
def forge_model(forge_server, request):
    """Forge with ``request.param``'s checkpoint loaded (indirect over FORGE_MODELS)."""
    return use_model(forge_server, request.param)


def test_the_script_is_loaded_by_forge(forge):
    names = [script["name"] for script in forge.get("/sdapi/v1/script-info")]
    assert SCRIPT_TITLE.lower() in names


@pytest.mark.parametrize("name", list(FORGE_BASELINES))
def test_off_is_byte_identical_to_no_extension(forge_server, absent_images, name):
    model, payload = FORGE_BASELINES[name]
    assert_off_is_byte_identical_to_no_extension(use_model(forge_server, model), payload, absent_images, name)


@pytest.mark.parametrize("forge_model", FORGE_MODELS, indirect=True)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_on_changes_the_image_and_the_loss_falls(forge_model, sampler):
    """Forge samples under inference mode: ELA's grad pass must still run and lower the loss."""
    assert_on_changes_the_image_and_the_loss_falls(forge_model, sampler)


@pytest.mark.parametrize("forge_model", FORGE_MODELS, indirect=True)
def test_attend_excite_paper_reads_the_text_columns_through_forge(forge_model):
    """A&E's paper form needs the prompt's text-token columns from Forge's text engines."""
    assert_on_changes_the_image_and_the_loss_falls(forge_model, "Euler a", objective="attend_excite_paper")


@pytest.mark.parametrize("forge_model", FORGE_MODELS, indirect=True)
@pytest.mark.parametrize("sampler, history", SAMPLER_HISTORIES)
def test_sampler_continues_from_the_anchored_latent(forge_model, sampler, history):
    """As in test_webui.py: the write must reach Forge's own sampler state, not only the UNet."""
    assert_sampler_continues_from_the_anchored_latent(forge_model, sampler, history)


@pytest.mark.parametrize("forge_model", FORGE_MODELS, indirect=True)
@pytest.mark.parametrize("sampler", ["Euler a", "DDIM"])
def test_hires_and_img2img_anchor(forge_model, sampler):
    assert_hires_and_img2img_anchor(forge_model, sampler, **FORGE_HIRES_FIELDS)


@pytest.mark.parametrize("forge_model", FORGE_MODELS, indirect=True)
@pytest.mark.parametrize("prompt, expected", [
    ("a black cat and a green frog", {"cat": [3], "frog": [7]}),
    ("a (black:1.3) cat BREAK a green frog", {"cat": [3], "frog": [77 + 3]}),
])
def test_token_route_and_generation_agree(forge_model, prompt, expected):
    """Forge's own text engines (SDXL: CLIP-L and bigG) give the route's columns, and generation
    anchors on them (it refuses when SDXL's two engines disagree)."""
    answer = forge_model.post("/ela/v1/tokens", {"prompt": prompt, "entities": SPEC})
    assert {entity["word"]: entity["columns"] for entity in answer["entities"]} == expected
    result = forge_model.txt2img(**txt2img_payload("Euler a", prompt=prompt, **SIZE), **ela_args())
    assert "ELA log: steps=3;" in infotext(result)
    assert_no_failure(infotext(result))


@pytest.mark.parametrize("args, warning", [
    (ela_args(entities="dog | cat"), "not found in the prompt: 'dog'"),
    (ela_args(entities="cat"), "needs at least two entities"),
])
def test_bad_entity_warns_and_gives_the_baseline_image(forge, args, warning):
    assert_bad_input_gives_the_off_image(forge, txt2img_payload("Euler a", **SIZE), args, warning)


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
    assert off_after["images"][0] == absent_image_or_skip(absent_images, "sd1/Euler a")


def test_batch_anchors_every_image(forge):
    batch = forge.txt2img(**txt2img_payload("Euler a", batch_size=2, n_iter=2, **SIZE), **ela_args())
    assert len(batch["images"]) == 4
    assert all("ELA log: steps=3;" in text for text in batch["info"]["infotexts"])


@pytest.mark.parametrize("forge_model", FORGE_MODELS, indirect=True)
def test_trained_lora_loads_and_the_model_is_unchanged(forge_model, lora_dir, request):
    """Training in Forge (inference-mode weights, its own UNet call); Forge's Lora extension
    prints what it loaded: every key of the file, none skipped or unmatched."""
    model = request.node.callspec.params["forge_model"]

    def assert_all_keys_loaded(file_name: str) -> None:
        lines = [line for line in forge_model.log.read_text(errors="replace").splitlines()
                 if "[LORA]" in line and file_name in line]
        assert lines and all("skipped 0 keys" in line for line in lines), lines
        assert not [line for line in lines if "unmatched" in line or "ismatch" in line], lines

    assert_trained_lora_loads(forge_model, lora_dir, f"pair-{model}", model, assert_all_keys_loaded)
