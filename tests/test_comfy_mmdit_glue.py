"""Host-free tests of the ComfyUI glue's MM-DiT columns (``ela_comfy.columns.resolve_joint_prompt``)
against ComfyUI's SD3 and Flux tokenizers' ``tokenize`` output, recorded by
``tests/comfyui_host/record_mmdit_fixtures.py``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ela_comfy.columns import ColumnsError, EncoderTokens, JointLayout, joint_layout, resolve_joint_prompt
from ela_ext.entities import parse_spec
from ela_ext.tokens import CHUNK_LENGTH, EntityNotInPromptError

TOKENS = json.loads((Path(__file__).parent / "fixtures" / "comfy_mmdit_tokens.json").read_text())
PROMPT = "a black cat and a green frog"
CLIP_L = EncoderTokens("l", 49407, 49407)
CLIP_G = EncoderTokens("g", 49407, 0)
T5 = EncoderTokens("t5xxl", 1, 0)


def host_tokenize(family: str):
    return lambda text: TOKENS[family]["texts"][text]


def t5_piece(family: str, text: str, position: int) -> str:
    token = TOKENS[family]["texts"][text]["t5xxl"][0][position][0]
    return TOKENS[family]["t5_pieces"][str(token)]


@pytest.mark.parametrize("layout, cat, background", [
    (JointLayout((CLIP_L,)), (3,), (0,)),                                  # SD3 through CLIPLoader(type=sd3)
    (JointLayout((CLIP_G, CLIP_L)), (3,), (0,)),                           # DualCLIPLoader(sd3): L and G agree
    (JointLayout((CLIP_G, CLIP_L), T5), (3, CHUNK_LENGTH + 3), (0,)),      # TripleCLIPLoader: T5 after the CLIPs
    (JointLayout((), T5), (3,), (11,)),                                   # SD3 with T5 alone
], ids=["clip-l", "clip-l+g", "clip-l+g+t5", "t5"])
def test_sd3_layouts(layout, cat, background):
    columns = resolve_joint_prompt(parse_spec("black cat | green frog"), PROMPT, host_tokenize("sd3"), layout)
    assert columns.entities[0].columns == cat
    assert columns.sot_columns == background
    if layout.t5 is not None:
        t5_column = cat[-1] - (CHUNK_LENGTH if layout.clip else 0)
        assert t5_piece("sd3", PROMPT, t5_column) == "▁cat"


def test_flux_is_t5_alone_and_weights_do_not_move_columns():
    plain = resolve_joint_prompt(parse_spec("black cat | green frog"), PROMPT, host_tokenize("flux"),
                                 JointLayout((), T5))
    weighted = resolve_joint_prompt(parse_spec("black cat | green frog"), "a (black cat:1.2) and a green frog",
                                    host_tokenize("flux"), JointLayout((), T5))
    assert plain == weighted
    cat, frog = plain.entities
    assert t5_piece("flux", PROMPT, cat.columns[0]) == "▁cat"
    assert "".join(t5_piece("flux", PROMPT, column) for column in frog.columns) == "▁frog"


def test_detected_entities_and_errors():
    from ela_ext.entities import detect_entities
    columns = resolve_joint_prompt(detect_entities(PROMPT), PROMPT, host_tokenize("flux"), JointLayout((), T5))
    assert [entity.word for entity in columns.entities] == ["cat", "frog"]
    with pytest.raises(EntityNotInPromptError):
        resolve_joint_prompt(parse_spec("cube | frog"), PROMPT, host_tokenize("flux"), JointLayout((), T5))
    with pytest.raises(ColumnsError):
        resolve_joint_prompt(parse_spec("cat"), PROMPT, host_tokenize("flux"), JointLayout((), T5))
    with pytest.raises(ColumnsError):
        resolve_joint_prompt(parse_spec("cat | frog"), PROMPT, host_tokenize("flux"), JointLayout())


class SD3ClipModel:  # stand-ins named as ComfyUI's text encoder classes (comfy/text_encoders)
    def __init__(self, clip_l=None, clip_g=None, t5xxl=None):
        self.clip_l, self.clip_g, self.t5xxl = clip_l, clip_g, t5xxl


class FluxClipModel:
    clip_l = t5xxl = object()


class SDXLClipModel:
    pass


TOKENIZER = SimpleNamespace(clip_l=SimpleNamespace(end_token=49407, pad_token=49407),
                            clip_g=SimpleNamespace(end_token=49407, pad_token=0),
                            t5xxl=SimpleNamespace(end_token=1, pad_token=0))


@pytest.mark.parametrize("model, layout", [
    (type("SD3ClipModel_", (SD3ClipModel,), {})(clip_l=object()), JointLayout((CLIP_L,))),
    (SD3ClipModel(clip_l=object(), clip_g=object(), t5xxl=object()), JointLayout((CLIP_L, CLIP_G), T5)),
    (SD3ClipModel(t5xxl=object()), JointLayout((), T5)),
    (type("FluxClipModel_", (FluxClipModel,), {})(), JointLayout((), T5)),
    (SDXLClipModel(), None)], ids=["sd3 clip-l (CLIPLoader sd3)", "sd3 triple", "sd3 t5", "flux", "sdxl"])
def test_the_layout_comes_from_the_loaded_encoders(model, layout):
    assert joint_layout(SimpleNamespace(cond_stage_model=model, tokenizer=TOKENIZER)) == layout
