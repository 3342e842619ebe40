"""ELA axes for the WebUI's built-in X/Y/Z plot script (``scripts/xyz_grid.py``).

Registered as established extensions do (sd-webui-controlnet, sd-dynamic-thresholding): find the
``xyz_grid`` module among ``scripts.scripts_data`` and append ``AxisOption``s to its
``axis_options`` before its ``ui()`` copies them for txt2img and img2img. A cell's value is put on
that cell's processing object (``ela_axis_values``); the ELA script reads it in ``process`` over
the accordion's values, so it overrides them for that cell only and lands in its infotext.

The X/Y/Z script copies ``p`` shallowly for each cell, so an axis writes a NEW dict onto the
cell's copy instead of updating one that the other cells share.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from modules import script_callbacks, scripts

from ela_ext.config import JOINT_BLOCK_CHOICES, LAYER_CHOICES, OBJECTIVE_CHOICES

AXIS_VALUES_ATTRIBUTE = "ela_axis_values"
AXIS_PREFIX = "[ELA] "
logger = logging.getLogger("ela")

# (field, value type, choices) in the order the axes are listed; a type of str with choices is a
# dropdown axis, the others are typed in (numbers accept the X/Y/Z ranges, "0.1-0.5 (+0.1)").
# New axes go last: the API names an axis by its index in the list. Layers are read by UNets only
# and MM-DiT blocks by MM-DiTs only, so on the other family those cells are the same image.
AXES: tuple[tuple[str, type, Optional[tuple[str, ...]]], ...] = (
    ("enabled", str, ("False", "True")),
    ("entities", str, None),
    ("lambda_weight", float, None),
    ("window_start", float, None),
    ("window_end", float, None),
    ("max_iterations", int, None),
    ("step_size", float, None),
    ("objective", str, OBJECTIVE_CHOICES),
    ("loss_threshold", float, None),
    ("layers", str, LAYER_CHOICES),
    ("joint_blocks", str, JOINT_BLOCK_CHOICES),
)


def axis_values(p) -> dict[str, Any]:
    """The ELA settings the X/Y/Z plot chose for this cell (empty outside a plot)."""
    return getattr(p, AXIS_VALUES_ATTRIBUTE, {})


def _apply(field: str):
    def apply(p, value, _values) -> None:
        setattr(p, AXIS_VALUES_ATTRIBUTE, {**axis_values(p), field: value})
    return apply


def find_xyz_grid():
    """The loaded ``xyz_grid`` script module, or None (it is a built-in script, but can be removed)."""
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") and hasattr(data, "module"):
            return data.module
    return None


def add_axes(labels: dict[str, str]) -> bool:
    """Append the ELA axes (labelled ``[ELA] <labels[field]>``) unless they are there already;
    False when no X/Y/Z module is loaded yet."""
    xyz_grid = find_xyz_grid()
    if xyz_grid is None:
        return False
    present = {option.label for option in xyz_grid.axis_options}
    for field, value_type, choices in AXES:
        label = AXIS_PREFIX + labels[field]
        if label in present:
            continue
        options = {"choices": (lambda listed=choices: list(listed))} if choices else {}
        xyz_grid.axis_options.append(xyz_grid.AxisOption(label, value_type, _apply(field), **options))
    return True


def add_axes_when_loaded(labels: dict[str, str]) -> None:
    """Add the axes now if the X/Y/Z module is already loaded, and again before the UI is built.

    Both are needed: with ``--nowebui`` the API builds the scripts' UI (and so the X/Y/Z axis list
    the API's axis indices refer to) before ``on_before_ui`` fires, while a script loaded before
    ``xyz_grid.py`` only finds it from ``on_before_ui``. Adding is idempotent.
    """
    add_axes(labels)

    def before_ui() -> None:
        if not add_axes(labels):
            logger.warning("ELA: the X/Y/Z plot script is not loaded: no ELA axes")
    script_callbacks.on_before_ui(before_ui)
