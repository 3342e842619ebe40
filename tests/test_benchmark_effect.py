"""The effect benchmark: paired counting by hand, and an end-to-end run on the bundled model."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ela_ext.config import ElaConfig
from ela_ext.lora_file import save_lora

from benchmark.commands.effect import (Lora, SettingResult, main, paired, parse_seeds, print_markdown, print_table,
                                       run_key, run_setting, sampling_backend, summary, worker_pool)
from benchmark.judge.evaluate import MERGED, MISSING, OK, WRONG_COLOUR
from benchmark.models.model import load_model
from benchmark.models.scenes import PALETTE, render
from benchmark.paths import BUNDLED_WEIGHTS
from benchmark.studies.kept import main as kept_main, right_off


def test_paired_counts_and_rates_by_hand():
    off = SettingResult("off", [[OK, OK], [OK, MISSING], [MERGED, MERGED], [OK, WRONG_COLOUR]], seconds=2.0)
    ela = SettingResult("ela", [[OK, MISSING], [OK, OK], [OK, OK], [OK, WRONG_COLOUR]], seconds=5.0)
    assert paired(off, ela) == (2, 1)
    rows = summary([off, ela], ["p0", "p1"])  # no images kept: no cleanliness
    assert rows[0]["both_correct"] == 0.25 and rows[0][MERGED] == 0.25 and rows[0][MISSING] == 0.25
    assert rows[1]["both_correct"] == 0.5 and rows[1]["time_vs_off"] == 2.5
    assert rows[0]["apart"] == 0.5 and rows[1]["apart"] == 0.75  # no object missing or merged
    assert (rows[1]["fixed"], rows[1]["broken"]) == (2, 1)
    assert rows[1]["kept"] == 0.0  # the one image right off is broken
    table = io.StringIO()
    print_markdown(rows, table)
    assert "| ela | 50.0% | 0.0% | 25.0% | 0.0% | 25.0% | 0.0% | - | - / - px | - | 2.50x | 2 / 1 |" in table.getvalue()
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("5,9") == [5, 9] and parse_seeds("7:9") == [7, 8]


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_end_to_end_on_two_prompts_and_two_seeds(capsys, tmp_path):
    argv = ["--families", "held_out,three", "--prompts-per-family", "1", "--seeds", "2", "--steps", "8",
            "--settings", "off,default,random,separate_enhance", "--json", "--cache", str(tmp_path)]
    main(argv)
    report = json.loads(capsys.readouterr().out)
    assert set(report["tables"]) == {"held_out", "three", "all"}
    rows = report["tables"]["all"]
    assert [row["setting"] for row in rows] == ["off", "default", "random", "separate_enhance"]
    assert all(row["images"] == 4 for row in rows)
    assert {"fixed", "broken", "time_vs_off", "kept", "pixel_change", "centroid_shift"} <= set(rows[1])
    assert rows[0]["iou_first"] is None and 0 <= rows[1]["iou_first"] <= 1  # masks only where anchored
    assert len(list(tmp_path.glob("*.pkl"))) == 8  # each family x setting kept: a rerun resumes
    main(argv)
    assert json.loads(capsys.readouterr().out)["tables"] == report["tables"]


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_single_object_prompts_are_sampled_plain_and_kept_out_of_the_pooled_table(capsys):
    main(["--families", "held_out,seen,single", "--prompts-per-family", "1", "--seeds", "2", "--steps", "4",
          "--settings", "off,default,random", "--json"])
    tables = json.loads(capsys.readouterr().out)["tables"]
    assert set(tables) == {"held_out", "seen", "single", "all"}
    assert all(row["images"] == 4 for row in tables["all"])  # two-object families only
    off, default, control = tables["single"]
    assert default["pixel_change"] == 0.0 and control["pixel_change"] == 0.0  # the off images exactly
    assert default["both_correct"] == off["both_correct"] and default["images"] == 2
    assert tables["held_out"][1]["pixel_change"] > 0  # the two-object prompt is anchored


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_worker_processes_give_the_same_results_in_prompt_order():
    prompts = ["a red circle and a blue square", "a star and a triangle", "a green cross and a white star"]
    model = load_model(BUNDLED_WEIGHTS)
    with worker_pool(BUNDLED_WEIGHTS, 2) as pool:
        for setting in ("ela", "random"):  # the control's directions are seeded per prompt index
            here = run_setting(model, prompts, [0, 1], setting, ElaConfig(), 6, 5.0)
            there = run_setting(None, prompts, [0, 1], setting, ElaConfig(), 6, 5.0, pool)
            assert there.statuses == here.statuses and len(there.statuses) == 6
            assert there.seconds > 0


def test_clean_column_judges_the_kept_images_again_prompt_by_prompt():
    clean, truth = render([("square", "blue", (2, 2, 14, 14)), ("circle", "red", (18, 16, 30, 28))])
    mixed = clean.copy()
    mixed[truth[0].mask & (np.arange(32) >= 10)[None, :]] = PALETTE["white"]  # a third of the square white
    alone = render([("circle", "red", (18, 16, 30, 28))])[0]
    # two prompts x two seeds, prompt-major: the second prompt asks for the circle only
    prompts = ["a blue square and a red circle", "a red circle"]
    result = SettingResult("x", [[OK, OK], [OK, OK], [OK], [OK]], images=[clean, mixed, alone, alone])
    assert summary([result], prompts)[0]["clean"] == 5 / 6  # of the 6 found objects, the mixed square is dirty
    missing = SettingResult("x", [[MISSING, OK], [OK]], images=[alone, clean])
    assert summary([missing], prompts)[0]["clean"] == 1.0  # a missing object is not scored
    table = io.StringIO()
    print_table(summary([result], prompts), table)
    assert "83.3%" in table.getvalue().splitlines()[1]


def test_run_key_without_a_lora_is_the_key_cached_runs_were_stored_under(tmp_path):
    weights = Path("weights/model.safetensors")
    config = ElaConfig(objective="ela_enhance")
    assert run_key(["a circle and a square"], [0, 1], "off", config, 20, 5.0, weights) == (
        ["a circle and a square"], [0, 1], "off", "", 20, 5.0, "weights/model.safetensors")
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"one")
    keyed = run_key(["a circle and a square"], [0, 1], "off", config, 20, 5.0, weights, Lora(lora, 0.5))
    assert keyed[:7] == run_key(["a circle and a square"], [0, 1], "off", config, 20, 5.0, weights)
    assert keyed[7] == (hashlib.sha256(b"one").hexdigest(), 0.5)


def _tiny_lora(path: Path) -> Path:
    """A rank-2 LoRA on every cross-attention key projection of the bundled model, as a kohya file."""
    generator = torch.Generator().manual_seed(0)
    unet = load_model(BUNDLED_WEIGHTS).unet
    deltas = {name: (torch.randn(2, module.in_features, generator=generator) * 0.3,
                     torch.randn(module.out_features, 2, generator=generator) * 0.3, 2.0)
              for name, module in unet.named_modules() if name.endswith("attn2.to_k")}
    return save_lora(path, deltas, "sd1")


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_a_lora_file_applies_to_every_setting_at_its_strength(tmp_path, capsys):
    path = _tiny_lora(tmp_path / "tiny.safetensors")
    prompts, seeds = ["a red circle and a blue square"], [0, 1]

    def images(setting, lora, workers=1):
        with sampling_backend(BUNDLED_WEIGHTS, workers, lora) as (model, pool):
            return run_setting(model, prompts, seeds, setting, ElaConfig(), 6, 5.0, pool).images

    plain = images("off", None)
    assert all(np.array_equal(a, b) for a, b in zip(images("off", Lora(path, 0.0)), plain))
    merged = images("off", Lora(path, 1.0))
    assert not any(np.array_equal(a, b) for a, b in zip(merged, plain))
    assert all(np.array_equal(a, b) for a, b in zip(images("off", Lora(path, 1.0), workers=2), merged))
    anchored = images("ela_enhance", Lora(path, 1.0))
    assert not any(np.array_equal(a, b) for a, b in zip(anchored, images("ela_enhance", None)))

    argv = ["--families", "held_out", "--prompts-per-family", "1", "--seeds", "1", "--steps", "4", "--settings",
            "off", "--json", "--cache", str(tmp_path / "cache"), "--lora", str(path)]
    strengths = []
    for run in (argv, argv + ["--lora-strength", "0.5"], argv[:-2]):
        main(run)
        strengths.append(json.loads(capsys.readouterr().out).get("lora", {}).get("strength"))
    assert strengths == [1.0, 0.5, None]
    assert len(list((tmp_path / "cache").glob("*.pkl"))) == 3  # a key per strength, and one without


def test_sweep_grid_is_typed_like_the_config():
    from benchmark.studies.sweep import parse_grid

    assert parse_grid("lambda_weight=0.1,0.5;max_iterations=3;binarization=mean") == [
        ("lambda_weight", 0.1), ("lambda_weight", 0.5), ("max_iterations", 3), ("binarization", "mean")]


def test_right_off_maps_prompt_major_images_to_their_seeds():
    off = SettingResult("off", [[OK, OK], [OK, MISSING], [MERGED, OK], [OK, OK], [OK, OK], [MISSING, OK]])
    assert right_off(off, ["p0", "p1"], [7, 8, 9]) == {0: [7], 1: [7, 8]}


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_kept_runs_each_setting_on_the_right_off_images_only(capsys, tmp_path):
    # The reported seen set's 8th prompt is right off at seeds 0 and 1 (runs/ of the README's table).
    kept_main(["--families", "seen", "--prompt-seed", "0", "--prompts-per-family", "8", "--seeds", "0,1",
               "--grid", "max_iterations=1", "--settings", "default,random", "--cache", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    right = int(lines[0].split(": ")[1].split()[0])
    assert lines[0].startswith("8 prompts x 2 seeds") and right >= 1
    rows = [line.split() for line in lines[1:]]
    assert [(row[0], row[1]) for row in rows] == [("max_iterations=1", "default"), ("max_iterations=1", "random")]
    assert all(0 <= int(row[3]) <= right and int(row[5]) == right for row in rows)


@pytest.mark.skipif(not BUNDLED_WEIGHTS.exists(), reason=f"no bundled weights at {BUNDLED_WEIGHTS}")
def test_plain_off_pairs_the_lora_rows_with_the_model_without_it(tmp_path, capsys):
    path = _tiny_lora(tmp_path / "tiny.safetensors")
    argv = ["--families", "held_out", "--prompts-per-family", "1", "--seeds", "2", "--steps", "4", "--settings",
            "off", "--json", "--cache", str(tmp_path / "cache"), "--lora", str(path), "--plain-off"]
    main(argv + ["--lora-strength", "0"])
    rows = json.loads(capsys.readouterr().out)["tables"]["held_out"]
    assert [row["setting"] for row in rows] == ["off", "lora off"]
    assert (rows[1]["fixed"], rows[1]["broken"], rows[1]["pixel_change"]) == (0, 0, 0.0)  # strength 0: the same images
    main(argv)
    rows = json.loads(capsys.readouterr().out)["tables"]["held_out"]
    assert rows[1]["setting"] == "lora off" and rows[1]["pixel_change"] > 0
