"""Property tests (hypothesis) of everything that reads user text: the entity spec, detection, the
WebUI prompt syntax and the word -> column mapping.

Users paste anything into a prompt. Each property holds for every generated input: the function
returns a result of the documented shape, or raises the engine's own ``EntitySpecError`` with a
message naming the problem, never another exception. Prompts are built from the WebUI's syntax
(emphasis, ``BREAK``, scheduling, alternation, ``AND``, extra-network tags, escapes), stray and
unbalanced brackets, unicode and arbitrary text (prompt_strategies.py). Example counts are modest
to keep CI short; every run draws new examples (``ELA_FUZZ_EXAMPLES`` raises the count).
"""

from __future__ import annotations

import os
import re
import time

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from a1111_chunks import tokenize_line
from prompt_strategies import (ADJECTIVES, NOUNS, NUMBERS, PLAIN_WORDS, PROMPTS, SPECS, UNICODE_WORDS,
                               WEIGHTS)
from ela_ext.entities import (EntityPhrase, EntitySpecError, clean_word, detect_entities, format_spec,
                              parse_spec)
from ela_ext.prompt_text import plain_prompt_text, sub_prompts
from ela_ext.tokens import CHUNK_LENGTH, EOS_ID, EntityNotInPromptError, resolve_entities

# ELA_FUZZ_EXAMPLES=5000 runs a deeper search than CI's.
EXAMPLES = int(os.environ.get("ELA_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Properties that run the host's tokenizer (transformers' pure-Python CLIP BPE, ~0.3 s an example).
FUZZ_TOKENIZER = settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 5))

def _word_ids(tokenizer):
    """``tokenize_word`` for resolve_entities: the ids without BOS/EOS, as the host's
    ``clip.tokenize([word])[0]``."""
    return lambda word: tokenizer(word, add_special_tokens=False)["input_ids"]


def _spec_error_named(error: EntitySpecError) -> bool:
    """parse_spec's errors name the phrase at fault or the repeated entity."""
    return bool(re.search(r"phrase \d+ of the entity spec|named more than once", str(error)))


def _well_formed(phrases: list[EntityPhrase]) -> None:
    """Spec words as the tokenizer is asked for them: non-empty, one word each, no spec syntax."""
    for phrase in phrases:
        for word in (*phrase.attributes, phrase.entity):
            assert word and word == word.strip() and len(word.split()) == 1, phrase
            assert not set(word) & set("|()[]"), phrase


@FUZZ
@given(PROMPTS)
def test_prompt_text_reads_any_prompt(prompt):
    text = plain_prompt_text(prompt)
    assert text == text.strip(" ,") and "  " not in text
    assert not re.search(r"\bBREAK\b", text)
    if "\\" not in prompt:
        assert not set(text) & set("()[]")
    parts = sub_prompts(prompt)
    assert len(parts) == len(re.split(r"\bAND\b", prompt)) and all(isinstance(part, str) for part in parts)


def _kept_word(word: str, other: str, weight: str, when: str) -> st.SearchStrategy[str]:
    """``word`` in syntax whose text (for detection: what the image ends with) is ``word``."""
    return st.sampled_from([word, f"({word})", f"(({word}))", f"({word}:{weight})", f"[{word}]", f"[[{word}]]",
                            f"[{other}:{word}:{when}]", f"[{word}:{when}]", f"[{word}|{other}]",
                            f"<lora:{other}:{weight}> {word}", f"{word} BREAK"])


@FUZZ
@given(st.lists(st.tuples(PLAIN_WORDS, PLAIN_WORDS, WEIGHTS, NUMBERS), min_size=1, max_size=12).flatmap(
    lambda words: st.tuples(st.just([word for word, *_ in words]),
                            st.tuples(*(_kept_word(*choice) for choice in words)))))
def test_plain_text_keeps_every_word_through_syntax(case):
    words, written = case
    text = plain_prompt_text(" ".join(written))
    assert [word for word in text.replace(",", " ").split()] == words


@FUZZ
@given(SPECS)
def test_parse_spec_gives_phrases_or_names_the_problem(spec):
    try:
        phrases = parse_spec(spec)
    except EntitySpecError as error:
        assert _spec_error_named(error), error
        return
    assert len(phrases) == (spec.count("|") + 1 if spec.strip() else 0)
    assert len({phrase.entity for phrase in phrases}) == len(phrases)
    _well_formed(phrases)
    # The infotext stores format_spec; pasting it back must give the same phrases.
    assert parse_spec(format_spec(phrases)) == phrases


@FUZZ
@given(PROMPTS)
def test_detection_gives_a_spec_that_reads_back(prompt):
    phrases = detect_entities(prompt, use_spacy=False)
    assert len({phrase.entity for phrase in phrases}) == len(phrases)
    _well_formed(phrases)
    assert all(any(c.isalpha() for c in phrase.entity) for phrase in phrases)
    # Generation writes the detected entities into the infotext as a spec; it must read back.
    assert parse_spec(format_spec(phrases)) == phrases


def _host_chunks(prompt: str, tokenizer) -> list[list[int]]:
    """The host's chunks (its parser, ported); a prompt the host itself rejects is not ours to test.

    A1111 raises ValueError on an emphasis weight that is no number, e.g. ``(cat:.)``: the token
    route answers that with a 422 (tests/webui/test_robustness.py).
    """
    try:
        return tokenize_line(prompt, tokenizer)
    except ValueError as error:
        assert "could not convert string to float" in str(error)
        reject()


def _assert_columns_hold_the_words(resolved, chunks, tokenize_word) -> None:
    """Every column is a text token of its word, never a start-of-text, end or padding column."""
    flat = [token_id for chunk in chunks for token_id in chunk]
    for entity in resolved.entities:
        for word, columns in [(entity.word, entity.columns)] + [(a.word, a.columns) for a in entity.attributes]:
            ids = set(tokenize_word(word))
            assert columns and all(0 < c < len(flat) and c % CHUNK_LENGTH for c in columns), (word, columns)
            assert all(flat[c] in ids and flat[c] != EOS_ID for c in columns), (word, columns)
    assert resolved.sot_columns == tuple(range(0, len(flat), CHUNK_LENGTH))


@FUZZ_TOKENIZER
@given(PROMPTS, st.one_of(SPECS, st.just("")), st.data())
def test_token_mapping_gives_columns_or_names_missing_words(clip_tokenizer, prompt, spec, data):
    tokenize_word = _word_ids(clip_tokenizer)
    chunks = _host_chunks(prompt, clip_tokenizer)
    try:
        phrases = parse_spec(spec)
    except EntitySpecError:
        return
    if not phrases:
        # Half the time a spec of the prompt's own words, which must usually be found.
        words = [word for word in re.split(r"[\s()\[\]:|<>\\]+", prompt) if word]
        phrases = detect_entities(prompt, use_spacy=False) if not words or data.draw(st.booleans()) else \
            [EntityPhrase(word) for word in dict.fromkeys(data.draw(st.lists(st.sampled_from(words), max_size=3)))]
    spec_words = [word for phrase in phrases for word in (phrase.entity, *phrase.attributes)]
    try:
        resolved = resolve_entities(phrases, chunks, tokenize_word)
    except EntityNotInPromptError as error:
        assert error.words and set(error.words) <= set(map(clean_word, spec_words))
        assert all(repr(word) in str(error) for word in error.words)
        return
    except EntitySpecError as error:
        # A hand-built phrase whose word is only syntax or punctuation.
        assert "no word left in" in str(error) and any(not clean_word(word) for word in spec_words), error
        return
    assert [entity.word for entity in resolved.entities] == [clean_word(phrase.entity) for phrase in phrases]
    _assert_columns_hold_the_words(resolved, chunks, tokenize_word)


EMPHASIS = st.sampled_from(["{}", "({})", "[{}]", "({}:1.2)", "(({}))", "{} BREAK", "{},"])


@FUZZ_TOKENIZER
@given(st.lists(st.tuples(st.sampled_from(ADJECTIVES + [""]), st.sampled_from(NOUNS + UNICODE_WORDS),
                          EMPHASIS, st.sampled_from(["and", "with", ",", "next to", "or"])),
                min_size=1, max_size=6))
def test_detected_entities_are_found_in_the_host_tokens(clip_tokenizer, parts):
    """Detection and mapping agree: what detection reads in a prompt of words, emphasis and
    BREAK, the host's tokens hold, so the empty spec never warns "not found"."""
    prompt = " ".join(f"a {template.format((adjective + ' ' + noun).strip())} {glue}"
                      for adjective, noun, template, glue in parts)
    phrases = detect_entities(prompt, use_spacy=False)
    chunks = tokenize_line(prompt, clip_tokenizer)
    resolved = resolve_entities(phrases, chunks, _word_ids(clip_tokenizer))
    assert len(resolved.entities) == len(phrases)


LONG_PROMPTS = {
    "sentence repeated": "a black cat and a green frog, " * 340,
    "whitespace run": " " * 10_000 + "a cat and a frog",
    "deep nesting": "(a " * 3_333 + ")" * 3_333,
    "schedules everywhere": "[cat:dog:0.5] " * 720,
    "unbalanced": "(" * 5_000 + "[" * 5_000,
    "weights everywhere": "(cat:1.1) " * 1_000,
    "entities everywhere": "red cat " * 1_250,
}


@pytest.mark.parametrize("name", LONG_PROMPTS)
def test_ten_thousand_character_prompt(clip_tokenizer, name, capsys):
    """Every step on a 10k-character prompt; the time is printed (no wall-clock assertion: the
    CI machine's load varies), the result checked. The textual passes take time linear in the
    length (each pattern matched from an anchor; brackets in one pass)."""
    prompt = LONG_PROMPTS[name]
    assert len(prompt) >= 10_000
    started = time.perf_counter()
    text = sub_prompts(prompt)[0]
    phrases = detect_entities(prompt, use_spacy=False)
    text_seconds = time.perf_counter() - started
    # The tokenizer collapses whitespace itself; collapsed first, the port's pure-Python tokenizer
    # takes a fraction of the time and gives the same chunks.
    chunks = tokenize_line(" ".join(prompt.split()), clip_tokenizer)
    started = time.perf_counter()
    try:
        resolve_entities(phrases, chunks, _word_ids(clip_tokenizer))
    except EntityNotInPromptError:
        pass
    mapping_seconds = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n10k prompt '{name}': text+detection {text_seconds:.3f} s, mapping {mapping_seconds:.3f} s "
              f"({len(chunks)} chunks, {len(phrases)} entities)")
    assert len(text) <= len(prompt) and len({phrase.entity for phrase in phrases}) == len(phrases)


# Regressions: defects the properties above found.

@pytest.mark.parametrize("prompt, text", [
    (" " * 10_000 + "a cat", "a cat"),             # was quadratic in the run of spaces (seconds)
    ("(" * 5_000 + "cat" + ")" * 5_000, "cat"),    # was one pass per nesting level
    ("([)] (x) [y]", "x y"),                       # a crossed pair never closes; later groups do
    ("a [cat:dog:1e3] b", "a dog b"),              # the schedule parser's numbers take an exponent
    ("a (cat:1e3)", "a cat:1e3"),                  # emphasis weights do not (re_attention)
])
def test_prompt_text_regressions(prompt, text):
    assert plain_prompt_text(prompt) == text


@pytest.mark.parametrize("source, phrases", [
    # Detection gave cat 999 attributes "cat" and mapping then took minutes.
    (lambda: detect_entities("(cat:1.1) " * 1_000, use_spacy=False), [EntityPhrase("cat")]),
    (lambda: parse_spec("red red cat cat | frog"), [EntityPhrase("cat", ("red",)), EntityPhrase("frog")]),
])
def test_attributes_are_distinct_and_never_the_entity(source, phrases):
    assert source() == phrases


def test_attribute_binding_on_a_long_repeating_prompt(clip_tokenizer):
    """Thousands of occurrences (bound by bisection now, was quadratic): each "red" still binds to
    the "cat" right after it, and "old" (only before the first cat) to all cats of its chunk."""
    prompt = "an old " + "red cat, " * 600
    chunks = tokenize_line(prompt, clip_tokenizer)
    resolved = resolve_entities(parse_spec("old red cat"), chunks,
                                _word_ids(clip_tokenizer))
    (cat,) = resolved.entities
    old, red = cat.attributes
    assert len(cat.columns) == 600 and red.columns == tuple(column - 1 for column in cat.columns)
    assert old.columns == (2,)
