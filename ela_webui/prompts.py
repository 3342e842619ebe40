"""Entity columns exactly as the WebUI conditions a prompt (host.md "Prompt -> token columns").

Generation and the token route both go through ``resolve`` so the preview shows what generation
anchors: the loaded model's own ``tokenize_line`` (emphasis, ``BREAK``, 75-token chunks, comma
backtracking and embeddings included), on the first ``AND`` sub-prompt, at one step's schedule.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from modules import extra_networks, prompt_parser, shared

from ela_ext.anchoring import unanchorable_reason
from ela_ext.entities import EntityPhrase, EntitySpecError, detect_entities, parse_spec
from ela_ext.tokens import EntityColumns, joint_columns, resolve_entities, resolve_t5_entities, token_table
from ela_webui.embeddings import EmbeddingAwareEncoder
from ela_webui.mmdit import model_family

# The token route has no step count; step 0's text is the same for any count large enough that a
# fractional [from:to:0.1] has not switched yet.
PREVIEW_STEPS = 100
_WHITESPACE_RUN = re.compile(r"\s+")


def text_encoder(sd_model=None):
    """The CLIP-L tokenizer generation uses: SD1/2 ``cond_stage_model``, SDXL
    ``conditioner.embedders[0]`` (both encoders chunk alike), A1111's SD3 CLIP-L/G model
    (``cond_stage_model.model_lg``: its chunks are the first columns of SD3's context), Forge's
    text processing engine; with textual-inversion embeddings' vectors made nameable
    (``embeddings``)."""
    model = sd_model or shared.sd_model
    for forge_engine in ("text_processing_engine_l", "text_processing_engine"):
        if getattr(model, forge_engine, None) is not None:
            return EmbeddingAwareEncoder(getattr(model, forge_engine))
    if hasattr(model, "conditioner"):
        return EmbeddingAwareEncoder(model.conditioner.embedders[0])
    if getattr(model.cond_stage_model, "model_lg", None) is not None:
        return EmbeddingAwareEncoder(model.cond_stage_model.model_lg)
    return EmbeddingAwareEncoder(model.cond_stage_model)


def first_sub_prompt(prompt: str) -> tuple[str, int]:
    """The text of the first ``AND`` sub-prompt (the one ELA anchors) and the number of them.

    Whitespace runs are collapsed first: the host's sub-prompt weight pattern takes quadratic time
    on them (14 s for 20000 spaces), and its tokenizer collapses them anyway, so the tokens are the
    same.
    """
    res_indexes, flat, _ = prompt_parser.get_multicond_prompt_list([_WHITESPACE_RUN.sub(" ", prompt)])
    return flat[res_indexes[0][0][0]], len(res_indexes[0])


class PromptSyntaxError(ValueError):
    """The WebUI's own prompt parser fails on the prompt (it would fail the generation too)."""


@contextlib.contextmanager
def host_parser():
    """Turn what the WebUI's prompt parser raises on a malformed prompt into PromptSyntaxError:
    ``(cat:.)`` (its emphasis pattern takes "." for a weight, then float() fails) and
    ``[a:b:1e999]`` (an infinite step)."""
    try:
        yield
    except (ValueError, OverflowError) as error:
        hint = "; an emphasis weight in (word:weight) must be a number" if "to float" in str(error) else ""
        raise PromptSyntaxError(f"the WebUI cannot parse this prompt: {error}{hint}") from error


def scheduled_texts(text: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]`` as prompt_parser schedules ``[from:to:when]`` and ``[a|b]``.

    Both need a square bracket; without one the host's schedule is the text itself for all steps,
    so its parser (an Earley parser: seconds on a prompt with a few dozen round brackets) is skipped.
    """
    if "[" not in text:
        return [(steps if hires_steps is None or shared.opts.use_old_scheduling else hires_steps, text)]
    with host_parser():
        schedule = prompt_parser.get_learned_conditioning_prompt_schedules(
            [text], steps, hires_steps, shared.opts.use_old_scheduling)[0]
    return [(end_at_step, scheduled) for end_at_step, scheduled in schedule]


def text_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The scheduled text for denoiser call ``step``, picked as reconstruct_multicond_batch does."""
    for end_at_step, text in schedule:
        if step <= end_at_step:
            return text
    return schedule[0][1]


def entity_phrases(spec: str, prompt: str) -> list[EntityPhrase]:
    """The user's spec, or the entities detected in the prompt when it is blank."""
    return parse_spec(spec) or detect_entities(prompt)


def decode_token(encoder, token_id: int) -> str:
    """A BPE piece as text (``cat</w>``): HF tokenizer for SD1/SDXL, open_clip's for SD2."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer.convert_ids_to_tokens(int(token_id))
    import open_clip

    return open_clip.tokenizer._tokenizer.decoder[int(token_id)]


@dataclass(frozen=True)
class Resolved:
    """One text's chunks and entity columns; for an MM-DiT with T5, also T5's ids and the column
    where they start (``t5_offset``), and the columns of the CLIP part alone."""

    chunks: list[list[int]]
    columns: EntityColumns
    t5_ids: tuple[int, ...] = ()
    t5_offset: int = 0
    clip_columns: EntityColumns | None = None

    @property
    def problem(self) -> str | None:
        """Why this text cannot be anchored, or None."""
        return unanchorable_reason(self.columns)


def resolve(phrases: list[EntityPhrase], text: str, encoder=None) -> Resolved:
    """Tokenise ``text`` (one sub-prompt at one step) with the model and map ``phrases`` onto it.

    Raises ``EntitySpecError`` (``EntityNotInPromptError`` included) with the reason, and
    ``PromptSyntaxError`` where the model's own prompt parser fails.
    """
    encoder = encoder or text_encoder()
    with host_parser():
        chunks = [list(chunk.tokens) for chunk in encoder.tokenize_line(text)[0]]
    columns = resolve_entities(phrases, chunks, lambda word: encoder.tokenize([word])[0], pad_ids(encoder))
    return Resolved(chunks, columns)


def pad_ids(encoder) -> set[int]:
    """What fills a chunk after its text: ``tokenize_line`` pads with the end id on every model
    (A1111 and Forge); OpenCLIP's pad id 0 (SD 2.x, SDXL's bigG) is put in only when encoding,
    and 0 is also the id of "!", which is text."""
    return {encoder.id_end}


def token_rows(chunks: list[list[int]], encoder=None) -> list[dict]:
    """``{"column", "text", "word"}`` per text token; ``word`` joins a word's BPE pieces, so a UI
    can toggle the word a piece belongs to."""
    encoder = encoder or text_encoder()
    table = token_table(chunks, lambda token_id: decode_token(encoder, token_id), pad_ids(encoder))
    rows, pieces = [], []
    for column, piece in table:
        pieces.append((column, piece.replace("</w>", "")))
        if piece.endswith("</w>") or column == table[-1][0]:
            word = "".join(text for _, text in pieces)
            rows.extend({"column": c, "text": text, "word": word} for c, text in pieces)
            pieces = []
    return rows


def strip_extra_networks(prompt: str) -> str:
    """``<lora:x:1>`` and other extra-network tags removed, as generation does before conditioning."""
    return extra_networks.parse_prompt(prompt)[0]


class T5Text:
    """The host's T5 tokeniser as generation uses it for an MM-DiT's context, or None when the
    context carries no T5 text (A1111 and Forge leave SD3's T5 part zeros unless the setting
    ``sd3_enable_t5`` is on; Flux always has it).

    A1111's SD3 pads or cuts T5's ids to the CLIP part's length (``Sd3T5.tokenize_line`` with
    ``target_token_count``); Forge's engine pads to 256 and more. Forge encodes each ``BREAK``
    chunk of T5 as a batch row of its own (a host bug: the rows no longer match the images), so a
    T5 prompt with BREAK is refused."""

    def __init__(self, encoder, forge: bool):
        self.encoder = encoder
        self.forge = forge
        self.end_id = int(encoder.id_end)
        self.pad_id = int(encoder.id_pad)

    @classmethod
    def of(cls, sd_model) -> "T5Text | None":
        family = model_family(sd_model)
        forge_engine = getattr(sd_model, "text_processing_engine_t5", None)
        if forge_engine is not None:
            return cls(forge_engine, True) if family == "flux" or shared.opts.sd3_enable_t5 else None
        model_t5 = getattr(sd_model.cond_stage_model, "model_t5", None)
        if model_t5 is not None and model_t5.t5xxl is not None and shared.opts.sd3_enable_t5:
            return cls(model_t5, False)
        return None

    def ids(self, text: str, length: int) -> list[int]:
        """The ids the context's T5 columns hold; ``length``: the CLIP part's (A1111 pads to it)."""
        with host_parser():
            if not self.forge:
                return list(self.encoder.tokenize_line(text, target_token_count=length)[0])
            chunks, _ = self.encoder.tokenize_line(text)
        if len(chunks) > 1:
            raise EntitySpecError("BREAK in a prompt for T5: Forge encodes each part as an image of its own")
        return list(chunks[0].tokens)

    def tokenize_word(self, word: str) -> list[int]:
        return list(self.encoder.tokenize([word])[0])

    def piece(self, token_id: int) -> str:
        return self.encoder.tokenizer.convert_ids_to_tokens(int(token_id))


def resolve_for_model(phrases: list[EntityPhrase], text: str, sd_model=None, encoder=None) -> Resolved:
    """``resolve`` for the loaded model's whole text conditioning: a UNet's CLIP chunks; SD3's CLIP
    chunks then, when its T5 is on, T5's ids (from column 77 x chunks); Flux's T5 ids alone (its
    CLIP-L gives only the pooled vector). ``encoder``: the CLIP encoder to tokenise with (default
    ``text_encoder(model)``); a caller that shows the tokens passes its own, since an embedding's
    vectors get ids only that encoder can name. Raises as ``resolve``."""
    model = sd_model or shared.sd_model
    family = model_family(model)
    encoder = encoder or text_encoder(model)
    if family is None:
        return resolve(phrases, text, encoder)
    clip = resolve(phrases, text, encoder) if family == "sd3" else None
    t5 = T5Text.of(model)
    if t5 is None:
        if clip is None:
            raise EntitySpecError("this Flux model has no T5 text encoder to read the entities from")
        return Resolved(clip.chunks, clip.columns, clip_columns=clip.columns)
    offset = 77 * len(clip.chunks) if clip else 0
    ids = t5.ids(text, offset)
    if t5.end_id not in ids:
        raise EntitySpecError(f"the prompt is longer than the {len(ids)} T5 tokens the model reads")
    t5_columns = resolve_t5_entities(phrases, ids, t5.tokenize_word, offset=offset, end_id=t5.end_id,
                                     pad_id=t5.pad_id)
    return Resolved(clip.chunks if clip else [], joint_columns(clip.columns if clip else None, t5_columns),
                    tuple(ids), offset, clip.columns if clip else None)


def t5_token_rows(resolved: Resolved, sd_model=None) -> list[dict]:
    """``token_rows`` for the T5 part: SentencePiece starts a word with "\u2581"."""
    t5 = T5Text.of(sd_model or shared.sd_model)
    if t5 is None or not resolved.t5_ids:
        return []
    rows, word = [], []
    end = resolved.t5_ids.index(t5.end_id)
    pieces = [(resolved.t5_offset + j, t5.piece(token_id)) for j, token_id in enumerate(resolved.t5_ids[:end])
              if token_id != t5.pad_id]
    for position, (column, piece) in enumerate(pieces):
        word.append((column, piece.lstrip("\u2581")))
        if position + 1 == len(pieces) or pieces[position + 1][1].startswith("\u2581"):
            joined = "".join(text for _, text in word)
            rows.extend({"column": c, "text": text, "word": joined} for c, text in word)
            word = []
    return rows
