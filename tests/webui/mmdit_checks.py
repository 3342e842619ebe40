"""What the MM-DiT host tests (test_mmdit_a1111.py: SD3 in AUTOMATIC1111; test_mmdit_forge.py:
SD3.5 and Flux in Forge) check in every host and family, so the hosts are held to the same
assertions. The tiny models come from ``shared/webui-mmdit`` (random weights, noise images):
these check mechanics: off is the image of a host without the extension, on anchors with a falling
loss (the grad pass reads the joint attention through the host's own functions, which are the
host's again afterwards), where a model or sampler cannot be anchored ELA says so and gives
the off image, and the X/Y/Z plot's block axis sets each cell's blocks.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ela_ext.config import JOINT_BLOCK_CHOICES
from ela_ext.joint_attention import choose_blocks
from webui_host import (SCRIPT_TITLE, SPEC, WebUI, assert_no_failure, ela_args, hook_counts, infotext, pixels,
                        xyz_args, xyz_axis, xyz_cells)


def payload(**fields) -> dict:
    """A small, fast generation on a tiny MM-DiT: 128 px is an 8x8 grid of image tokens."""
    return {"prompt": "a black cat and a green frog", "negative_prompt": "", "seed": 1234, "sampler_name": "Euler",
            "steps": 6, "width": 128, "height": 128, "cfg_scale": 5, **fields}


def require_files(root: Path, files: list[str], how: str) -> None:
    missing = [name for name in files if not (root / name).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in {root}: {how}")


def assert_off_is_the_image_without_the_extension(server: WebUI, request: dict, absent: str) -> None:
    """No ELA entry and ELA sent disabled: the same bytes as the host without the extension, and
    no ELA key in the infotext."""
    no_entry = server.txt2img(**request)
    disabled = server.txt2img(**request, alwayson_scripts={SCRIPT_TITLE: {"args": [False, SPEC]}})
    assert no_entry["images"][0] == absent
    assert disabled["images"] == no_entry["images"]
    assert "ELA" not in infotext(no_entry) and "ELA" not in infotext(disabled)


def assert_anchors_with_a_falling_loss(server: WebUI, request: dict, **changes) -> dict:
    """ELA on (window 0-0.5 of 6 steps: steps 0-2) changes the pixels, anchors each window step with
    updates and a loss that falls at the first step and rises at none, reports it in the infotext without a failure, and leaves every
    host function and hook as it was. ``changes``: ELA settings besides ``ela_args``'. The objective
    is Separate-and-Enhance's unless changed: its loss falls step by step on the tiny random models,
    where the MM-DiT default's (``attend_excite_paper``, a max over tokens) can go back up by 1e-4
    within a step; the default is held to what it resolves to by ``assert_auto_is_the_mmdit_objective``."""
    hooks_before = hook_counts(server)
    off = server.txt2img(**request)
    on = server.txt2img(**request, **ela_args(**{"objective": "separate_enhance", **changes}))
    assert hook_counts(server) == hooks_before
    assert_no_function_replaced(server)
    text = infotext(on)
    assert f"ELA: entities={SPEC};" in text and "ELA log: steps=3;updates=" in text, text
    assert_no_failure(text)
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    steps = server.get("/ela/v1/debug/calls")["steps"]
    assert [log["step"] for log in steps] == [0, 1, 2], steps
    # The tiny random models' loss can reach its floor after the first step (e.g. exactly 0.125
    # with one block read): there it must not rise.
    assert steps[0]["losses"][-1] < steps[0]["losses"][0], steps
    for log in steps:
        assert log["updates"] >= 1 and log["losses"][-1] <= log["losses"][0] + 1e-6, log
    return on


def assert_auto_is_the_mmdit_objective(server: WebUI, request: dict) -> None:
    """The default objective, ``auto``, anchors an MM-DiT as ``attend_excite_paper`` does (the
    same pixels), not as the UNets' ``separate_enhance``, and the infotext keeps ``auto``."""
    auto = server.txt2img(**request, **ela_args())
    assert ";objective=auto;" in infotext(auto), infotext(auto)
    assert_no_failure(infotext(auto))
    chosen = server.txt2img(**request, **ela_args(objective="attend_excite_paper"))
    other = server.txt2img(**request, **ela_args(objective="separate_enhance"))
    assert pixels(auto["images"][0]) == pixels(chosen["images"][0])
    assert pixels(auto["images"][0]) != pixels(other["images"][0])


def assert_plain_with_a_message(server: WebUI, request: dict, message: str) -> dict:
    """ELA on where the model cannot be anchored: the settings and ``message`` in the infotext
    (``ELA warnings``), the pixels of ELA off, and no hook or replaced function left."""
    hooks_before = hook_counts(server)
    off = server.txt2img(**request)
    on = server.txt2img(**request, **ela_args())
    assert hook_counts(server) == hooks_before
    assert f"ELA: entities={SPEC};" in infotext(on)
    assert message in infotext(on), infotext(on)
    assert "ELA log" not in infotext(on)
    assert pixels(on["images"][0]) == pixels(off["images"][0])
    return on


def assert_no_function_replaced(server: WebUI) -> None:
    """The debug route lists the host's joint-attention functions (``modules.models.sd3.mmdit.*``,
    ``backend.nn.*``): all are the host's own."""
    functions = {name: count for name, count in hook_counts(server).items()
                 if name.startswith(("modules.models.", "backend.nn."))}
    assert functions and not any(functions.values()), functions


def assert_xyz_enabled_and_block_axes(server: WebUI, request: dict, joint_blocks: int) -> None:
    """The X/Y/Z plot, the accordion off, ``[ELA] Enabled`` (False, True) against ``[ELA] MM-DiT
    blocks`` (every choice): the off cells are the plain image, and each on cell is the image the
    accordion gives with its block choice, names it in its infotext, anchors, and differs from
    another on cell exactly where the two read other blocks (a model with ``joint_blocks``
    blocks: with 2, ``middle`` and ``all`` both read blocks 0 and 1)."""
    enabled = xyz_axis(server, "[ELA] Enabled")
    blocks = xyz_axis(server, "[ELA] MM-DiT blocks")
    grid = server.txt2img(**request, **ela_args(enabled=False),
                          **xyz_args((enabled, "", ["False", "True"]), (blocks, "", list(JOINT_BLOCK_CHOICES))))
    cells = xyz_cells(grid)
    assert len(cells) == 2 * len(JOINT_BLOCK_CHOICES)
    plain = pixels(server.txt2img(**request)["images"][0])
    off_cells = [image for image, text in cells if "ELA" not in text]
    assert len(off_cells) == len(JOINT_BLOCK_CHOICES) and all(pixels(image) == plain for image in off_cells)
    on = {}
    for choice in JOINT_BLOCK_CHOICES:
        ((image, text),) = [(image, text) for image, text in cells if f";blocks={choice}" in text]
        assert f"ELA: entities={SPEC};" in text and "ELA log: steps=3;" in text, text
        assert_no_failure(text)
        assert pixels(image) == pixels(server.txt2img(**request, **ela_args(joint_blocks=choice))["images"][0])
        on[choice] = pixels(image)
    assert all(image != plain for image in on.values())
    for a, b in itertools.combinations(JOINT_BLOCK_CHOICES, 2):
        same_blocks = choose_blocks(joint_blocks, a) == choose_blocks(joint_blocks, b)
        assert (on[a] == on[b]) == same_blocks, (a, b)
