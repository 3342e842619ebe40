"""The real-scale cost benchmark end to end on a tiny latent: SD 1.5's and SDXL's block layouts (every
width divided by 16, blocks, layer and head counts kept; SDXL with its text/time conditioning),
whole images off and on through the adapter, time and peak memory from forked children."""

import pytest
import torch

from benchmark.commands.real_scale import format_row, run_benchmark, unet_config
from ela_ext.capture import find_cross_attention_layers

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def test_sdxl_config_is_sdxls_layout():
    config = unet_config("sdxl")
    assert config["block_out_channels"] == (320, 640, 1280) and config["cross_attention_dim"] == 2048
    assert config["transformer_layers_per_block"] == (1, 2, 10)
    assert config["projection_class_embeddings_input_dim"] == 1280 + 6 * config["addition_time_embed_dim"]


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_real_scale_mode_runs_off_and_on_end_to_end(layout):
    rows = run_benchmark(layout, latent=8, steps=4, dtype=torch.float32, device="cpu",
                         settings=["iter1", "iter2"], divisor=16)
    assert [row.setting for row in rows] == ["iter1", "iter2"]
    for row, iterations in zip(rows, (1, 2)):
        assert row.warnings == () and row.finite
        assert row.anchored_steps == 2  # window 0-0.3 of 4 steps: steps 0 and 1
        assert 0 < row.updates <= 2 * iterations
        assert row.off_s > 0 and row.on_s > 0 and row.peak_off_mib > 0 and row.peak_on_mib > 0
        assert format_row(row).startswith(f"| {layout} | 8x8 | float32 | cpu | iter{iterations} |")


def test_sdxls_lowest_up_level_has_its_thirty_layers():
    from benchmark.commands.real_scale import build_unet

    unet = build_unet("sdxl", 16, torch.float32, "cpu")
    names = [name for name, _ in find_cross_attention_layers(unet)]
    assert len(names) == 30 and all(name.startswith("up_blocks.0.") for name in names)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_training_step_cost_runs_on_both_layouts(layout):
    from benchmark.commands.real_scale import training_step_cost

    cost = training_step_cost(layout, latent=8, steps=1, batch=2, divisor=16)
    assert cost["train_step_s"] > 0 and cost["sampling_step_s"] > 0
