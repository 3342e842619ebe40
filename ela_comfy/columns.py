"""Entity columns exactly as ComfyUI conditions a prompt.

ComfyUI's ``CLIP.tokenize(text)`` gives, per text encoder (``l`` for SD 1.x, ``h`` for SD 2.x,
``g`` and ``l`` for SDXL), chunks of 77 ``(token, weight)`` or ``(token, weight, word id)``
entries: its weight syntax ``(word:1.2)`` already parsed into weights, prompts over 75 tokens
already split into chunks, and each ``embedding:name`` already replaced by that embedding's
vectors (tensors, one entry per vector). The encoder's outputs for the chunks are concatenated,
so chunk ``c``, entry ``j`` is cross-attention column ``77 * c + j`` (``ela_ext.tokens``).

This module turns those entries into the engine's id chunks and resolves the spec's words in
them with the same tokenizer, so the columns are those the sampler's conditioning has. An
embedding's vectors have no BPE id: each distinct vector gets a negative id of its own
(``EmbeddingIds``), and a spec word ``embedding:name`` tokenised alone gives the same vectors and
so the same ids. Host-free (only torch): the host hands in its tokenizer as a function.

MM-DiT text encoders (``resolve_joint_prompt``): SD3's ``SD3ClipModel`` conditions on CLIP-L and
CLIP-G side by side in columns 0-76 per chunk (whichever are loaded), then T5 (``t5xxl``, if
loaded) after them along the sequence; Flux's ``FluxClipModel`` on T5 alone (its CLIP-L gives the
pooled vector only). ``JointLayout`` says which of these reach the conditioning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ela_ext.anchoring import unanchorable_reason
from ela_ext.entities import EntityPhrase
from ela_ext.tokens import (CHUNK_LENGTH, EntityColumns, joint_columns, resolve_entities, resolve_t5_entities,
                            token_table)

# ``(token, weight[, word id])`` chunks of one encoder, as ComfyUI's tokenizer returns them.
TokenChunks = Sequence[Sequence[Sequence[Any]]]
# text -> {encoder key: chunks}: ComfyUI's ``CLIP.tokenize``.
Tokenize = Callable[[str], Mapping[str, TokenChunks]]

# ``embedding:name`` as it stands in a prompt, without the weight syntax around it.
EMBEDDING_NAME = re.compile(r"embedding:[^\s()\[\]{}:,]+", re.IGNORECASE)


class EmbeddingIds:
    """Negative ids for embedding vectors: equal vectors, equal ids (``torch.equal``)."""

    def __init__(self) -> None:
        self._vectors: list[torch.Tensor] = []

    def id_of(self, token: Any) -> int:
        if not isinstance(token, torch.Tensor):
            return int(token)
        for index, vector in enumerate(self._vectors):
            if vector.shape == token.shape and torch.equal(vector, token.to(vector.device, vector.dtype)):
                return -(index + 1)
        self._vectors.append(token.detach())
        return -len(self._vectors)


def id_chunks(chunks: TokenChunks, embeddings: EmbeddingIds) -> list[list[int]]:
    """The chunks' token ids, embedding vectors as ``embeddings`` ids."""
    return [[embeddings.id_of(entry[0]) for entry in chunk] for chunk in chunks]


@dataclass(frozen=True)
class EncoderTokens:
    """What one encoder's tokenizer says: its end and pad ids (SD 1.x and CLIP-L pad with the end
    id, SD 2.x's and SDXL's OpenCLIP tokenizers with 0)."""

    key: str
    end_id: int
    pad_id: int

    @property
    def pad_ids(self) -> set[int]:
        return {self.end_id, self.pad_id}


def resolve_prompt(phrases: Sequence[EntityPhrase], text: str, tokenize: Tokenize,
                   encoders: Sequence[EncoderTokens]) -> EntityColumns:
    """The phrases' columns in ``text`` as every encoder of the model tokenises it.

    Raises ``EntitySpecError`` (``EntityNotInPromptError`` naming the missing words) and
    ``ColumnsError`` when the encoders place the entities in different columns (SDXL conditions
    on both encoders side by side, column by column, so the columns must agree) or there are
    fewer than two entities.
    """
    prompt_tokens = tokenize(text)
    original_case = {name.lower(): name for name in EMBEDDING_NAME.findall(text)}
    resolved = []
    for encoder in encoders:
        embeddings = EmbeddingIds()
        chunks = id_chunks(prompt_tokens[encoder.key], embeddings)

        def tokenize_word(word: str, key: str = encoder.key, ids: EmbeddingIds = embeddings,
                          pad_ids: set[int] = encoder.pad_ids) -> list[int]:
            # An embedding name is looked up as the prompt spells it: its file name may have capitals.
            word_chunks = id_chunks(tokenize(original_case.get(word, word))[key], ids)
            return [token_id for _, token_id in token_table(word_chunks, lambda token_id: token_id, pad_ids)]

        resolved.append((encoder.key, resolve_entities(phrases, chunks, tokenize_word, encoder.pad_ids)))
    (first_key, columns), *others = resolved
    for key, other in others:
        if other != columns:
            raise ColumnsError(f"the model's text encoders place the entities in different columns "
                               f"({first_key}: {describe(columns)}; {key}: {describe(other)})")
    reason = unanchorable_reason(columns)
    if reason:
        raise ColumnsError(reason)
    return columns


@dataclass(frozen=True)
class JointLayout:
    """The parts of an MM-DiT conditioning: CLIP encoders sharing columns 0-76 per chunk, then T5
    (its tokenizer key, end and pad ids) after them, or T5 alone."""

    clip: tuple[EncoderTokens, ...] = ()
    t5: Optional[EncoderTokens] = None


def resolve_joint_prompt(phrases: Sequence[EntityPhrase], text: str, tokenize: Tokenize,
                         layout: JointLayout) -> EntityColumns:
    """The phrases' columns in an MM-DiT conditioning of ``text`` (``ela_ext.tokens.joint_columns``).

    Raises ``EntitySpecError`` and ``ColumnsError`` as ``resolve_prompt`` does.
    """
    if not layout.clip and layout.t5 is None:
        raise ColumnsError("the text encoder has neither CLIP nor T5 loaded")
    clip = resolve_prompt(phrases, text, tokenize, layout.clip) if layout.clip else None
    t5 = None
    if layout.t5 is not None:
        key, end, pad = layout.t5.key, layout.t5.end_id, layout.t5.pad_id
        offset = CHUNK_LENGTH * len(tokenize(text)[layout.clip[0].key]) if layout.clip else 0
        embeddings = EmbeddingIds()
        ids = [token_id for chunk in id_chunks(tokenize(text)[key], embeddings) for token_id in chunk]

        def tokenize_word(word: str) -> list[int]:
            word_ids = [token_id for chunk in id_chunks(tokenize(word)[key], embeddings) for token_id in chunk]
            return word_ids[:word_ids.index(end)] if end in word_ids else word_ids

        t5 = resolve_t5_entities(phrases, ids, tokenize_word, offset=offset, end_id=end, pad_id=pad)
    columns = joint_columns(clip, t5)
    reason = unanchorable_reason(columns)
    if reason:
        raise ColumnsError(reason)
    return columns


def joint_layout(clip: Any) -> Optional[JointLayout]:
    """The conditioning layout of ComfyUI's CLIP object for an MM-DiT (SD3's ``SD3ClipModel``: the
    CLIPs loaded, then T5 if loaded; Flux's ``FluxClipModel``: T5 alone), or None for the CLIP-only
    models of SD 1.x / 2.x / SDXL. Classes are recognised by name, so no ComfyUI import is needed."""
    model = clip.cond_stage_model
    classes = {cls.__name__ for cls in type(model).__mro__}
    tokenizer = clip.tokenizer
    if "SD3ClipModel" in classes:
        clip_keys = [key for key in ("l", "g") if getattr(model, f"clip_{key}", None) is not None]
        has_t5 = getattr(model, "t5xxl", None) is not None
    elif "FluxClipModel" in classes:
        clip_keys, has_t5 = [], True
    else:
        return None
    encoders = tuple(EncoderTokens(key, int(getattr(tokenizer, f"clip_{key}").end_token),
                                   int(getattr(tokenizer, f"clip_{key}").pad_token)) for key in clip_keys)
    t5 = EncoderTokens("t5xxl", int(tokenizer.t5xxl.end_token), int(tokenizer.t5xxl.pad_token)) if has_t5 else None
    return JointLayout(encoders, t5)


class ColumnsError(ValueError):
    """The prompt's columns cannot be anchored; the message says why."""


def describe(columns: EntityColumns) -> str:
    """``cat 3; frog 7 (green 6)``: each entity's columns and its attributes', for messages."""
    def numbers(values: Sequence[int]) -> str:
        return ",".join(map(str, values))

    return "; ".join(f"{entity.word} {numbers(entity.columns)}"
                     + "".join(f" ({attribute.word} {numbers(attribute.columns)})" for attribute in entity.attributes)
                     for entity in columns.entities)
