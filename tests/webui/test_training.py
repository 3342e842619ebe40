"""Training a LoRA through the real AUTOMATIC1111 WebUI (``POST /ela/v1/train``, the "ELA training"
tab), loaded afterwards by its built-in Lora extension; checks in training_checks.py.

This module starts its own WebUI: its Lora folder is a temporary one (``--lora-dir``), so the
prepared host is left as it was, and its log level is DEBUG, the only level at which A1111's
``networks.load_network`` reports the keys of a file that it could not map ("didn't match keys").
"""

from __future__ import annotations

import pytest

from training_checks import (assert_trained_lora_loads, test_a_failing_training_run_answers_with_the_reason,  # noqa: F401
                             test_a_taken_lora_name_is_refused_unless_overwrite,
                             test_training_bad_input_answers_with_the_reason,
                             test_training_interrupt_leaves_no_file_and_the_model_unchanged,
                             test_training_with_the_preservation_term)
from webui_host import CHECKPOINTS, WebUI, checkout_in_extensions, use_model


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def trainer(webui_root, workdir, lora_dir):
    """The WebUI with its UI, the debug routes, a temporary Lora folder and DEBUG logging."""
    with checkout_in_extensions(webui_root), \
            WebUI(webui_root, workdir, "training", {"ELA_DEBUG": "1", "SD_WEBUI_LOG_LEVEL": "DEBUG"},
                  with_ui=True, ready_path="/ela/v1/debug/hooks", extra_flags=("--lora-dir", str(lora_dir))) as server:
        yield server


@pytest.fixture
def training_host(trainer):
    """For the tests imported from training_checks."""
    return use_model(trainer, "sd1")


def click_train(server: WebUI, name: str, prompts: str) -> list[str]:
    """What the tab's Train button returns (its two HTML outputs), called through Gradio's HTTP
    API as the page's click does: the WebUI's ``wrap_gradio_gpu_call`` around ``run_training``."""
    config = server.get("/config")
    element_ids = {component["id"]: component.get("props", {}).get("elem_id") for component in config["components"]}
    (fn_index,) = [index for index, dependency in enumerate(config["dependencies"])
                   if any(element_ids.get(target) == "ela_train_button" for target in dependency["targets"])]
    fields = ["task(ela-test)", name, prompts, "", 2, 0.05, "separate_enhance", ["to_k"], 4, "all", 2, 0, 128, 128, False]
    return server.post("/run/predict", {"fn_index": fn_index, "data": fields, "session_hash": "ela-test"})["data"]


def test_the_training_tab_trains_and_refuses_with_the_reason(trainer, lora_dir):
    element_ids = {component.get("props", {}).get("elem_id") for component in trainer.get("/config")["components"]}
    assert {"tab_ela_training", "ela_train_prompts", "ela_train_button", "ela_train_interrupt",
            "ela_train_progress"} <= element_ids
    use_model(trainer, "sd1")
    message, timing = click_train(trainer, "from-the-tab", "a black cat and a green frog\na red bag and a blue car")
    assert "Saved <b>from-the-tab</b> (2 steps" in message and "Time taken" in timing
    assert (lora_dir / "from-the-tab.safetensors").is_file()
    message, _ = click_train(trainer, "refused-in-the-tab", "a cat")
    assert "Not trained: prompt 1 (&#x27;a cat&#x27;): ELA needs at least two entities" in message
    assert not (lora_dir / "refused-in-the-tab.safetensors").exists()


@pytest.mark.parametrize("model", list(CHECKPOINTS))
def test_trained_lora_loads_and_the_model_is_unchanged(trainer, lora_dir, model):
    server = use_model(trainer, model)

    def assert_all_keys_loaded(file_name: str) -> None:
        log = server.log.read_text(errors="replace")
        assert " DEBUG " in log  # the level at which unmatched keys would show
        assert not [line for line in log.splitlines() if file_name in line and "didn't match keys" in line]

    assert_trained_lora_loads(server, lora_dir, f"pair-{model}", model, assert_all_keys_loaded)
