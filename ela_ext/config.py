"""Every ELA setting in one typed object.

The UI, the infotext, the API args, the diffusers adapter and the tests all read and write
``ElaConfig``, so a new setting is added here once. Defaults carry a one-line reason each; the
numbers come from the benchmark sweep recorded in the README.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

OBJECTIVE_NAMES = ("ela", "ela_enhance", "attend_excite", "attend_excite_paper", "iou", "center_of_mass", "kl",
                   "cluster", "separate_enhance")
# "auto" (the default) picks the objective chosen for the denoiser's family on its benchmark model: a
# UNet (SD 1.x / 2.x / SDXL) reads cross-attention, an MM-DiT (SD3, Flux) joint attention.
AUTO_OBJECTIVE = "auto"
OBJECTIVE_CHOICES = (AUTO_OBJECTIVE,) + OBJECTIVE_NAMES
UNET_OBJECTIVE = "separate_enhance"
JOINT_OBJECTIVE = "attend_excite_paper"
LAYER_CHOICES = ("up_lowest", "up_lowest+mid", "mid", "up_all", "down_lowest")
BINARIZATION_CHOICES = ("otsu", "mean", "half")
JOINT_BLOCK_CHOICES = ("middle", "early", "all")


class ConfigError(ValueError):
    """A setting outside its allowed range; the message names the field."""


@dataclass(frozen=True)
class ElaConfig:
    # Off by default: the script runs on every API call, and off must change nothing.
    enabled: bool = False
    # "black cat | green frog": the last word of each phrase is the entity. Empty: detect.
    entities: str = ""
    # Eq. 7 weight of attenuation; the paper's Fig. 9: near 0 leaves overlap, near 1 starves.
    lambda_weight: float = 0.3
    # Anchor only early sampling: before, maps hold no layout; after, the layout is fixed.
    window_start: float = 0.0
    window_end: float = 0.3
    # Iterations per anchored step (Alg. 1 loops until the threshold; this bounds the cost).
    max_iterations: int = 5
    # Stop iterating once the anchoring loss (Eq. 7) is below this.
    loss_threshold: float = 0.05
    # RMS of one update to z_t at full noise, in units of the latent (gradient-normalised).
    step_size: float = 0.1
    # "auto": per family, by the rule "most images right with wrong shapes within 2 points of off".
    # UNets: Separate-and-Enhance; on two development sets it ties ela_enhance (10.1% against 10.2%
    # of 576 images) and keeps shapes (14.2%, off 16.3%) where ela_enhance misshapes (23.6%); its
    # objects are dirtier (README, "Choosing the defaults"). MM-DiTs: Attend-and-Excite as its paper
    # runs it, the one objective that does not hurt the benchmark MM-DiT (two development sets,
    # 37.5% against off's 33.9% of 192 images; Separate-and-Enhance 12.5%), and on the reported
    # prompts 32.1% -> 36.6% of 576 (benchmark/README.md).
    objective: str = AUTO_OBJECTIVE
    # Save and show the localisation masks: off, since it writes files per image.
    save_masks: bool = False
    # The paper's 16x16 first up-block with cross-attention (its Table 2).
    layers: str = "up_lowest"
    # Otsu splits each map (background, entity) without a tuned constant (method.md, step 1).
    binarization: str = "otsu"
    # MM-DiT (SD3, Flux): which joint-attention blocks are read (joint_attention.choose_blocks).
    # The middle third: on the benchmark MM-DiT the best of the three choices for each of the four
    # objectives tried (attend_excite_paper 41.7% both correct, all 28.1%, early 12.5%; off 32.3%).
    # UNets ignore it (they read ``layers``).
    joint_blocks: str = "middle"

    def for_denoiser(self, joint: bool) -> "ElaConfig":
        """This config with ``auto`` replaced by the objective of the denoiser's family: ``joint``
        for an MM-DiT's joint attention, else a UNet's cross-attention."""
        if self.objective != AUTO_OBJECTIVE:
            return self
        return dataclasses.replace(self, objective=JOINT_OBJECTIVE if joint else UNET_OBJECTIVE)

    def validated(self) -> "ElaConfig":
        """Return self, or raise ConfigError naming the first bad field and its range."""
        for name, (low, high) in FIELD_BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")
            if not low <= value <= high or value != value:
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value!r}")
        if not isinstance(self.max_iterations, int):
            raise ConfigError(f"max_iterations must be an integer, got {self.max_iterations!r}")
        if self.window_start >= self.window_end:
            raise ConfigError(
                f"window_start ({self.window_start}) must be below window_end ({self.window_end})")
        for name, choices in FIELD_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not isinstance(self.entities, str):
            raise ConfigError(f"entities must be a string, got {self.entities!r}")
        return self

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> "ElaConfig":
        """Positional values in API_FIELDS order (the WebUI's script args); missing ones default."""
        if len(args) > len(API_FIELDS):
            raise ConfigError(f"expected at most {len(API_FIELDS)} args ({', '.join(API_FIELDS)}), got {len(args)}")
        return cls.from_mapping(dict(zip(API_FIELDS, args)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ElaConfig":
        """Build from JSON/API values, coercing each to its field's type; unknown keys are errors."""
        unknown = set(values) - set(API_FIELDS)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**{name: _coerce(name, value) for name, value in values.items()}).validated()

    def as_args(self) -> list[Any]:
        return [getattr(self, name) for name in API_FIELDS]

    def to_infotext(self) -> str:
        """One compact string for the image's infotext: ``key=value`` pairs joined by ``;``.

        ``;`` and ``=`` keep the WebUI from JSON-quoting the value (it quotes ``,`` and ``:``).
        ``enabled`` is implied by the key's presence; ``save_masks`` is not a generation setting.
        """
        return ";".join(f"{INFOTEXT_KEYS[name]}={_format(getattr(self, name))}" for name in INFOTEXT_KEYS)

    @classmethod
    def from_infotext(cls, text: str) -> "ElaConfig":
        by_key = {key: name for name, key in INFOTEXT_KEYS.items()}
        values: dict[str, Any] = {"enabled": True}
        for part in text.strip().strip('"').split(";"):
            if not part.strip():
                continue
            key, sep, raw = part.partition("=")
            if not sep or key.strip() not in by_key:
                raise ConfigError(f"unreadable ELA infotext part {part!r}")
            values[by_key[key.strip()]] = raw.strip()
        return cls.from_mapping(values)


API_FIELDS = tuple(f.name for f in fields(ElaConfig))

# One-click settings for the UI: the cost/effect frontier of the README's Cost and Benchmark
# sections. A pass costs about one sampling step, so "fast" (one pass per anchored step over the
# 0-0.3 window) is about 1.3x a plain image against about 2.5x at the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "fast": {"max_iterations": 1},
}

FIELD_BOUNDS: dict[str, tuple[float, float]] = {
    "lambda_weight": (0.0, 1.0),
    "window_start": (0.0, 1.0),
    "window_end": (0.0, 1.0),
    "max_iterations": (1, 50),
    "loss_threshold": (0.0, 1.0),
    "step_size": (0.0, 2.0),
}

FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "objective": OBJECTIVE_CHOICES,
    "layers": LAYER_CHOICES,
    "binarization": BINARIZATION_CHOICES,
    "joint_blocks": JOINT_BLOCK_CHOICES,
}

FIELD_HELP: dict[str, str] = {
    "enabled": "Anchor each entity's cross-attention inside its own region during early sampling.",
    "entities": "Entities separated by |, the last word of each is the entity and the words before "
                "it its attributes (black cat | green frog). Empty: detect from the prompt.",
    "lambda_weight": "Weight of attenuation (attention outside the entity's region) against "
                     "concentration (Eq. 7). Too high can remove an entity.",
    "window_start": "First anchored step, as a fraction of the sampling steps.",
    "window_end": "Anchoring stops at this fraction of the sampling steps.",
    "max_iterations": "Most latent updates per anchored step.",
    "loss_threshold": "An anchored step stops updating once the loss is below this.",
    "step_size": "Size of one latent update, relative to the latent's scale at full noise.",
    "objective": "Loss that drives the update: auto (the default: separate_enhance, Separate-and-Enhance, "
                 "on SD 1.x / 2.x / SDXL; attend_excite_paper on SD3 / Flux), ela_enhance (ELA's Eq. 7 "
                 "plus a presence term), ela (Eq. 7 alone), or another related paper's objective.",
    "save_masks": "Save and show each image's attention maps and entity masks.",
    "layers": "Cross-attention layers whose maps are read (default: lowest-resolution up-block).",
    "binarization": "How maps are thresholded: the start-of-text map into background, each "
                    "entity's map into where it attends.",
    "joint_blocks": "MM-DiT models (SD3, Flux): joint-attention blocks whose text-to-image maps are read: "
                    "the middle third (default), the first third, or all.",
}

INFOTEXT_KEYS: dict[str, str] = {
    "entities": "entities",
    "lambda_weight": "lambda",
    "window_start": "start",
    "window_end": "end",
    "max_iterations": "iters",
    "loss_threshold": "threshold",
    "step_size": "step",
    "objective": "objective",
    "layers": "layers",
    "binarization": "binarize",
    "joint_blocks": "blocks",
}

_DEFAULTS = ElaConfig()


def _coerce(name: str, value: Any) -> Any:
    """Turn a JSON/infotext/Gradio value into the field's type, naming the field on failure."""
    default = getattr(_DEFAULTS, name)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.strip().lower() in ("true", "1")
            return bool(value)
        if isinstance(default, int):
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError(value)
            return int(as_float)
        if isinstance(default, float):
            return float(value)
        return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError):  # int(float("inf")) overflows
        raise ConfigError(f"{name} must be a {type(default).__name__}, got {value!r}") from None


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def replace(config: ElaConfig, **changes: Any) -> ElaConfig:
    """A validated copy with some fields changed (used by sweeps and the UI)."""
    return dataclasses.replace(config, **changes).validated()
