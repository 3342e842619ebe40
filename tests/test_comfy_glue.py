"""Host-free tests of what the ComfyUI glue computes (``ela_comfy.columns``, ``steps``, ``report``),
against what the real ComfyUI (v0.3.64) computed, recorded by ``tests/comfyui_host/record_fixtures.py``:
its SD 1.x, SD 2.x and SDXL tokenizers' ``tokenize`` output (weights, long prompts, an embedding)
and its k-diffusion samplers' model evaluations. The nodes and the sampling wrappers import
ComfyUI; they are tested in ``tests/comfyui_host/`` against a running server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ela_comfy.columns import ColumnsError, EncoderTokens, resolve_prompt
from ela_comfy.report import RunReport
from ela_comfy.steps import StepCounter, schedule_index
from ela_ext.entities import detect_entities, parse_spec
from ela_ext.tokens import CHUNK_LENGTH, EntityNotInPromptError

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "comfy_recorded.json").read_text())
TOKENIZERS = RECORDED["tokenizers"]
EMBEDDING_PROMPT = "a embedding:ElaTestEmbedding and a green frog"
LONG_PROMPT = next(text for text in TOKENIZERS["sd1"]["texts"] if "highly detailed" in text)


def host_tokenize(family: str):
    """ComfyUI's ``CLIP.tokenize`` as recorded: embedding vectors back as tensors."""
    texts = TOKENIZERS[family]["texts"]

    def tokenize(text: str):
        return {key: [[(torch.tensor(token) if isinstance(token, list) else token, weight) for token, weight in chunk]
                      for chunk in chunks] for key, chunks in texts[text].items()}
    return tokenize


def encoders(family: str) -> list[EncoderTokens]:
    return [EncoderTokens(key, spec["end"], spec["pad"]) for key, spec in TOKENIZERS[family]["encoders"].items()]


def pieces_at(family: str, text: str, columns) -> list[str]:
    """The recorded BPE pieces of ``text``'s first encoder at ``columns``."""
    chunks = next(iter(TOKENIZERS[family]["texts"][text].values()))
    flat = [entry[0] for chunk in chunks for entry in chunk]
    return [TOKENIZERS[family]["pieces"][str(flat[c])] if isinstance(flat[c], int) else "<embedding>" for c in columns]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_columns_are_the_words_comfyui_tokenised(family):
    columns = resolve_prompt(parse_spec("black cat | green frog"), "a black cat and a green frog",
                             host_tokenize(family), encoders(family))
    cat, frog = columns.entities
    assert pieces_at(family, "a black cat and a green frog", cat.columns) == ["cat</w>"]
    assert pieces_at(family, "a black cat and a green frog", frog.columns) == ["frog</w>"]
    assert pieces_at(family, "a black cat and a green frog", cat.attributes[0].columns) == ["black</w>"]
    assert columns.sot_columns == (0,)
    assert (cat.columns, frog.columns) == ((3,), (7,))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_weight_syntax_is_parsed_as_comfyui_does(family):
    """``(black cat:1.2)`` and ``((green))``: ComfyUI strips the syntax into weights, so the words
    keep the columns they have without it."""
    text = "a (black cat:1.2) and a ((green)) frog"
    weighted = resolve_prompt(parse_spec("black cat | green frog"), text, host_tokenize(family), encoders(family))
    plain = resolve_prompt(parse_spec("black cat | green frog"), "a black cat and a green frog",
                           host_tokenize(family), encoders(family))
    assert weighted == plain
    weights = [entry[1] for entry in next(iter(TOKENIZERS[family]["texts"][text].values()))[0][:8]]
    assert weights[2:4] == [1.2, 1.2] and weights[6] > 1.2  # the recorded host applied them as weights


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_prompt_over_75_tokens_has_its_entities_in_the_second_chunk(family):
    columns = resolve_prompt(parse_spec("red cube | blue ball"), LONG_PROMPT, host_tokenize(family), encoders(family))
    assert columns.sot_columns == (0, CHUNK_LENGTH)
    for entity in columns.entities:
        assert all(column > CHUNK_LENGTH for column in entity.columns)
        assert pieces_at(family, LONG_PROMPT, entity.columns) == [entity.word + "</w>"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_an_embedding_maps_to_all_of_its_vectors(family):
    columns = resolve_prompt(parse_spec("embedding:ElaTestEmbedding | green frog"), EMBEDDING_PROMPT,
                             host_tokenize(family), encoders(family))
    embedding, frog = columns.entities
    assert embedding.columns == (2, 3)
    assert pieces_at(family, EMBEDDING_PROMPT, embedding.columns) == ["<embedding>", "<embedding>"]
    assert pieces_at(family, EMBEDDING_PROMPT, frog.columns) == ["frog</w>"]


def test_sdxl_encoders_that_disagree_leave_the_prompt_unanchored():
    """SDXL's UNet sees both encoders' outputs column by column, so their columns must agree.
    Here CLIP-G's recorded chunk gets one more token after its start token, shifting every word."""
    recorded = host_tokenize("sdxl")

    def g_shifted(text):
        tokens = recorded(text)
        if text == "a black cat and a green frog":  # the prompt, not the words tokenised alone
            tokens["g"] = [chunk[:1] + [(320, 1.0)] + chunk[1:-1] for chunk in tokens["g"]]
        return tokens

    with pytest.raises(ColumnsError, match=r"different columns \(g: cat 4 \(black 3\); frog 8 \(green 7\); "
                                           r"l: cat 3 \(black 2\); frog 7 \(green 6\)\)"):
        resolve_prompt(parse_spec("black cat | green frog"), "a black cat and a green frog", g_shifted,
                       encoders("sdxl"))


def test_sdxl_pads_clip_g_with_zero_and_clip_l_with_the_end_id():
    assert {key: (spec["end"], spec["pad"]) for key, spec in TOKENIZERS["sdxl"]["encoders"].items()} == \
        {"g": (49407, 0), "l": (49407, 49407)}


def test_detected_entities_resolve_on_every_family():
    for family in ("sd1", "sd2", "sdxl"):
        columns = resolve_prompt(detect_entities("a black cat and a green frog", use_spacy=False),
                                 "a black cat and a green frog", host_tokenize(family), encoders(family))
        assert [entity.word for entity in columns.entities] == ["cat", "frog"]


def test_a_word_not_in_the_prompt_and_an_empty_prompt_are_refused():
    with pytest.raises(EntityNotInPromptError, match="dog"):
        resolve_prompt(parse_spec("cat | dog"), "a black cat and a green frog", host_tokenize("sd1"), encoders("sd1"))
    with pytest.raises(ColumnsError, match="at least two entities, found 0"):
        resolve_prompt(detect_entities(""), "", host_tokenize("sd1"), encoders("sd1"))


SIGMAS = RECORDED["evaluations"]["sigmas"]


@pytest.mark.parametrize("sampler", sorted(RECORDED["evaluations"]["samplers"]))
def test_the_step_counter_finds_each_steps_first_evaluation(sampler):
    """Ground truth: the evaluation whose ``x`` is the latent the sampler hands its callback for
    step i (recorded from ComfyUI's own sampler functions); Heun's and Heun++'s temporaries at
    schedule levels come before it."""
    recorded = RECORDED["evaluations"]["samplers"][sampler]
    counter = StepCounter(recorded["function"], SIGMAS)
    found = {}
    for call, sigma in enumerate(recorded["calls"]):
        step = counter.first_evaluation(sigma)
        if step is not None:
            found[str(step)] = call
    assert found == recorded["first_evaluation"]


def test_schedule_index_takes_float32_round_trips_and_not_the_final_level():
    assert schedule_index(SIGMAS, float(torch.tensor(SIGMAS[3], dtype=torch.float32))) == 3
    assert schedule_index(SIGMAS, SIGMAS[-1]) is None
    assert schedule_index(SIGMAS, (SIGMAS[1] + SIGMAS[2]) / 2) is None


def test_report_text_says_off_warnings_and_the_log_line():
    assert RunReport(enabled=False).text() == "ELA off"
    refused = RunReport(enabled=True)
    refused.warn_node("not found in the prompt: 'dog': image left unanchored")
    assert refused.text() == "ELA log: steps=0\nELA warnings: not found in the prompt: 'dog': image left unanchored"
    ran = RunReport(enabled=True)
    ran.record_run("steps=1;updates=2;first=0.5->0.4;last=0.5->0.4", ["step 1: loss 0.5 -> 0.45 -> 0.4 (2 updates)"],
                   [], None)
    assert ran.text().splitlines() == ["ELA log: steps=1;updates=2;first=0.5->0.4;last=0.5->0.4",
                                       "step 1: loss 0.5 -> 0.45 -> 0.4 (2 updates)"]
