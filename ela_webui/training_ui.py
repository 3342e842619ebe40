"""The "ELA training" tab: train a LoRA of the key projections on the loaded checkpoint.

The button goes through the WebUI's ``wrap_gradio_gpu_call`` like its own Train tab: the queue lock
(never beside a generation), the job state and a task id whose progress ``javascript/ela.js``
(``ela_start_training``) shows with the WebUI's progress bar. Interrupt sets the state's
``interrupted``, which ends training with nothing written. The work is ``training.train``, the same
as ``POST /ela/v1/train``.
"""

from __future__ import annotations

import html

import gradio as gr

from modules import shared
from modules.call_queue import wrap_gradio_gpu_call

from ela_ext.config import OBJECTIVE_NAMES
from ela_ext.finetune import PROJECTIONS, TRAIN_LAYER_CHOICES, FinetuneConfig
from ela_webui import training

TAB_TITLE = "ELA training"
PROMPTS_HELP = "One prompt per line, each naming two entities or more (a photo of a cat and a dog)."
ENTITIES_HELP = ("Optional: one entity spec per prompt line (black cat | green frog); empty: the entities "
                 "are detected from each prompt, as the accordion does.")
SIZE_HELP = "Training resolution; 0: the model's own (512, SD 2.x-v 768, SDXL 1024)."


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def run_training(_task_id, name, prompts, entities, steps, learning_rate, objective, projections, rank, layers,
                 batch_size, seed, width, height, overwrite):
    """The tab's Train button: a message with the result, or the reason it did not train (the
    second output is where ``wrap_gradio_gpu_call`` puts the time taken, or an exception)."""
    job = training.TrainingJob(name=name, prompts=_lines(prompts), entities=_lines(entities), steps=int(steps),
                               learning_rate=float(learning_rate), objective=objective,
                               projections=list(projections), rank=int(rank),
                               layers=layers, batch_size=int(batch_size), seed=int(seed),
                               width=int(width) or None, height=int(height) or None, overwrite=bool(overwrite))
    try:
        result = training.train(job)
    except training.TrainingRefused as error:
        return [f"<p class='ela-train-refused'>Not trained: {html.escape(str(error))}</p>", ""]
    lora = html.escape(result["lora"])
    return [f"<p>Saved <b>{lora}</b> ({result['steps']} steps, loss {result['loss_first']:.4f} -> "
            f"{result['loss_last']:.4f}, {result['seconds']:.1f} s). Add <code>&lt;lora:{lora}:1&gt;</code> "
            "to a prompt.</p>", ""]


def tab():
    """``script_callbacks.on_ui_tabs`` target."""
    defaults = FinetuneConfig()
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row():
            with gr.Column():
                name = gr.Textbox(label="LoRA name", placeholder="compositional", elem_id="ela_train_name")
                prompts = gr.Textbox(label="Prompts", lines=6, placeholder=PROMPTS_HELP, elem_id="ela_train_prompts")
                entities = gr.Textbox(label="Entities", lines=2, placeholder=ENTITIES_HELP, elem_id="ela_train_entities")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=defaults.steps, precision=0, elem_id="ela_train_steps")
                    learning_rate = gr.Number(label="Learning rate", value=defaults.learning_rate,
                                              elem_id="ela_train_learning_rate")
                    objective = gr.Dropdown(label="Objective", choices=list(OBJECTIVE_NAMES),
                                            value=defaults.objective, elem_id="ela_train_objective")
                projections = gr.CheckboxGroup(label="Projections trained", choices=list(PROJECTIONS),
                                               value=list(defaults.projections), elem_id="ela_train_projections")
                with gr.Row():
                    rank = gr.Number(label="Rank (0: full)", value=defaults.rank, precision=0, elem_id="ela_train_rank")
                    layers = gr.Dropdown(label="Layers", choices=list(TRAIN_LAYER_CHOICES), value=defaults.layers,
                                         elem_id="ela_train_layers")
                    batch_size = gr.Number(label="Batch size", value=defaults.batch_size, precision=0,
                                           elem_id="ela_train_batch_size")
                    seed = gr.Number(label="Seed", value=defaults.seed, precision=0, elem_id="ela_train_seed")
                with gr.Row():
                    width = gr.Number(label="Width", value=0, precision=0, info=SIZE_HELP, elem_id="ela_train_width")
                    height = gr.Number(label="Height", value=0, precision=0, elem_id="ela_train_height")
                    overwrite = gr.Checkbox(label="Overwrite a LoRA of that name", value=False,
                                            elem_id="ela_train_overwrite")
                with gr.Row():
                    train_button = gr.Button("Train", variant="primary", elem_id="ela_train_button")
                    interrupt = gr.Button("Interrupt", elem_id="ela_train_interrupt")
            with gr.Column():
                gr.HTML(elem_id="ela_train_progress")
                result = gr.HTML(elem_id="ela_train_result")
                outcome = gr.HTML(elem_id="ela_train_outcome")
        task_id = gr.Textbox(visible=False)
        train_button.click(fn=wrap_gradio_gpu_call(run_training, extra_outputs=[gr.update()]), _js="ela_start_training",
                           inputs=[task_id, name, prompts, entities, steps, learning_rate, objective, projections, rank,
                                   layers, batch_size, seed, width, height, overwrite],
                           outputs=[result, outcome])
        interrupt.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
    return [(blocks, TAB_TITLE, "ela_training")]
