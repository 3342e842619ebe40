"""The LoRA file: names the hosts map, metadata the Lora tab reads, exact round trip, atomic write,
and merging into a diffusers UNet. The hosts' own mapping code is run in tests/webui/test_lora_mapping.py."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from ela_ext.lora_file import (LoraFileError, lora_key, merged_lora, read_lora, read_metadata,
                               save_lora)

# One to_k per family, as the hosts' models name them, with the file key kohya's tools write
# (SDXL: kohya's sdxl_train_network names; SD 1.x in diffusers layout: kohya's train_network names).
KNOWN_NAMES = [
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k",
     "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"),
    ("middle_block.1.transformer_blocks.0.attn2.to_k",
     "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"),
    ("output_blocks.0.1.transformer_blocks.9.attn2.to_k",
     "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k"),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
     "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k"),
]


@pytest.mark.parametrize("module_path, expected", KNOWN_NAMES)
def test_key_names_are_kohyas(module_path, expected):
    assert lora_key(module_path) == expected


def low_rank(out_features=6, in_features=5, rank=2, alpha=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, in_features, generator=generator),
            torch.randn(out_features, rank, generator=generator), alpha)


def test_round_trip_low_rank_and_full(tmp_path):
    down, up, alpha = low_rank(rank=2, alpha=0.5)
    path = save_lora(tmp_path / "pair.safetensors", {"input_blocks.1.1.transformer_blocks.0.attn2.to_k": (down, up, alpha)}, "sd1")
    weights = read_lora(path)
    assert list(weights) == ["lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"]
    torch.testing.assert_close(weights[lora_key("input_blocks.1.1.transformer_blocks.0.attn2.to_k")],
                               up @ down * (alpha / 2), rtol=0, atol=0)

    diff = torch.randn(6, 5)
    path = save_lora(tmp_path / "full.safetensors", {"middle_block.1.transformer_blocks.0.attn2.to_k": diff}, "sdxl")
    assert torch.equal(read_lora(path)[lora_key("middle_block.1.transformer_blocks.0.attn2.to_k")], diff)


@pytest.mark.parametrize("family, version, v2", [("sd1", "sd_v1", "False"), ("sd2", "sd_v2", "True"),
                                                 ("sd2_v", "sd_v2_v", "True"), ("sdxl", "sdxl_base_v1-0", "False")])
def test_metadata_files_the_lora_under_its_version(tmp_path, family, version, v2):
    settings = json.dumps({"steps": 3})
    path = save_lora(tmp_path / "named.safetensors", {"a.to_k": low_rank(rank=3, alpha=3.0)}, family,
                     {"ela_training": settings})
    metadata = read_metadata(path)
    assert metadata["ss_base_model_version"] == version
    assert metadata["ss_v2"] == v2
    assert metadata["ss_output_name"] == "named"
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == \
        ("networks.lora", "3", "3.0")
    assert metadata["ela_training"] == settings


def test_full_rank_metadata_names_lycoris_full(tmp_path):
    metadata = read_metadata(save_lora(tmp_path / "f.safetensors", {"a.to_k": torch.ones(2, 2)}, "sd1"))
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "full"}
    assert "ss_network_dim" not in metadata


@pytest.mark.parametrize("deltas, family, reason", [
    ({"a.to_k": (torch.ones(2, 5), torch.ones(6, 3), 1.0)}, "sd1", "do not fit"),
    ({"a.to_k": torch.ones(2, 2, 1)}, "sd1", r"must be \(out, in\)"),
    ({"a.to_k": torch.tensor([[float("nan")]])}, "sd1", "not finite"),
    ({"a.to_k": low_rank(rank=2), "b.to_k": low_rank(rank=3)}, "sd1", "one rank"),
    ({"a.to_k": low_rank(), "b.to_k": torch.ones(6, 5)}, "sd1", "one rank"),
    ({}, "sd1", "no deltas"),
    ({"a.to_k": low_rank()}, "sd3", "unknown model family"),
])
def test_bad_deltas_leave_no_file_and_keep_the_old_one(tmp_path, deltas, family, reason):
    path = tmp_path / "kept.safetensors"
    save_lora(path, {"a.to_k": torch.ones(2, 2)}, "sd1")
    before = path.read_bytes()
    with pytest.raises(LoraFileError, match=reason):
        save_lora(path, deltas, family)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]


def test_non_string_metadata_is_refused(tmp_path):
    with pytest.raises(LoraFileError, match="must be a string"):
        save_lora(tmp_path / "x.safetensors", {"a.to_k": torch.ones(2, 2)}, "sd1", {"steps": 3})
    assert list(tmp_path.iterdir()) == []


def test_a_failing_write_leaves_no_temporary(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("ela_ext.lora_file.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_lora(tmp_path / "x.safetensors", {"a.to_k": torch.ones(2, 2)}, "sd1")
    assert list(tmp_path.iterdir()) == []


def test_the_file_gets_the_usual_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_lora(tmp_path / "x.safetensors", {"a.to_k": torch.ones(2, 2)}, "sd1")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def tiny_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def to_k_paths(unet):
    return [name for name, _ in unet.named_modules() if name.endswith("attn2.to_k")]


def test_merged_lora_adds_the_deltas_and_restores_the_weights(tmp_path):
    unet = tiny_unet()
    paths = to_k_paths(unet)
    assert paths
    deltas = {}
    for index, path in enumerate(paths):
        weight = unet.get_submodule(path).weight
        deltas[path] = low_rank(weight.shape[0], weight.shape[1], rank=2, alpha=1.0, seed=index)
    file = save_lora(tmp_path / "unet.safetensors", deltas, "sd1")
    before = {name: p.clone() for name, p in unet.state_dict().items()}
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 12)
    with torch.no_grad():
        plain = unet(sample, 10, context).sample
        with merged_lora(unet, file, strength=0.5) as merged:
            assert merged == sorted(paths)
            for path, (down, up, alpha) in deltas.items():
                expected = before[path + ".weight"] + 0.5 * (up @ down * alpha / 2)
                torch.testing.assert_close(unet.get_submodule(path).weight, expected)
            with_lora = unet(sample, 10, context).sample
        after = unet(sample, 10, context).sample
    assert not torch.equal(with_lora, plain)
    assert torch.equal(after, plain)
    assert all(torch.equal(p, before[name]) for name, p in unet.state_dict().items())


def test_a_file_for_another_model_changes_nothing(tmp_path):
    unet = tiny_unet()
    before = {name: p.clone() for name, p in unet.state_dict().items()}
    path = to_k_paths(unet)[0]
    weight = unet.get_submodule(path).weight
    wrong_shape = save_lora(tmp_path / "shape.safetensors", {path: torch.ones(weight.shape[0], weight.shape[1] + 1)}, "sd1")
    wrong_names = save_lora(tmp_path / "names.safetensors",
                            {path: torch.ones(weight.shape), "input_blocks.1.1.transformer_blocks.0.attn2.to_k": torch.ones(weight.shape)}, "sd1")
    for file, reason in ((wrong_shape, "does not fit"), (wrong_names, "match no Linear")):
        with pytest.raises(LoraFileError, match=reason):
            with merged_lora(unet, file):
                pass
        assert all(torch.equal(p, before[name]) for name, p in unet.state_dict().items())


def test_read_refuses_entries_it_cannot_apply(tmp_path):
    from safetensors.torch import save_file
    save_file({"lora_unet_a_to_k.lora_mid.weight": torch.ones(2, 2)}, str(tmp_path / "mid.safetensors"))
    with pytest.raises(LoraFileError, match="not a LoRA"):
        read_lora(tmp_path / "mid.safetensors")
    save_file({"lora_unet_a_to_k.lora_down.weight": torch.ones(2, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraFileError, match="needs lora_down"):
        read_lora(tmp_path / "half.safetensors")
