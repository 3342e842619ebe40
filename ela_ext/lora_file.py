"""Attention-projection changes as a kohya-format LoRA file that the WebUIs and ComfyUI load as they are.

A trained change to a cross-attention ``to_k`` (or ``to_q`` / ``to_v``: any Linear of the UNet) is
written as ``lora_unet_<module path with "_">`` with ``.lora_down.weight`` (r, in),
``.lora_up.weight`` (out, r) and ``.alpha`` (the file's delta is ``up @ down * alpha / r``), or a
full-rank ``.diff`` (out, in). The module path is the Linear's
path relative to the UNet, in whichever layout the UNet has:

- ldm / sgm (the WebUIs' own models): ``input_blocks.1.1.transformer_blocks.0.attn2.to_k`` ->
  ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k``, for SD 1.x, 2.x and SDXL alike
  (kohya's SDXL files use exactly these names);
- diffusers (the benchmark's model): ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``
  -> ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k`` (kohya's SD 1.x/2.x
  names).

Why the ldm names are never converted to the diffusers ones, read from the hosts' code:
- A1111 (``extensions-builtin/Lora/networks.py`` ``load_network``): a key first goes through
  ``convert_diffusers_name_to_compvis``, whose index arithmetic (``1 + block * 3 + i``) assumes
  two res blocks per level; a key it leaves alone falls back to ``lora_unet`` ->
  ``diffusion_model`` and is looked up among the model's own module names. So ldm names load on
  any layout, diffusers names only on the standard one (not on small test models).
- Forge (``backend/patcher/lora.py`` -> ``packages_3rdparty/comfyui_lora_collection/lora.py``
  ``model_lora_keys_unet``) and ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet``): every
  ``diffusion_model.*.weight`` of the loaded model is mapped as ``lora_unet_<path>``, and the
  diffusers names through ``unet_to_diffusers(unet_config)``, which follows the real layout.
So the module's own path is the one name that every host maps on every layout, and no layout
knowledge is needed here.

Why hand-written rather than diffusers' ``convert_state_dict_to_kohya`` or peft: that helper takes
a peft state dict, writes the same one-line renaming, sets ``alpha`` to the rank whatever the
training used, and cannot write a full-rank ``.diff``; and neither diffusers nor peft is in
A1111's environment (``requirements_versions.txt`` pins neither), where the file is written. The
one import beyond torch is ``safetensors``, which every WebUI pins (A1111 and Forge: 0.4.2).

The metadata files the LoRA under its model version in the Lora tab: A1111's
``network.NetworkOnDisk.detect_version`` reads ``ss_base_model_version`` (``sdxl_*`` -> SDXL) and
``ss_v2`` (``"True"`` -> SD2), and the card shows only LoRAs of the loaded model's version
(``ui_extra_networks_lora.py``) unless "show all" is set; ``ss_output_name`` is the alias
``<lora:...>`` accepts. Version strings are kohya's (``model_util.get_model_version_str_for_sd1_sd2``,
``sdxl_base_v1-0``).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize
from torch import nn

LowRank = tuple  # (down (r, in), up (out, r), alpha)
Delta = Union[LowRank, torch.Tensor]

FAMILY_VERSIONS = {
    "sd1": ("sd_v1", False, False),
    "sd2": ("sd_v2", True, False),
    "sd2_v": ("sd_v2_v", True, True),
    "sdxl": ("sdxl_base_v1-0", False, False),
}
"""family -> (ss_base_model_version, ss_v2, ss_v_parameterization), kohya's values."""

KEY_PREFIX = "lora_unet_"
PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "diff")


class LoraFileError(ValueError):
    """A delta or a file that cannot be written, read or applied (the reason is the message)."""


def lora_key(module_path: str) -> str:
    """The file's key stem for a Linear at ``module_path`` relative to the UNet."""
    return KEY_PREFIX + module_path.replace(".", "_")


def _tensors_for(module_path: str, delta: Delta) -> dict[str, torch.Tensor]:
    stem = lora_key(module_path)
    if isinstance(delta, torch.Tensor):
        if delta.ndim != 2:
            raise LoraFileError(f"{module_path}: a full-rank delta must be (out, in), got {tuple(delta.shape)}")
        parts = {"diff": delta}
    else:
        down, up, alpha = delta
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraFileError(f"{module_path}: down (r, in) and up (out, r) do not fit: "
                                f"{tuple(down.shape)}, {tuple(up.shape)}")
        parts = {"lora_down.weight": down, "lora_up.weight": up,
                 "alpha": torch.tensor(float(alpha), dtype=down.dtype)}
    tensors = {}
    for part, tensor in parts.items():
        if not torch.isfinite(tensor).all():
            raise LoraFileError(f"{module_path}: {part} is not finite")
        tensors[f"{stem}.{part}"] = tensor.detach().to("cpu").contiguous()
    return tensors


def _network_metadata(deltas: Mapping[str, Delta]) -> dict[str, str]:
    low_rank = [delta for delta in deltas.values() if not isinstance(delta, torch.Tensor)]
    if not low_rank:
        # LyCORIS's full-rank algorithm writes exactly ``.diff``; A1111's network_full loads it.
        return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})}
    ranks = {down.shape[0] for down, _, _ in low_rank}
    if len(low_rank) != len(deltas) or len(ranks) > 1:
        raise LoraFileError("the deltas of one file must share one rank (or all be full rank)")
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks.pop())}
    alphas = {float(alpha) for _, _, alpha in low_rank}
    if len(alphas) == 1:
        metadata["ss_network_alpha"] = str(alphas.pop())
    return metadata


def save_lora(path: str | os.PathLike, deltas: Mapping[str, Delta], family: str,
              metadata: Mapping[str, str] = ()) -> Path:
    """Write ``deltas`` (to_k module path -> (down, up, alpha) or a full (out, in) tensor) to
    ``path`` as a kohya LoRA for ``family`` (a key of ``FAMILY_VERSIONS``); ``metadata`` adds
    string entries (training settings as JSON strings). Written to a temporary name in the same
    folder and renamed, so a failure never leaves a partial file and a reader never sees one."""
    path = Path(path)
    if family not in FAMILY_VERSIONS:
        raise LoraFileError(f"unknown model family {family!r}; one of {', '.join(FAMILY_VERSIONS)}")
    if not deltas:
        raise LoraFileError("no deltas to write")
    tensors: dict[str, torch.Tensor] = {}
    for module_path, delta in deltas.items():
        tensors.update(_tensors_for(module_path, delta))
    version, v2, v_param = FAMILY_VERSIONS[family]
    header = {"ss_base_model_version": version, "ss_v2": str(v2), "ss_v_parameterization": str(v_param),
              "ss_output_name": path.stem, **_network_metadata(deltas)}
    for key, value in dict(metadata).items():
        if not isinstance(value, str):
            raise LoraFileError(f"metadata {key!r} must be a string (JSON-encode structured values)")
        header[key] = value
    data = serialize(tensors, metadata=header)
    # Written by open(), not mkstemp or save_file (both make the file private, 0600): the LoRA
    # gets the mode of any file the WebUI writes (umask).
    temporary = path.parent / f".{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temporary, "xb") as file:
            file.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def read_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full delta weight per key stem (``lora_key(module_path)``) of a file ``save_lora`` or
    kohya wrote, with ``alpha / rank`` applied as the hosts apply it (no alpha: scale 1)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as file:
        for key in file.keys():
            stem, _, part = key.partition(".")
            if part not in PARTS:
                raise LoraFileError(f"{key}: not a LoRA down/up/alpha or full diff entry")
            parts.setdefault(stem, {})[part] = file.get_tensor(key)
    weights = {}
    for stem, entry in parts.items():
        if "diff" in entry:
            weights[stem] = entry["diff"].float()
        elif "lora_down.weight" in entry and "lora_up.weight" in entry:
            down, up = entry["lora_down.weight"].float(), entry["lora_up.weight"].float()
            scale = float(entry["alpha"]) / down.shape[0] if "alpha" in entry else 1.0
            weights[stem] = (up @ down) * scale
        else:
            raise LoraFileError(f"{stem}: has {sorted(entry)}, needs lora_down + lora_up or diff")
    return weights


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's safetensors metadata (what the Lora tab reads)."""
    with safe_open(str(path), framework="pt") as file:
        return dict(file.metadata() or {})


@contextlib.contextmanager
def merged_lora(unet: nn.Module, path: str | os.PathLike, strength: float = 1.0) -> Iterator[list[str]]:
    """Add ``strength`` x the file's deltas to the matching Linear weights of ``unet`` (matched by
    ``lora_key`` of each module's path, so a diffusers UNet takes files written from its own module
    paths) and restore the exact original weights on exit. Yields the merged module paths. Every
    key must match a Linear of the right shape, else nothing is changed and LoraFileError says
    which: a file for another model must not apply half-way."""
    deltas = read_lora(path)
    linears = {lora_key(name): (name, module) for name, module in unet.named_modules()
               if isinstance(module, nn.Linear)}
    unmatched = sorted(set(deltas) - set(linears))
    if unmatched:
        raise LoraFileError(f"{len(unmatched)} key(s) match no Linear of this UNet: {', '.join(unmatched[:5])}")
    for stem, delta in deltas.items():
        shape = tuple(linears[stem][1].weight.shape)
        if tuple(delta.shape) != shape:
            raise LoraFileError(f"{stem}: delta {tuple(delta.shape)} does not fit the weight {shape}")
    originals = {stem: linears[stem][1].weight.detach().clone() for stem in deltas}
    try:
        with torch.no_grad():
            for stem, delta in deltas.items():
                weight = linears[stem][1].weight
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype), alpha=strength)
        yield sorted(linears[stem][0] for stem in deltas)
    finally:
        with torch.no_grad():
            for stem, original in originals.items():
                linears[stem][1].weight.copy_(original)
