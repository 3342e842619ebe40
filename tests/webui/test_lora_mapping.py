"""The LoRA file's key names against the hosts' own mapping code, on the full-size SD 1.x, SD 2.x and
SDXL layouts (the host tests load files on the tiny layouts only).

Run in this process from the prepared checkouts, no server: Forge's
``packages_3rdparty/comfyui_lora_collection`` (``model_lora_keys_unet``, ``unet_to_diffusers``; the
same code as ComfyUI's ``comfy/lora.py``) from ``ELA_FORGE``, and A1111's
``convert_diffusers_name_to_compvis`` from ``extensions-builtin/Lora/networks.py`` under
``ELA_WEBUI`` (taken out of the module by its source, which imports the whole WebUI). The module
paths of each layout come from Forge's ``unet_to_diffusers``, so every test needs ``ELA_FORGE``
and the A1111 ones ``ELA_WEBUI`` too; without them they skip and say why.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import sys
from pathlib import Path

import pytest

import torch
from safetensors.torch import load_file

from ela_ext.lora_file import lora_key, save_lora

# Comfy-style UNet configs of the real models (Forge's huggingface_guess / ComfyUI's supported_models).
LAYOUTS = {
    "sd1": {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]},
    "sdxl": {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
}
LAYOUTS["sd2"] = LAYOUTS["sd1"]  # SD 2.x differs in widths and heads, not in module paths
TO_K_COUNTS = {"sd1": 16, "sd2": 16, "sdxl": 70}


def _host_folder(variable: str, marker: str) -> Path:
    root = os.environ.get(variable)
    if not root or not (Path(root) / "webui" / marker).exists():
        pytest.skip(f"{variable} names no prepared host with webui/{marker}")
    return Path(root) / "webui"


@pytest.fixture(scope="module")
def forge_lora():
    webui = _host_folder("ELA_FORGE", "packages_3rdparty/comfyui_lora_collection/lora.py")
    sys.path.insert(0, str(webui))
    try:
        from packages_3rdparty.comfyui_lora_collection import lora, utils
    finally:
        sys.path.remove(str(webui))
    return lora, utils


@pytest.fixture(scope="module")
def a1111_convert():
    """``convert_diffusers_name_to_compvis`` with the module-level tables it reads."""
    source = (_host_folder("ELA_WEBUI", "extensions-builtin/Lora/networks.py")
              / "extensions-builtin" / "Lora" / "networks.py").read_text()
    wanted = {"re_digits", "re_x_proj", "re_compiled", "suffix_conversion", "convert_diffusers_name_to_compvis"}
    nodes = [node for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name in wanted
             or isinstance(node, ast.Assign) and {getattr(t, "id", None) for t in node.targets} & wanted]
    namespace = {"re": re}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "networks.py", "exec"), namespace)
    return namespace["convert_diffusers_name_to_compvis"]


def to_k_paths(utils, family: str) -> dict[str, str]:
    """diffusers module path -> ldm module path of every cross-attention to_k, from Forge's map."""
    mapping = utils.unet_to_diffusers(copy.deepcopy(LAYOUTS[family]))
    paths = {diffusers[: -len(".weight")]: ldm[: -len(".weight")] for diffusers, ldm in mapping.items()
             if diffusers.endswith("attn2.to_k.weight")}
    assert len(paths) == TO_K_COUNTS[family]
    return paths


HUGGINGFACE_REPOS = {"sd1": "runwayml/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
                     "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


class _Model:
    """What ``model_lora_keys_unet`` reads of a model: its state-dict keys, UNet config and repo."""

    def __init__(self, ldm_keys: list[str], family: str):
        self._keys = ldm_keys
        self.diffusion_model = type("Unet", (), {"config": copy.deepcopy(LAYOUTS[family])})()
        self.config = type("Config", (), {"huggingface_repo": HUGGINGFACE_REPOS[family]})()

    def state_dict(self) -> dict:
        return dict.fromkeys(self._keys)


@pytest.mark.parametrize("rank", [2, 0])
@pytest.mark.parametrize("family", list(LAYOUTS))
@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
def test_forge_and_comfy_load_every_key_of_a_file(forge_lora, tmp_path, family, naming, rank):
    """A file written from either naming's module paths: Forge's ``load_lora`` patches every
    to_k weight from it and leaves no key unmatched (what Forge prints as "unmatched keys")."""
    lora, utils = forge_lora
    paths = to_k_paths(utils, family)
    model = _Model([f"diffusion_model.{ldm}.weight" for ldm in paths.values()], family)
    _, key_map = lora.model_lora_keys_unet(model, {})
    written = {diffusers if naming == "diffusers" else ldm: (torch.ones(rank, 8), torch.ones(4, rank), 1.0) if rank
               else torch.ones(4, 8) for diffusers, ldm in paths.items()}
    file = save_lora(tmp_path / "pair.safetensors", written, family)
    patches, unmatched = lora.load_lora(load_file(str(file)), key_map)
    assert unmatched == {}
    assert sorted(patches) == sorted(f"diffusion_model.{ldm}.weight" for ldm in paths.values())
    assert {patch[0] for patch in patches.values()} == {"lora" if rank else "diff"}


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_a1111_maps_both_namings_to_the_module(forge_lora, a1111_convert, family):
    """A1111 converts a diffusers name by arithmetic that holds on these standard layouts; an ldm
    name it leaves as it is and then finds by replacing ``lora_unet`` with ``diffusion_model``
    (``networks.load_network``)."""
    _, utils = forge_lora
    for diffusers, ldm in to_k_paths(utils, family).items():
        module_name = "diffusion_model_" + ldm.replace(".", "_")
        assert a1111_convert(lora_key(diffusers), family == "sd2") == module_name
        unconverted = a1111_convert(lora_key(ldm), family == "sd2")
        assert unconverted == lora_key(ldm)
        assert unconverted.replace("lora_unet", "diffusion_model") == module_name


def test_a1111_diffusers_arithmetic_misses_small_layouts(forge_lora, a1111_convert):
    """Why the file keeps ldm names: with one res block per level (the test hosts' tiny models)
    A1111 maps a diffusers name to another module, while the ldm name still fits."""
    _, utils = forge_lora
    tiny = {**LAYOUTS["sd1"], "num_res_blocks": [1, 1, 1, 1], "transformer_depth": [1, 1, 1, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0]}
    mapping = utils.unet_to_diffusers(copy.deepcopy(tiny))
    diffusers = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    ldm = mapping[diffusers + ".weight"][: -len(".weight")]
    assert a1111_convert(lora_key(diffusers), False) != "diffusion_model_" + ldm.replace(".", "_")
