"""Training the key projections on the loaded checkpoint (``ela_ext.finetune``), for the UI's tab
and ``POST /ela/v1/train``; the result is a LoRA file in the WebUI's Lora folder (``ela_ext.lora_file``).

Everything host-specific is here and in ``host_unet``: the entities of each prompt are resolved with
the model's own tokenizer (``prompts.resolve``, as generation does, never fixed indices), the
conditioning comes from the WebUI's own ``get_learned_conditioning`` (SDXL: both encoders and the
vector ``y``, at the training resolution), the UNet runs on the model as loaded. The engine trains
in forward hooks and never writes a weight, so an image generated after training is byte-identical
to one before, whatever happens during training.

The caller holds the WebUI's queue lock (training never runs beside a generation) and its job state
(``shared.state``): the progress bar reads ``sampling_step`` / ``textinfo``, Interrupt sets
``interrupted``, which ends training with nothing written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from modules import devices, paths, prompt_parser, shared

from ela_ext.entities import EntitySpecError, format_spec
from ela_ext.finetune import FinetuneConfig, FinetuneError, TrainingCancelled, TrainingPrompt, train_key_projections
from ela_ext.lora_file import LoraFileError, save_lora
from ela_webui import debug, mmdit
from ela_webui.prompts import (PromptSyntaxError, entity_phrases, host_parser, resolve, strip_extra_networks,
                               text_encoder)
from ela_webui.sampling import diffusion_model, encoders_disagree, is_forge

# A file name the Lora folder and ``<lora:name:1>`` both take: no folders, no prompt syntax.
NAME_PATTERN = re.compile(r"^[\w][\w .+-]{0,99}$")
NATIVE_SIZE = {"sd1": 512, "sd2": 512, "sd2_v": 768, "sdxl": 1024}
TRAINABLE = "SD 1.x / 2.x / SDXL UNets"
LATENT_CHANNELS = 4
LATENT_FACTOR = 8


class TrainingRefused(Exception):
    """Training did not run or did not finish; ``status`` is the HTTP status, the message the reason.
    The model is as it was and no file was written."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class TrainingJob:
    """One training request: what the API and the UI both fill in."""

    name: str
    prompts: list[str]
    entities: list[str] = field(default_factory=list)
    steps: int = FinetuneConfig.steps
    learning_rate: float = FinetuneConfig.learning_rate
    objective: str = FinetuneConfig.objective
    projections: list[str] = field(default_factory=lambda: list(FinetuneConfig.projections))
    rank: int = FinetuneConfig.rank
    layers: str = FinetuneConfig.layers
    batch_size: int = FinetuneConfig.batch_size
    seed: int = FinetuneConfig.seed
    preservation: float = FinetuneConfig.preservation
    preservation_prompts: list[str] = field(default_factory=list)
    width: Optional[int] = None
    height: Optional[int] = None
    overwrite: bool = False

    def config(self) -> FinetuneConfig:
        try:
            return FinetuneConfig(objective=self.objective, projections=tuple(self.projections), steps=self.steps,
                                  learning_rate=self.learning_rate, batch_size=self.batch_size, rank=self.rank,
                                  layers=self.layers, preservation=self.preservation, seed=self.seed).validated()
        except (TypeError, ValueError) as error:
            raise TrainingRefused(422, str(error)) from None


def untrainable_model(sd_model) -> Optional[str]:
    """Why the loaded model cannot be trained, or None: an MM-DiT (SD3 / SD3.5, Flux) has no
    cross-attention key projection, only joint attention, which this training does not touch."""
    family = mmdit.model_family(sd_model)
    if family is None:
        return None
    return (f"the loaded model is {mmdit.FAMILY_NAMES[family]}: training supports {TRAINABLE} (their "
            "cross-attention key projections); MM-DiT models are anchored at generation but not trained. "
            "Load an SD 1.x / 2.x / SDXL checkpoint to train")


def model_family(sd_model) -> str:
    """``lora_file.FAMILY_VERSIONS`` key of the loaded model (what files the LoRA in the Lora tab)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if not getattr(sd_model, "is_sd2", False):
        return "sd1"
    if is_forge(sd_model):
        predictor = getattr(sd_model.forge_objects.unet.model, "predictor", None)
        v_prediction = getattr(predictor, "prediction_type", "") == "v_prediction"
    else:
        v_prediction = getattr(sd_model, "parameterization", "eps") == "v"
    return "sd2_v" if v_prediction else "sd2"


def lora_folder() -> Path:
    """``--lora-dir`` (the built-in Lora extension's flag, A1111 and Forge), else ``models/Lora``."""
    return Path(getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"))


def lora_path(job: TrainingJob) -> Path:
    name = job.name.strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not NAME_PATTERN.match(name) or name.endswith("."):
        raise TrainingRefused(422, f"name {job.name!r}: use letters, digits, space, '_', '-', '+', '.' "
                                   "(at most 100, no folders)")
    folder = lora_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    if path.exists() and not job.overwrite:
        raise TrainingRefused(409, f"{path.name} exists in {path.parent}; choose another name or set overwrite")
    return path


def training_prompts(job: TrainingJob, sd_model) -> tuple[list[TrainingPrompt], list[str]]:
    """Each prompt with its entities' columns in the model's own tokenisation; 422 with the reason
    for a prompt that has no two entities, a spec that does not fit it, or a prompt longer than one
    75-token chunk (a batch stacks the prompts' conditionings row by row). Also the spec used
    for each (the detected entities where none was given), for the file's metadata."""
    if not job.prompts:
        raise TrainingRefused(422, "no training prompts")
    if job.entities and len(job.entities) != len(job.prompts):
        raise TrainingRefused(422, f"{len(job.entities)} entity specs for {len(job.prompts)} prompts: "
                                   "give one per prompt, or none to detect them")
    specs = job.entities or [""] * len(job.prompts)
    prompts, used_specs = [], []
    for number, (prompt, spec) in enumerate(zip(job.prompts, specs), start=1):
        text = strip_extra_networks(prompt).strip()
        try:
            phrases = entity_phrases(spec, text)
            resolved = resolve(phrases, text)
            problem = resolved.problem or encoders_disagree(sd_model, phrases, text, resolved)
            if not problem and len(resolved.chunks) > 1:
                problem = "longer than 75 tokens"
        except (EntitySpecError, PromptSyntaxError) as error:
            problem = str(error)
        if problem:
            raise TrainingRefused(422, f"prompt {number} ({text!r}): {problem}")
        prompts.append(TrainingPrompt(text, resolved.columns))
        used_specs.append(format_spec(phrases))
    return prompts, used_specs


def preservation_texts(job: TrainingJob) -> list[str]:
    """The preservation prompts as conditioned (extra-network tags removed); 422 for one longer
    than one 75-token chunk, for the reason ``training_prompts`` gives."""
    texts = [strip_extra_networks(prompt).strip() for prompt in job.preservation_prompts]
    encoder = text_encoder()
    for number, text in enumerate(texts, start=1):
        try:
            with host_parser():
                chunks = encoder.tokenize_line(text)[0]
        except PromptSyntaxError as error:
            raise TrainingRefused(422, f"preservation prompt {number} ({text!r}): {error}") from None
        if len(chunks) > 1:
            raise TrainingRefused(422, f"preservation prompt {number} ({text!r}): longer than 75 tokens")
    return texts


def _stack(conditionings: list) -> Any:
    if isinstance(conditionings[0], dict):
        return {key: torch.cat([c[key] for c in conditionings]) for key in conditionings[0]}
    return torch.cat(conditionings)


class HostUnet:
    """The loaded model's UNet as the engine calls it: ``denoise(x_t, t, cond)`` returns the
    model's own prediction (eps or v), ``encode(prompts)`` the conditioning, computed once per
    distinct prompt (a training run draws the same few prompts hundreds of times)."""

    def __init__(self, sd_model, width: int, height: int):
        self.sd_model = sd_model
        self.unet = diffusion_model(sd_model)
        self.width, self.height = width, height
        self._conditioning: dict[str, Any] = {}
        self.calls = 0

    def alphas_cumprod(self) -> torch.Tensor:
        """The training schedule's cumulative alphas (Forge keeps them on its predictor)."""
        if is_forge(self.sd_model):
            return self.sd_model.forge_objects.unet.model.predictor.alphas_cumprod
        return self.sd_model.alphas_cumprod

    def scope(self) -> contextlib.AbstractContextManager:
        """Where the engine's forward and backward can run on this host."""
        if is_forge(self.sd_model):
            from ela_webui.forge import grad_scope, prepare_unet  # imports Forge's backend: only there

            prepare_unet(self.sd_model)
            return grad_scope(self.unet)
        return devices.autocast()

    def prepare(self, prompts: list[str]) -> None:
        """Encode every prompt, before the UNet is (re)loaded for training."""
        for prompt in dict.fromkeys(prompts):
            batch = prompt_parser.SdConditioning([prompt], width=self.width, height=self.height)
            with torch.no_grad(), devices.autocast():
                conditioning = self.sd_model.get_learned_conditioning(batch)
            self._conditioning[prompt] = _normal_copy(conditioning)

    def encode(self, prompts: list[str]) -> Any:
        return _stack([self._conditioning[prompt] for prompt in prompts])

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Any) -> torch.Tensor:
        if debug.ENABLED:
            x_t = debug.inject_fault(x_t, self.calls)
        self.calls += 1
        if not is_forge(self.sd_model):
            return self.sd_model.apply_model(x_t, t, conditioning)
        model = self.sd_model.forge_objects.unet.model
        dtype = model.computation_dtype
        extra = {"y": conditioning["vector"].to(dtype)} if isinstance(conditioning, dict) else {}
        context = conditioning["crossattn"] if isinstance(conditioning, dict) else conditioning
        return model.diffusion_model(x_t.to(dtype), t.float(), context=context.to(dtype),
                                     transformer_options={}, **extra)


def _normal_copy(value):
    """A copy usable by autograd: Forge computes conditionings under ``inference_mode``."""
    if isinstance(value, dict):
        return {key: _normal_copy(item) for key, item in value.items()}
    with torch.inference_mode(False):
        return value.clone()


def _report_progress(steps: int) -> Callable[[int, int, float], None]:
    shared.state.job_count = 1
    shared.state.job_no = 0
    shared.state.sampling_steps = steps
    shared.state.sampling_step = 0
    shared.state.textinfo = f"ELA training: 0 / {steps}"

    def progress(step: int, total: int, loss: float) -> None:
        shared.state.sampling_step = step
        shared.state.textinfo = f"ELA training: step {step} / {total}, loss {loss:.4f}"
    return progress


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def train(job: TrainingJob) -> dict:
    """Train on the loaded model and write ``<lora folder>/<name>.safetensors``. Raises
    ``TrainingRefused`` (nothing written, model untouched) with the reason on bad input, a loaded
    model it cannot train (checked first: an MM-DiT), a non-finite loss, out of memory or Interrupt.
    The caller holds the queue lock and job state."""
    sd_model = shared.sd_model
    if sd_model is None:
        raise TrainingRefused(409, "no model is loaded")
    untrainable = untrainable_model(sd_model)
    if untrainable:
        raise TrainingRefused(409, untrainable)
    config = job.config()
    path = lora_path(job)
    prompts, specs = training_prompts(job, sd_model)
    preservation_prompts = preservation_texts(job)
    family = model_family(sd_model)
    width, height = job.width or NATIVE_SIZE[family], job.height or NATIVE_SIZE[family]
    if width % LATENT_FACTOR or height % LATENT_FACTOR or not 64 <= min(width, height) <= max(width, height) <= 4096:
        raise TrainingRefused(422, f"width and height must be multiples of {LATENT_FACTOR} in 64..4096, "
                                   f"not {width}x{height}")
    host = HostUnet(sd_model, width, height)
    if debug.ENABLED:
        debug.start_generation()
    try:
        host.prepare([p.prompt for p in prompts] + preservation_prompts)
        with host.scope():
            result = train_key_projections(
                host.unet, host.denoise, host.encode, prompts, host.alphas_cumprod(),
                (LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR), config,
                preservation_prompts=preservation_prompts, progress=_report_progress(config.steps),
                should_stop=lambda: bool(shared.state.interrupted))
    except TrainingCancelled as error:
        raise TrainingRefused(409, f"interrupted: {error}") from None
    except (FinetuneError, ValueError) as error:
        raise TrainingRefused(422, str(error)) from None
    except RuntimeError as error:
        if not _out_of_memory(error):
            raise
        devices.torch_gc()
        raise TrainingRefused(422, f"out of memory while training ({error}); lower batch_size, rank "
                                   "or width/height; nothing was saved") from None
    if not result.deltas:
        raise TrainingRefused(422, "no key projection received a gradient (the chosen layers all run "
                                   "after the layers the loss reads); nothing was saved")
    losses = result.losses
    settings = {"prompts": [p.prompt for p in prompts], "entities": specs,
                "preservation_prompts": preservation_prompts, "width": width, "height": height,
                "config": dataclasses.asdict(config), "loss_first": losses[0], "loss_last": losses[-1],
                "seconds": round(result.seconds, 2)}
    checkpoint = getattr(getattr(sd_model, "sd_checkpoint_info", None), "name_for_extra", "")
    metadata = {"ss_sd_model_name": str(checkpoint), "ss_resolution": f"({width}, {height})",
                "ss_max_train_steps": str(result.steps), "ss_learning_rate": str(config.learning_rate),
                "ss_seed": str(config.seed),
                "ss_training_comment": f"ELA projection training ({', '.join(config.projections)})",
                "ela_training": json.dumps(settings)}
    deltas = {delta.name: delta.file_entry() for delta in result.deltas}
    try:
        save_lora(path, deltas, family, metadata)
    except LoraFileError as error:
        raise TrainingRefused(422, f"{error}; nothing was saved") from None
    refresh_lora_list()
    return {"lora": path.stem, "steps": result.steps, "loss_first": losses[0], "loss_last": losses[-1],
            "seconds": round(result.seconds, 3)}


def refresh_lora_list() -> None:
    """Re-read the Lora folder in the built-in Lora extension (module ``networks`` in A1111 and
    Forge), so the new file is listed and ``<lora:name>`` finds it without a restart."""
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


@contextlib.contextmanager
def training_job(job_name: str):
    """The WebUI's job state around a training run started from the API (the UI's call is wrapped
    by ``call_queue.wrap_gradio_gpu_call``, which does the same)."""
    shared.state.begin(job=job_name)
    try:
        yield
    finally:
        shared.state.end()

