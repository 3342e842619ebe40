"""MM-DiT in the engine: joint-attention capture against attention recorded from the real ComfyUI
(its tiny SD3 MMDiT and tiny Flux, ``tests/comfyui_host/record_mmdit_fixtures.py``), T5 and SD3
columns against ComfyUI's recorded tokenizer output, and the anchoring loop on a tiny in-process
MM-DiT (``tests/tiny_mmdit.py``) in flow-matching space: the loss falls, the latent moves, off
changes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ela_ext.anchoring import SamplerSpace, anchor_latent
from ela_ext.capture import CaptureError, StopForward, run_truncated
from ela_ext.config import ElaConfig, replace
from ela_ext.entities import parse_spec
from ela_ext.joint_attention import JointAttentionCapture, choose_blocks, text_attention_probs
from ela_ext.session import AnchoringSession
from ela_ext.tokens import (CHUNK_LENGTH, EntityColumns, ResolvedEntity, joint_columns, resolve_entities,
                            resolve_t5_entities)
from tiny_mmdit import TinyMMDiT, plain_attention

FIXTURES = Path(__file__).parent / "fixtures"
ATTENTION = load_file(str(FIXTURES / "comfy_mmdit_attention.safetensors"))
TOKENS = json.loads((FIXTURES / "comfy_mmdit_tokens.json").read_text())
PROMPT = "a black cat and a green frog"


def recorded(family: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """q, k, v as (B, heads, L, D), ComfyUI's attention output (B, L, heads * D), heads, text length."""
    heads, n_text = int(ATTENTION[f"{family}.heads"]), int(ATTENTION[f"{family}.n_text"])
    q, k, v = (ATTENTION[f"{family}.{name}"] for name in "qkv")
    if q.ndim == 3:  # MMDiT hands its attention (B, L, heads * D)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return q, k, v, ATTENTION[f"{family}.out"], heads, n_text


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_recorded_joint_attention_is_one_softmax_over_text_and_image_keys(family):
    """ComfyUI's output is softmax(QK^T / sqrt(D)) V over the joint sequence, text first; the
    captured maps are its text part renormalised over the text columns."""
    q, k, v, out, heads, n_text = recorded(family)
    joint = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    mine = (joint @ v.double()).transpose(1, 2).reshape(out.shape)
    assert torch.allclose(mine, out.double(), atol=1e-4)
    text_part = joint[:, :, n_text:, :n_text]
    expected = (text_part / text_part.sum(-1, keepdim=True)).mean(1)
    raw = ATTENTION[f"{family}.q"], ATTENTION[f"{family}.k"]
    maps = text_attention_probs(*raw, n_text, heads if raw[0].ndim == 3 else None)
    assert maps.shape == (1, q.shape[2] - n_text, n_text)
    assert torch.allclose(maps.double(), expected, atol=1e-5)
    assert torch.allclose(maps.sum(-1), torch.ones(1, q.shape[2] - n_text), atol=1e-5)
    # the text's share of the joint softmax is below 1: renormalising changes the scale, not the ranking
    assert float(text_part.sum(-1).max()) < 1


def test_text_attention_accepts_both_layouts():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 20, 8, generator=generator), torch.randn(2, 3, 20, 8, generator=generator)
    flat = [t.transpose(1, 2).reshape(2, 20, 24) for t in (q, k)]
    assert torch.allclose(text_attention_probs(q, k, 4), text_attention_probs(*flat, 4, heads=3), atol=1e-6)
    with pytest.raises(ValueError):
        text_attention_probs(*flat, 4)
    with pytest.raises(CaptureError):
        text_attention_probs(q, k, 20)


@pytest.mark.parametrize("n_blocks, choice, expected", [
    (1, "middle", [0]), (2, "middle", [0, 1]), (19, "middle", list(range(6, 13))), (24, "middle", list(range(8, 16))),
    (24, "early", list(range(8))), (2, "early", [0]), (3, "all", [0, 1, 2])])
def test_block_choice(n_blocks, choice, expected):
    assert choose_blocks(n_blocks, choice) == expected


def test_capture_keeps_chosen_blocks_once_and_stops_after_the_last():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5 + 16, 4, generator=generator), torch.randn(1, 2, 5 + 16, 4, generator=generator)
    capture = JointAttentionCapture([1, 2])
    capture.record(1, q, k, 5)  # outside capturing(): ignored
    with capture.capturing((8, 8)):
        capture.record(0, q, k, 5)
        capture.record(1, q, k, 5)
        capture.record(2, q[:, :, :9], k[:, :, :9], 5, n_image=16)  # another attention's length: skipped
        with pytest.raises(StopForward):
            capture.record(2, q, k, 5, n_image=16)
        assert capture.maps.shape == (1, 5, 4, 4)  # 8x8 latent in 2x2 patches
        assert not capture.wants(1)
    assert not capture.wants(0)
    with pytest.raises(CaptureError):
        JointAttentionCapture([])


# -- columns: T5 and SD3's concatenation, from ComfyUI's tokenizers ------------------------------

def t5_ids(family: str, text: str) -> list[int]:
    return [entry[0] for entry in TOKENS[family]["texts"][text]["t5xxl"][0]]


def t5_word(family: str):
    end = TOKENS[family]["t5_end"]

    def tokenize_word(word: str) -> list[int]:
        ids = t5_ids(family, word)
        return ids[:ids.index(end)]
    return tokenize_word


def t5_pieces(family: str, text: str, columns, offset: int = 0) -> list[str]:
    ids = t5_ids(family, text)
    return [TOKENS[family]["t5_pieces"][str(ids[column - offset])] for column in columns]


def clip_columns(text: str) -> EntityColumns:
    chunks = [[entry[0] for entry in chunk] for chunk in TOKENS["sd3"]["texts"][text]["l"]]

    def tokenize_word(word):
        return [entry[0] for entry in TOKENS["sd3"]["texts"][word]["l"][0][1:] if entry[0] != 49407]
    return resolve_entities(parse_spec("black cat | green frog"), chunks, tokenize_word)


def test_flux_t5_columns_are_the_pieces_comfyui_tokenised():
    ids = t5_ids("flux", PROMPT)
    assert len(ids) == TOKENS["flux"]["t5_min_length"] == 256  # Flux pads T5 to 256 columns
    columns = resolve_t5_entities(parse_spec("black cat | green frog"), ids, t5_word("flux"))
    cat, frog = columns.entities
    assert t5_pieces("flux", PROMPT, cat.columns) == ["▁cat"]
    assert t5_pieces("flux", PROMPT, cat.attributes[0].columns) == ["▁black"]
    assert "".join(t5_pieces("flux", PROMPT, frog.columns)) == "▁frog"
    assert t5_pieces("flux", PROMPT, frog.attributes[0].columns) == ["▁green"]
    end = ids.index(TOKENS["flux"]["t5_end"])
    assert columns.sot_columns == (end,)  # the background: T5's end token (no start token)
    assert max(columns.text_columns) == end - 1


def test_t5_words_match_whole_pieces_only_where_the_word_starts():
    text = "a hummingbird and a cats"
    with pytest.raises(Exception, match="bird"):
        resolve_t5_entities(parse_spec("bird | cats"), t5_ids("flux", text), t5_word("flux"))
    columns = resolve_t5_entities(parse_spec("hummingbird | cats"), t5_ids("flux", text), t5_word("flux"))
    assert [t5_pieces("flux", text, e.columns) for e in columns.entities][1] == ["▁cats"]


def test_sd3_columns_put_t5_after_the_clip_chunks():
    ids = t5_ids("sd3", PROMPT)
    assert len(ids) == 77
    clip = clip_columns(PROMPT)
    t5 = resolve_t5_entities(parse_spec("black cat | green frog"), ids, t5_word("sd3"), offset=CHUNK_LENGTH)
    columns = joint_columns(clip, t5)
    cat, frog = columns.entities
    assert cat.columns == (3, CHUNK_LENGTH + 3)  # CLIP's "cat</w>" and T5's "▁cat"
    assert t5_pieces("sd3", PROMPT, [CHUNK_LENGTH + 3], offset=CHUNK_LENGTH) == ["▁cat"]
    assert frog.columns[0] == 7 and all(column > CHUNK_LENGTH for column in frog.columns[1:])
    assert cat.attributes[0].columns == (2, CHUNK_LENGTH + 2)
    assert columns.sot_columns == (0,)  # CLIP's start token stays the background
    assert set(clip.text_columns) | set(t5.text_columns) == set(columns.text_columns)
    assert joint_columns(clip) == clip and joint_columns(t5=t5) == t5


def test_joint_columns_refuse_parts_with_other_entities():
    clip = clip_columns(PROMPT)
    other = EntityColumns((ResolvedEntity("dog", (80,), ()), ResolvedEntity("frog", (81,), ())), (90,))
    with pytest.raises(ValueError):
        joint_columns(clip, other)


# -- anchoring a tiny MM-DiT in flow-matching space ------------------------------------------------

TARGET = EntityColumns((ResolvedEntity("cat", (2,), ()), ResolvedEntity("frog", (5,), ())), (0,),
                       tuple(range(1, 8)))
CONFIG = replace(ElaConfig(enabled=True), max_iterations=6, loss_threshold=0.0, step_size=0.3).for_denoiser(joint=True)


@pytest.fixture(scope="module")
def mmdit():
    model = TinyMMDiT().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # as a host's weights may be: the session must freeze them
    return model


@pytest.fixture
def text():
    return torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))


def hooked(capture: JointAttentionCapture):
    """The host's part: its attention records the joint block's q/k, then runs as always."""
    def attention(block, query, key, value, heads):
        capture.record(block, query, key, n_text=8, heads=heads, n_image=query.shape[1] - 8)
        return plain_attention(block, query, key, value, heads)
    return attention


def test_flow_space_is_the_model_input_with_a_noise_share():
    space = SamplerSpace.from_flow_sigma(0.5)
    x = torch.randn(3)
    assert space.c_in == 1.0 and torch.equal(space.to_unet_input(x), x)
    assert space.noise_fraction == pytest.approx(1 / math.sqrt(2))
    assert SamplerSpace.from_flow_sigma(1.0).noise_fraction == 1.0
    assert SamplerSpace.from_flow_sigma(0.0).noise_fraction == 0.0


def test_anchoring_a_tiny_mmdit_lowers_the_loss_and_moves_the_latent(mmdit, text):
    space = SamplerSpace.from_flow_sigma(0.9)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    capture = JointAttentionCapture(choose_blocks(len(mmdit.joint_blocks), "middle"))
    def forward(x):
        return mmdit(x, torch.full((1,), 0.9), text, attention=hooked(capture))

    with capture.capturing(latent.shape[-2:]):
        result = anchor_latent(latent, space, lambda x: run_truncated(capture, lambda: forward(x)), [TARGET], CONFIG)
    assert result.updates == CONFIG.max_iterations
    assert result.losses[-1] < result.losses[0]
    assert not torch.equal(result.latent, latent)
    change = (result.latent - latent).pow(2).mean().sqrt()
    assert change <= CONFIG.max_iterations * CONFIG.step_size * space.noise_fraction + 1e-4
    assert result.maps_first.shape == (1, 8, 8, 8)
    assert result.localizations[0].entity_masks.shape == (2, 8, 8)


def test_session_anchors_in_its_window_and_off_changes_nothing(mmdit, text):
    config = replace(CONFIG, window_end=0.5)
    capture = JointAttentionCapture(choose_blocks(len(mmdit.joint_blocks), config.joint_blocks))
    session = AnchoringSession(mmdit, config, [TARGET], capture=capture)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((1,), 0.8)
    plain = mmdit(latent, sigma, text)
    # the host's hook is in place during sampling, outside the grad pass: outputs are identical
    assert torch.equal(mmdit(latent, sigma, text, attention=hooked(capture)), plain)

    def forward(x):
        return mmdit(x, sigma, text, attention=hooked(capture))

    assert session.maybe_anchor(latent, SamplerSpace.from_flow_sigma(0.8), 3, 4, forward) is latent
    updated = session.maybe_anchor(latent, SamplerSpace.from_flow_sigma(0.8), 0, 4, forward)
    assert not torch.equal(updated, latent) and not session.failed, session.warnings
    assert session.steps[0].losses[-1] < session.steps[0].losses[0]
    assert all(parameter.requires_grad for parameter in mmdit.parameters())  # weights given back
    assert torch.equal(mmdit(latent, sigma, text, attention=hooked(capture)), plain)
    assert session.mask_grid(0) is not None


def test_a_capture_whose_blocks_never_run_leaves_the_latent_alone(mmdit, text):
    session = AnchoringSession(mmdit, CONFIG, [TARGET], capture=JointAttentionCapture([7]))
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    forward = lambda x: mmdit(x, torch.full((1,), 0.8), text, attention=hooked(session._joint))  # noqa: E731
    assert session.maybe_anchor(latent, SamplerSpace.from_flow_sigma(0.8), 0, 4, forward) is latent
    assert session.failed and "no chosen joint-attention block ran" in session.warnings[0]


def test_auto_objective_is_attend_and_excite_as_its_paper_runs_it_on_an_mmdit(mmdit, text):
    """The default ``auto`` anchors an MM-DiT with ``attend_excite_paper`` (chosen on the benchmark
    MM-DiT, ElaConfig.objective), not with the UNets' Separate-and-Enhance."""
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((1,), 0.8)

    def anchored(objective):
        capture = JointAttentionCapture(choose_blocks(len(mmdit.joint_blocks), "middle"))
        session = AnchoringSession(mmdit, replace(CONFIG, objective=objective, max_iterations=2), [TARGET],
                                   capture=capture)
        forward = lambda x: mmdit(x, sigma, text, attention=hooked(capture))  # noqa: E731
        return session.config.objective, session.maybe_anchor(latent, SamplerSpace.from_flow_sigma(0.8), 0, 4, forward)

    (name, auto), (_, chosen), (_, other) = (anchored(o) for o in ("auto", "attend_excite_paper", "separate_enhance"))
    assert name == "attend_excite_paper" and torch.equal(auto, chosen) and not torch.equal(auto, other)
