"""Map entity and attribute words to the columns of the text conditioning.

The host tokenises a prompt into chunks of 77 ids, ``[BOS] + 75 text-or-padding ids + [EOS]``
(A1111's ``PromptChunk.tokens``), and concatenates the chunks' embeddings, so chunk ``c``, position
``j`` is cross-attention column ``77 * c + j`` and column ``77 * c`` is that chunk's start-of-text
(SoT) token. A word is found by searching its BPE ids, as the host's tokenizer gives them for the
word alone, in the text ids of all chunks. That survives what the host does to the text: emphasis
syntax is stripped before tokenising, ``BREAK`` and prompts over 75 tokens start new chunks, comma
backtracking moves words to the next chunk, and long words split into several BPE tokens.

CLIP's BPE marks the end of a word, so ``cat`` does not match inside ``cats``; a spec word that is
the final piece of a longer word (``bird`` in ``hummingbird``) does match there.

MM-DiT models condition on T5 as well (``resolve_t5_entities``, ``joint_columns``). T5's
sentencepiece tokenizer gives ONE sequence, no start token: the text pieces, the end token
``</s>`` (id 1), then padding (id 0) to the host's minimum length (ComfyUI: 77 in SD3, 256 in
Flux). Pieces mark the START of a word (``▁cat``), so a word tokenised alone matches a prompt word
that begins with it: ``cat`` in ``cats`` when T5 splits it as ``▁cat`` + ``s``. SD3 concatenates
its CLIP-L/CLIP-G columns (77 per chunk, both encoders in the same columns) and then T5's along
the sequence; Flux's sequence is T5 alone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .entities import EntityPhrase, EntitySpecError, clean_word

CHUNK_LENGTH = 77
BOS_ID = 49406
# CLIP's end-of-text id; SD1 pads with it. SD2's open_clip pads with 0 instead.
EOS_ID = 49407
# T5's (sentencepiece) end and padding ids.
T5_END_ID = 1
T5_PAD_ID = 0

TokenizeWord = Callable[[str], Sequence[int]]


class EntityNotInPromptError(EntitySpecError):
    """Spec words that the prompt's tokens do not contain; ``words`` lists them."""

    def __init__(self, words: Sequence[str]):
        self.words = tuple(words)
        super().__init__(
            f"not found in the prompt: {', '.join(map(repr, self.words))}; entity and attribute "
            "words must appear in the prompt as written")


@dataclass(frozen=True)
class WordColumns:
    """A word and the conditioning columns of its tokens."""

    word: str
    columns: tuple[int, ...]


@dataclass(frozen=True)
class ResolvedEntity:
    """An entity's columns (every occurrence) and those of the attributes bound to it."""

    word: str
    columns: tuple[int, ...]
    attributes: tuple[WordColumns, ...]


@dataclass(frozen=True)
class EntityColumns:
    """Columns of all entities of one conditioning row, plus its start-of-text columns and the
    columns of all its text tokens (start-of-text, end-of-text and padding left out: the tokens
    Attend-and-Excite's softmax runs over). Two rows anchor alike when their entities and
    start-of-text columns match; ``text_columns`` does not enter the comparison."""

    entities: tuple[ResolvedEntity, ...]
    sot_columns: tuple[int, ...]
    text_columns: tuple[int, ...] = field(default=(), compare=False)

    @property
    def n_columns(self) -> int:
        """Width of a CLIP conditioning: 77 per chunk."""
        return CHUNK_LENGTH * len(self.sot_columns)


@dataclass(frozen=True)
class _Occurrence:
    """One place a word's ids appear: the columns of its tokens, first to last, and the chunk
    (the encoder's unit of text: a CLIP chunk of 77, T5's whole sequence) they are in."""

    columns: tuple[int, ...]
    chunk: int

    @property
    def start(self) -> int:
        return self.columns[0]


def chunks_from_ids(ids: Sequence[int]) -> list[list[int]]:
    """Split a flat id list (e.g. an HF CLIPTokenizer's, padded to 77) into 77-id chunks."""
    if not ids or len(ids) % CHUNK_LENGTH:
        raise ValueError(f"expected a multiple of {CHUNK_LENGTH} token ids, got {len(ids)}")
    return [list(ids[start:start + CHUNK_LENGTH]) for start in range(0, len(ids), CHUNK_LENGTH)]


def resolve_entities(phrases: Iterable[EntityPhrase], chunks: Sequence[Sequence[int]],
                     tokenize_word: TokenizeWord, pad_ids: Iterable[int] = (EOS_ID,)) -> EntityColumns:
    """Columns of each phrase's entity and attributes in the host's tokenised chunks.

    ``tokenize_word(word)`` returns the word's BPE ids without BOS/EOS (A1111:
    ``clip.tokenize([word])[0]``). An entity takes every occurrence of its word. An attribute binds
    to the occurrence closest before each of its entity's occurrences in the same chunk, so in "a
    red cube and a red ball" each "red" goes to its own noun; if none precedes, all occurrences.
    Raises EntityNotInPromptError naming every word that is not in the prompt.
    """
    text = _text_tokens(chunks, frozenset(pad_ids))
    return _resolve_in_text(phrases, text, tokenize_word, lambda column: column // CHUNK_LENGTH,
                            tuple(CHUNK_LENGTH * c for c in range(len(chunks))))


def resolve_t5_entities(phrases: Iterable[EntityPhrase], ids: Sequence[int], tokenize_word: TokenizeWord,
                        offset: int = 0, end_id: int = T5_END_ID, pad_id: int = T5_PAD_ID) -> EntityColumns:
    """Columns of each phrase in a T5 token sequence placed at column ``offset`` of the conditioning.

    ``ids``: the whole sequence as the host encodes it (text, end token, padding);
    ``tokenize_word(word)``: the word's pieces without the end token. Attributes bind as in
    ``resolve_entities`` (the sequence is one chunk). The background column (``sot_columns``) is
    the end token's: T5 has no start token, and its end token is the one every prompt has at the
    end of its words, as CLIP's start token is at their start (a PROVISIONAL choice, like the
    block choice, to be measured on a benchmark MM-DiT). Raises EntityNotInPromptError.
    """
    ids = [int(token_id) for token_id in ids]
    if end_id not in ids:
        raise ValueError("the T5 sequence has no end token")
    end = ids.index(end_id)
    text = [(offset + j, token_id) for j, token_id in enumerate(ids[:end]) if token_id != pad_id]
    return _resolve_in_text(phrases, text, tokenize_word, lambda column: 0, (offset + end,))


def joint_columns(clip: EntityColumns | None = None, t5: EntityColumns | None = None) -> EntityColumns:
    """One MM-DiT conditioning's columns from its parts: SD3's CLIP columns and T5 columns (resolved
    at ``offset = 77 * CLIP chunks``), or one of them (Flux: T5; SD3 without T5: CLIP).

    Each entity and attribute takes its columns in every part (its map is their mean, as a word
    split in several pieces). The background is CLIP's start tokens when CLIP is there (the
    paper's SoT map), else T5's end token. The parts must name the same entities in the same order
    (both come from the same phrases).
    """
    parts = [part for part in (clip, t5) if part is not None]
    if not parts:
        raise ValueError("no conditioning part")
    if any([e.word for e in part.entities] != [e.word for e in parts[0].entities] for part in parts):
        raise ValueError("the conditioning parts name different entities")

    def union(*column_sets: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted({column for columns in column_sets for column in columns}))

    entities = tuple(
        ResolvedEntity(group[0].word, union(*(entity.columns for entity in group)),
                       tuple(WordColumns(attributes[0].word, union(*(a.columns for a in attributes)))
                             for attributes in zip(*(entity.attributes for entity in group))))
        for group in zip(*(part.entities for part in parts)))
    return EntityColumns(entities, parts[0].sot_columns, union(*(part.text_columns for part in parts)))


def _resolve_in_text(phrases: Iterable[EntityPhrase], text: Sequence[tuple[int, int]], tokenize_word: TokenizeWord,
                     chunk_of: Callable[[int], int], sot_columns: tuple[int, ...]) -> EntityColumns:
    """The phrases' columns among ``text``'s ``(column, id)`` tokens; ``chunk_of(column)``: its chunk."""
    phrases = [_cleaned(phrase) for phrase in phrases]
    occurrences = {word: _find_word(word, text, tokenize_word, chunk_of)
                   for phrase in phrases for word in (*phrase.attributes, phrase.entity)}
    missing = [word for word, found in occurrences.items() if not found]
    if missing:
        raise EntityNotInPromptError(missing)
    entities = tuple(_resolve_phrase(phrase, occurrences) for phrase in phrases)
    return EntityColumns(entities, sot_columns, tuple(column for column, _ in text))


def token_table(chunks: Sequence[Sequence[int]], decode_id: Callable[[int], str],
                pad_ids: Iterable[int] = (EOS_ID,)) -> list[tuple[int, str]]:
    """``(column, token text)`` for every text token, for a UI preview of what can be anchored.

    BOS, EOS and padding are left out: they are not words a spec can name.
    """
    return [(column, decode_id(token_id)) for column, token_id in _text_tokens(chunks, frozenset(pad_ids))]


def _text_tokens(chunks: Sequence[Sequence[int]], pad_ids: frozenset[int]) -> list[tuple[int, int]]:
    """``(column, id)`` of the text tokens of all chunks: BOS, EOS and trailing padding removed."""
    text = []
    for chunk_index, chunk in enumerate(chunks):
        if len(chunk) != CHUNK_LENGTH:
            raise ValueError(f"chunk {chunk_index} has {len(chunk)} token ids, expected {CHUNK_LENGTH}")
        body = list(chunk[1:-1])
        while body and body[-1] in pad_ids:
            body.pop()
        text.extend((CHUNK_LENGTH * chunk_index + 1 + j, token_id) for j, token_id in enumerate(body))
    return text


def _find_word(word: str, text: Sequence[tuple[int, int]], tokenize_word: TokenizeWord,
               chunk_of: Callable[[int], int]) -> list[_Occurrence]:
    """Every place the word's id sequence appears in the text tokens (across chunk ends too)."""
    word_ids = list(tokenize_word(word))
    if not word_ids:
        return []
    ids = [token_id for _, token_id in text]
    width = len(word_ids)
    return [_Occurrence(tuple(column for column, _ in text[i:i + width]), chunk_of(text[i][0]))
            for i in range(len(ids) - width + 1) if ids[i:i + width] == word_ids]


def _cleaned(phrase: EntityPhrase) -> EntityPhrase:
    """The phrase's words as the host tokenised them: emphasis syntax stripped, lower case.

    Raises EntitySpecError for a word with nothing left (a phrase built by hand, as ``"(:1.2)"``;
    parse_spec and detection never give one).
    """
    cleaned = EntityPhrase(clean_word(phrase.entity), tuple(clean_word(word) for word in phrase.attributes))
    empty = [word for word, clean in zip((phrase.entity, *phrase.attributes), (cleaned.entity, *cleaned.attributes))
             if not clean]
    if empty:
        raise EntitySpecError(f"no word left in {', '.join(map(repr, empty))} once emphasis syntax and "
                              "punctuation are removed")
    return cleaned


def _resolve_phrase(phrase: EntityPhrase, occurrences: dict[str, list[_Occurrence]]) -> ResolvedEntity:
    entity_places = occurrences[phrase.entity]
    attributes = tuple(WordColumns(word, _bound_columns(occurrences[word], entity_places))
                       for word in phrase.attributes)
    return ResolvedEntity(phrase.entity, _columns_of(entity_places), attributes)


def _bound_columns(attribute_places: list[_Occurrence], entity_places: list[_Occurrence]) -> tuple[int, ...]:
    """The attribute occurrences closest before each entity occurrence, in the same chunk.

    Places come in column order (``_find_word`` scans left to right), so the closest one before
    is found by bisection: a long prompt repeating a phrase has thousands of each.
    """
    starts = [place.start for place in attribute_places]
    bound = []
    for entity in entity_places:
        closest = bisect.bisect_left(starts, entity.start) - 1
        if closest >= 0 and attribute_places[closest].chunk == entity.chunk:
            bound.append(attribute_places[closest])
    return _columns_of(bound or attribute_places)


def _columns_of(places: Iterable[_Occurrence]) -> tuple[int, ...]:
    return tuple(sorted({column for place in places for column in place.columns}))
