"""The ComfyUI nodes: translation only, as ``scripts/ela.py`` is for the WebUI.

``ElaAnchoring`` (MODEL, CLIP, the prompt -> MODEL, ELA_RUN) checks the settings and resolves the
entities in the prompt as the CLIP tokenises it, then returns a clone of the model carrying
``patch.AnchoringPatch``; off, or with anything that does not fit, it returns the model it got,
untouched, so every sampler runs plain. ``ElaReport`` (ELA_RUN, the sampler's LATENT -> IMAGE,
STRING) shows what the last run of that model did; the latent input only orders it after the
sampler. The inputs are generated from ``ElaConfig``'s bounds, choices, help and defaults, so a
setting is added in one place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ela_ext.config import FIELD_BOUNDS, FIELD_CHOICES, FIELD_HELP, ConfigError, ElaConfig
from ela_ext.entities import EntitySpecError, detect_entities, parse_spec

from .columns import ColumnsError, EncoderTokens, describe, joint_layout, resolve_joint_prompt, resolve_prompt
from .patch import AnchoringPatch
from .report import RunReport

RUN_TYPE = "ELA_RUN"
CATEGORY = "model_patches/ELA"
# Accordion settings besides enabled/entities; save_masks is the report node's IMAGE output here.
SETTINGS = ("lambda_weight", "window_start", "window_end", "max_iterations", "loss_threshold", "step_size",
            "objective", "layers", "binarization", "joint_blocks")
STEP = {"max_iterations": 1}
DEFAULTS = ElaConfig()


def setting_input(name: str) -> tuple:
    """A ComfyUI input spec for one ``ElaConfig`` field."""
    default, tooltip = getattr(DEFAULTS, name), FIELD_HELP[name]
    if name in FIELD_CHOICES:
        return (list(FIELD_CHOICES[name]), {"default": default, "tooltip": tooltip})
    low, high = FIELD_BOUNDS[name]
    kind = "INT" if isinstance(default, int) else "FLOAT"
    return (kind, {"default": default, "min": low, "max": high, "step": STEP.get(name, 0.01), "tooltip": tooltip})


def clip_encoders(clip: Any) -> list[EncoderTokens]:
    """The model's CLIP text encoders (``l``; ``h``; ``g`` and ``l``) with their end and pad ids.
    Raises ColumnsError for an encoder that is not a 77-token CLIP (Llama and others: families
    this pack does not anchor; SD3's and Flux's T5 go through ``joint_layout``)."""
    encoders = []
    for key in clip.tokenize(""):
        tokenizer = getattr(clip.tokenizer, f"clip_{key}", None)
        if tokenizer is None or getattr(tokenizer, "max_length", None) != 77:
            raise ColumnsError(f"text encoder {key!r} is not a 77-token CLIP (ELA anchors SD 1.x, SD 2.x and SDXL)")
        encoders.append(EncoderTokens(key, int(tokenizer.end_token), int(tokenizer.pad_token)))
    return encoders


class ElaAnchoring:
    """Patch a model so that its samplers anchor the prompt's entities (ELA, ICML 2024)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the sampler uses."}),
            "clip": ("CLIP", {"tooltip": "The CLIP that encodes the sampler's positive prompt."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The positive prompt, exactly as given to the sampler's CLIP Text Encode."}),
            "enabled": ("BOOLEAN", {"default": True, "tooltip": "Off returns the model untouched."}),
            "entities": ("STRING", {"default": "", "tooltip": FIELD_HELP["entities"]}),
            **{name: setting_input(name) for name in SETTINGS},
        }}

    RETURN_TYPES = ("MODEL", RUN_TYPE)
    RETURN_NAMES = ("model", "ela_run")
    OUTPUT_TOOLTIPS = ("The model with anchoring (or the input model when off or when the entities do not fit).",
                       "Connect to ELA Report, with the sampler's latent, for the log and the mask grid.")
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Entity Localization and Anchoring: during early sampling, keeps each entity's "
                   "cross-attention (SD 1.x, 2.x, SDXL) or joint text-image attention (SD3, Flux) in its own "
                   "region (KSampler, KSamplerAdvanced, SamplerCustom).")

    def patch(self, model, clip, text, enabled, entities, **settings):
        report = RunReport(enabled)
        if not enabled:
            return {"ui": {"text": ["ELA off"]}, "result": (model, report)}
        try:
            config = ElaConfig.from_mapping({"enabled": True, "entities": entities, **settings})
            phrases = parse_spec(entities) or detect_entities(text)
            layout = joint_layout(clip)
            columns = (resolve_joint_prompt(phrases, text, clip.tokenize, layout) if layout is not None
                       else resolve_prompt(phrases, text, clip.tokenize, clip_encoders(clip)))
        except (ConfigError, EntitySpecError, ColumnsError, ValueError) as error:
            report.warn_node(f"{error}: image left unanchored")
            return {"ui": {"text": [report.text()]}, "result": (model, report)}
        prompt_cond = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)["cond"]
        patched = AnchoringPatch(config, columns, prompt_cond, report).apply(model)
        return {"ui": {"text": [f"ELA entities: {describe(columns)}"]}, "result": (patched, report)}


def image_tensor(picture: Image.Image) -> torch.Tensor:
    """A PIL picture as ComfyUI's IMAGE: (1, height, width, 3) floats in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


class ElaReport:
    """The last sampling run of an ELA-patched model: log text and mask grid."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ela_run": (RUN_TYPE, {"tooltip": "From Entity Anchoring (ELA)."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output: the report is read after it ran."}),
        }}

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("mask_grid", "log")
    OUTPUT_TOOLTIPS = ("Each entity's attention at the first anchored step, its mask, and its attention "
                       "at the last (a blank 64x64 image when nothing was anchored).",
                       "Steps, updates, first and last loss, each step's losses, warnings.")
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def report(self, ela_run: RunReport, samples):
        grid = ela_run.grid or Image.new("RGB", (64, 64), "white")
        text = ela_run.text()
        return {"ui": {"text": [text]}, "result": (image_tensor(grid), text)}


NODE_CLASS_MAPPINGS = {"ElaAnchoring": ElaAnchoring, "ElaReport": ElaReport}
NODE_DISPLAY_NAME_MAPPINGS = {"ElaAnchoring": "Entity Anchoring (ELA)", "ElaReport": "ELA Report (log, mask grid)"}
