"""The WebUI script: the "Entity Anchoring (ELA)" accordion in txt2img and img2img (and, registered
here, the "ELA training" tab and the HTTP routes).

Translation only: the UI's values become an ``ElaConfig``, the sampler is wrapped by
``ela_webui.sampling``, the results go to the infotext, the gallery and the output folder. The
method lives in ``ela_ext``. Off (the default, and what every API call without our args gets)
touches nothing: no wrapper, no infotext key.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import gradio as gr

from modules import images, script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from ela_ext.config import (API_FIELDS, BINARIZATION_CHOICES, FIELD_BOUNDS, FIELD_HELP, JOINT_BLOCK_CHOICES,
                            LAYER_CHOICES, OBJECTIVE_CHOICES, PRESETS, ConfigError, ElaConfig)
from ela_webui import debug, routes, training_ui, xyz
from ela_webui.generation import ElaRun

TITLE = "Entity Anchoring (ELA)"
INFOTEXT_KEY = "ELA"
RUN_ATTRIBUTE = "ela_run"
logger = logging.getLogger("ela")

SLIDER_STEPS = {"lambda_weight": 0.05, "window_start": 0.05, "window_end": 0.05, "max_iterations": 1,
                "loss_threshold": 0.01, "step_size": 0.01}
LABELS = {"enabled": "Enabled", "entities": "Entities", "lambda_weight": "Lambda (attenuation weight)",
          "window_start": "Window start", "window_end": "Window end", "max_iterations": "Iterations per step", "loss_threshold": "Loss threshold",
          "step_size": "Step size", "objective": "Objective", "save_masks": "Save mask grids",
          "layers": "Layers", "binarization": "Binarisation",
          "joint_blocks": "MM-DiT blocks"}

PRESET_LABELS = {"defaults": "Defaults", "fast": "Fast: 1 pass per step (~1.3x time)"}
PRESET_HELP = {"defaults": "Every slider back to its default.",
               "fast": "One gradient pass per anchored step instead of up to five: about 1.3x the time of "
                       "a plain image instead of about 2.5x (see the README's Cost and Benchmark)."}
DETECT_HELP = "Fill Entities with the entities detected in the prompt (what an empty Entities field uses)."
TOKENS_HELP = ("The prompt's tokens as the model reads them: bold = entity, dashed = attribute. "
               "Click a word to add it to Entities as a new entity, or to remove it from there.")


def infotext_reader(name: str):
    """Read one field back from a pasted infotext's ``ELA`` value; None leaves the field as is."""
    def read(params: dict):
        if name == "enabled":
            return INFOTEXT_KEY in params
        if INFOTEXT_KEY not in params:
            return None
        try:
            return getattr(ElaConfig.from_infotext(params[INFOTEXT_KEY]), name)
        except ConfigError:
            return None
    return read


class ElaScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        defaults = ElaConfig()
        components = {}
        with InputAccordion(False, label=TITLE, elem_id=self.elem_id("enabled")) as components["enabled"]:
            with gr.Row():
                components["entities"] = gr.Textbox(
                    label=LABELS["entities"], placeholder="black cat | green frog   (empty: detect from the prompt)",
                    elem_id=self.elem_id("entities"), scale=4)
                gr.Button("Detect from prompt", elem_id=self.elem_id("detect"), scale=1)
            gr.HTML(elem_id=self.elem_id("tokens"), elem_classes=["ela-tokens"])
            with gr.Row():
                for name in ("lambda_weight", "window_start", "window_end"):
                    components[name] = self._slider(name, defaults)
            with gr.Row():
                for name in ("max_iterations", "loss_threshold", "step_size"):
                    components[name] = self._slider(name, defaults)
            with gr.Row():
                components["objective"] = gr.Dropdown(
                    label=LABELS["objective"], choices=list(OBJECTIVE_CHOICES), value=defaults.objective,
                    elem_id=self.elem_id("objective"))
                components["save_masks"] = gr.Checkbox(
                    label=LABELS["save_masks"], value=defaults.save_masks, elem_id=self.elem_id("save_masks"))
            with gr.Row():
                for preset in PRESETS:
                    self._preset_button(preset, components)
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    components["layers"] = gr.Dropdown(
                        label=LABELS["layers"], choices=list(LAYER_CHOICES), value=defaults.layers,
                        elem_id=self.elem_id("layers"))
                    components["binarization"] = gr.Dropdown(
                        label=LABELS["binarization"], choices=list(BINARIZATION_CHOICES),
                        value=defaults.binarization, elem_id=self.elem_id("binarization"))
                    components["joint_blocks"] = gr.Dropdown(
                        label=LABELS["joint_blocks"], choices=list(JOINT_BLOCK_CHOICES),
                        value=defaults.joint_blocks, elem_id=self.elem_id("joint_blocks"))
            # javascript/ela.js turns this into title= tooltips on the fields above.
            help_by_id = {self.elem_id(name): FIELD_HELP[name] for name in API_FIELDS}
            help_by_id[self.elem_id("detect")] = DETECT_HELP
            help_by_id[self.elem_id("tokens")] = TOKENS_HELP
            help_by_id.update({self.elem_id(f"preset_{preset}"): PRESET_HELP[preset] for preset in PRESETS})
            gr.HTML(f"<div class='ela-help' hidden data-help='{_attribute(json.dumps(help_by_id))}'></div>")
        self.infotext_fields = [(components[name], infotext_reader(name)) for name in API_FIELDS]
        return [components[name] for name in API_FIELDS]

    def _preset_button(self, preset: str, components: dict) -> None:
        """A button that sets the sliders and the objective to a preset's values (the rest of them
        to the defaults): the cheaper setting of the cost/effect frontier is one click away."""
        values = dataclasses.replace(ElaConfig(), **PRESETS[preset])
        names = list(SLIDER_STEPS) + ["objective"]
        button = gr.Button(PRESET_LABELS[preset], elem_id=self.elem_id(f"preset_{preset}"), size="sm")
        button.click(fn=lambda: [getattr(values, name) for name in names],
                     outputs=[components[name] for name in names])

    def _slider(self, name: str, defaults: ElaConfig):
        low, high = FIELD_BOUNDS[name]
        return gr.Slider(label=LABELS[name], minimum=low, maximum=high, step=SLIDER_STEPS[name],
                         value=getattr(defaults, name), elem_id=self.elem_id(name))

    def process(self, p, *args):
        """Read the settings (an X/Y/Z plot cell's ELA axes over the accordion's); when on, put
        the run on ``p`` and its infotext keys on the images.

        The keys go into a copy of ``extra_generation_params``: the X/Y/Z plot's cells share one
        dict, and an ELA-on cell must not leave its keys on the next, ELA-off, cell.
        """
        axis_values = xyz.axis_values(p)
        try:
            config = ElaConfig.from_args(args)
            if axis_values:
                config = ElaConfig.from_mapping({**dict(zip(API_FIELDS, config.as_args())), **axis_values})
        except ConfigError as error:
            asked = axis_values.get("enabled", args[0] if args else False)
            if str(asked).strip().lower() in ("true", "1"):  # the API may send "true"
                logger.warning("ELA: %s: generating without ELA", error)
                p.extra_generation_params = {**p.extra_generation_params,
                                             f"{INFOTEXT_KEY} warnings": f"{error}: generated without ELA"}
            return
        if not config.enabled:
            return
        run = ElaRun(config)
        setattr(p, RUN_ATTRIBUTE, run)
        if debug.ENABLED:
            debug.start_generation()
        p.extra_generation_params = {**p.extra_generation_params, INFOTEXT_KEY: run.settings_infotext,
                                     f"{INFOTEXT_KEY} log": run.log_infotext,
                                     f"{INFOTEXT_KEY} warnings": run.warnings_infotext}

    def process_before_every_sampling(self, p, *args, **kwargs):
        """Called once ``p.sampler`` exists, for every batch and again for its hires pass."""
        run = getattr(p, RUN_ATTRIBUTE, None)
        if run is None:
            return
        try:
            run.start_pass(p)
        except Exception as error:  # noqa: BLE001 - the host would swallow it without a trace
            for position in range(len(p.prompts)):
                run.warn(p.iteration * p.batch_size + position,
                         f"{type(error).__name__}: {error}: image left unanchored")
            logger.exception("ELA: could not prepare anchoring")

    def postprocess(self, p, processed, *args):
        """Mask grids: shown after the images, and saved beside them when the images are saved."""
        run = getattr(p, RUN_ATTRIBUTE, None)
        if run is None or not run.config.save_masks:
            return
        for index in range(len(p.all_seeds)):
            grid = run.mask_grid(index)
            if grid is None:
                continue
            infotext = processed.infotexts[processed.index_of_first_image + index]
            if p.save_samples():
                images.save_image(grid, p.outpath_samples, "", p.all_seeds[index], p.all_prompts[index],
                                  shared.opts.samples_format, info=infotext, p=p, suffix="-ela-masks")
            processed.images.append(grid)
            processed.infotexts.append(infotext)


def _attribute(text: str) -> str:
    return text.replace("&", "&amp;").replace("'", "&#39;")


script_callbacks.on_app_started(routes.register)
script_callbacks.on_ui_tabs(training_ui.tab)
xyz.add_axes_when_loaded(LABELS)
