"""HTTP routes: ``POST /ela/v1/tokens`` for the UI's token preview and for API users,
``POST /ela/v1/train`` (training a LoRA on the loaded model, ``training.py``), and the debug routes
of ``debug.py`` (only with ``ELA_DEBUG=1``).

The token route runs beside generations (FastAPI's thread pool, no queue lock): it only reads the
model's tokenizer, and it refuses up front the input that would hold a thread for long.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from modules import shared
from modules.call_queue import queue_lock

from ela_ext.entities import EntitySpecError, format_spec
from ela_webui import debug, training
from ela_webui.prompts import (PREVIEW_STEPS, PromptSyntaxError, entity_phrases, first_sub_prompt,
                               resolve_for_model, scheduled_texts, strip_extra_networks, t5_token_rows, text_encoder,
                               token_rows)
from ela_webui.sampling import diffusion_model, unanchorable_model

# Longer input is refused (422, the reason as a string the UI shows) before any parsing. 20000 characters are ~4000 tokens, 50 chunks:
# far past what a prompt conditions usefully; the engine's own passes stay linear in the length.
PROMPT_MAX_CHARS = 20_000
SPEC_MAX_CHARS = 2_000
# A prompt with [from:to:when] or [a|b] goes through the WebUI's schedule parser, whose time grows
# about cubically with its brackets (~1 s at 40 on one CPU core; minutes at a few hundred).
PREVIEW_MAX_BRACKETS = 40


class TokensRequest(BaseModel):
    prompt: str
    entities: str = ""


def tokens(request: TokensRequest) -> dict:
    """The prompt's tokens and the spec's columns, as generation's first step would resolve them.

    A blank ``entities`` detects them from the prompt; the spec that was used comes back as
    ``spec``. A spec that cannot be used, a prompt the WebUI cannot parse and input over the limits
    above answer 422 with the reason.
    """
    _refuse_long(request)
    prompt = strip_extra_networks(request.prompt)
    text, sub_prompt_count = first_sub_prompt(prompt)
    _refuse_costly_schedule(text)
    encoder = text_encoder()
    try:
        text = scheduled_texts(text, PREVIEW_STEPS)[0][1]
        phrases = entity_phrases(request.entities, prompt)
        resolved = resolve_for_model(phrases, text, encoder=encoder)
    except (EntitySpecError, PromptSyntaxError) as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    warnings = [problem for problem in (unanchorable_model(shared.sd_model), resolved.problem) if problem]
    if sub_prompt_count > 1:
        warnings.append("AND prompt: entities are anchored in the first sub-prompt only")
    columns = resolved.columns
    return {
        "spec": format_spec(phrases),
        "entities": [{"word": entity.word, "columns": list(entity.columns),
                      "attributes": [{"word": attribute.word, "columns": list(attribute.columns)}
                                     for attribute in entity.attributes]}
                     for entity in columns.entities],
        "sot_columns": list(columns.sot_columns),
        "tokens": (token_rows(resolved.chunks, encoder) if resolved.chunks else []) + t5_token_rows(resolved),
        "warnings": warnings,
    }


def _refuse_long(request: TokensRequest) -> None:
    for name, value, limit in (("prompt", request.prompt, PROMPT_MAX_CHARS),
                               ("entities", request.entities, SPEC_MAX_CHARS)):
        if len(value) > limit:
            raise HTTPException(status_code=422, detail=f"{name} has {len(value)} characters, at most {limit}")


def _refuse_costly_schedule(text: str) -> None:
    brackets = text.count("(") + text.count("[")
    if "[" in text and brackets > PREVIEW_MAX_BRACKETS:
        raise HTTPException(status_code=422, detail=(
            f"too many brackets to preview ({brackets}, at most {PREVIEW_MAX_BRACKETS} in a prompt with "
            "[from:to:when] or [a|b]): the WebUI's schedule parser would take minutes"))


def train(job: training.TrainingJob) -> dict:
    """Train a LoRA on the loaded model, synchronously like ``/sdapi/v1/train/embedding``; answers
    ``{"lora", "steps", "loss_first", "loss_last", "seconds"}``, or the reason with 4xx (422 input,
    non-finite loss, out of memory; 409 interrupted, name taken, no model). Under the queue lock,
    as a generation: it never runs beside one."""
    with queue_lock, training.training_job("ela_train"):
        try:
            return training.train(job)
        except training.TrainingRefused as error:
            raise HTTPException(status_code=error.status, detail=str(error)) from None


def debug_calls() -> dict:
    return {"calls": debug.calls, "steps": debug.step_logs()}


def debug_hooks() -> dict:
    return {"hooks": debug.hook_counts(diffusion_model(shared.sd_model))}


def debug_memory() -> dict:
    return debug.memory()


class FaultRequest(BaseModel):
    kind: Literal["nan", "oom", "error"]
    step: int = Field(0, ge=0)


def debug_fault(request: FaultRequest) -> dict:
    """Make the next ELA generation's grad passes at ``step`` fail as ``kind`` (debug.inject_fault)."""
    debug.arm_fault(request.kind, request.step)
    return {}


def register(_demo, app: FastAPI) -> None:
    """``script_callbacks.on_app_started`` target (also fired with ``--nowebui``)."""
    app.add_api_route("/ela/v1/tokens", tokens, methods=["POST"])
    app.add_api_route("/ela/v1/train", train, methods=["POST"])
    if debug.ENABLED:
        app.add_api_route("/ela/v1/debug/calls", debug_calls, methods=["GET"])
        app.add_api_route("/ela/v1/debug/hooks", debug_hooks, methods=["GET"])
        app.add_api_route("/ela/v1/debug/fault", debug_fault, methods=["POST"])
        app.add_api_route("/ela/v1/debug/memory", debug_memory, methods=["GET"])
