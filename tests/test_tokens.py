"""Word -> conditioning column mapping on chunks made the way A1111 makes them, real CLIP ids."""

from __future__ import annotations

import pytest

from a1111_chunks import tokenize_line
from ela_ext.entities import EntityPhrase, EntitySpecError, parse_spec
from ela_ext.tokens import (EOS_ID, EntityColumns, EntityNotInPromptError, chunks_from_ids,
                            resolve_entities, token_table)

FILLER_73 = " ".join(["very"] * 73)


@pytest.fixture(scope="module")
def tokenize_word(clip_tokenizer):
    """The word's ids without BOS/EOS, as the host's ``clip.tokenize([word])[0]`` gives them."""
    return lambda word: clip_tokenizer(word, add_special_tokens=False)["input_ids"]


def resolve(prompt: str, spec: str, tokenizer) -> EntityColumns:
    chunks = tokenize_line(prompt, tokenizer)
    return resolve_entities(parse_spec(spec), chunks,
                            lambda word: tokenizer(word, add_special_tokens=False)["input_ids"])


def columns_by_word(resolved: EntityColumns) -> dict[str, tuple[int, ...]]:
    """``{"cat": (3,), "cat/black": (2,)}``: entity columns, and attribute columns under entity/attr."""
    table = {}
    for entity in resolved.entities:
        table[entity.word] = entity.columns
        table.update({f"{entity.word}/{attribute.word}": attribute.columns for attribute in entity.attributes})
    return table


def test_real_clip_ids(clip_tokenizer):
    assert clip_tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_stand_in_chunk_is_bos_text_eos_padding(clip_tokenizer):
    assert tokenize_line("a photo of a cat", clip_tokenizer) == [[49406, 320, 1125, 539, 320, 2368] + [EOS_ID] * 71]


# (case, prompt, spec, expected columns; "entity/attribute" keys are the attribute's columns)
CASES = [
    ("plain", "a black cat and a green frog", "black cat | green frog",
     {"cat": (3,), "cat/black": (2,), "frog": (7,), "frog/green": (6,)}),
    ("emphasis in prompt and spec", "a (black cat:1.3) and a [frog]", "(black cat:1.3) | [frog]",
     {"cat": (3,), "cat/black": (2,), "frog": (6,)}),
    ("nested emphasis", "a ((red)) cube, [[ball]]", "red cube | ball",
     {"cube": (3,), "cube/red": (2,), "ball": (5,)}),
    ("upper case", "A BLACK Cat and a Green FROG", "Black CAT | green frog",
     {"cat": (3,), "cat/black": (2,), "frog": (7,), "frog/green": (6,)}),
    ("BREAK starts chunk 2 at column 77", "a black cat BREAK a green frog", "black cat | green frog",
     {"cat": (3,), "cat/black": (2,), "frog": (80,), "frog/green": (79,)}),
    # 2 + 80 + 2 tokens: chunk 1 holds "a cat" and 73 "very"; chunk 2 the other 7, "a", "frog".
    ("over 75 tokens, entity in chunk 2", "a cat " + " ".join(["very"] * 80) + " a frog", "cat | frog",
     {"cat": (2,), "frog": (77 + 9,)}),
    # "a cat" + 70 "very" + "," fill 73 columns; "green frog" would end chunk 1 at 74-75, but the next
    # token overflows and comma backtracking moves the words after the comma into chunk 2.
    ("comma backtracking", "a cat " + " ".join(["very"] * 70) + ", green frog standing", "cat | green frog",
     {"cat": (2,), "frog": (79,), "frog/green": (78,)}),
    ("multi-token words", "an axolotl next to a small red teapot", "axolotl | small red teapot",
     {"axolotl": (2, 3, 4, 5), "teapot": (11,), "teapot/small": (9,), "teapot/red": (10,)}),
    ("repeated entity: every occurrence", "a cat and a dog and a cat", "cat | dog",
     {"cat": (2, 8), "dog": (5,)}),
    ("attribute binds to the closest before its entity", "a red cube and a red ball", "red cube | red ball",
     {"cube": (3,), "cube/red": (2,), "ball": (7,), "ball/red": (6,)}),
    ("attribute after its entity: all occurrences", "a cube painted red and a ball", "red cube | ball",
     {"cube": (2,), "cube/red": (4,), "ball": (7,)}),
    ("attribute in another chunk: all occurrences", "a red cube BREAK a red ball", "red ball | cube",
     {"ball": (80,), "ball/red": (79,), "cube": (3,)}),
]


@pytest.mark.parametrize("prompt, spec, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_resolve_columns(clip_tokenizer, prompt, spec, expected):
    assert columns_by_word(resolve(prompt, spec, clip_tokenizer)) == expected


@pytest.mark.parametrize("prompt, spec, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_resolved_columns_hold_the_words_tokens(clip_tokenizer, prompt, spec, expected):
    """Independent of the hand-counted columns: each column's token is a piece of its word."""
    chunks = tokenize_line(prompt, clip_tokenizer)
    flat = [token_id for chunk in chunks for token_id in chunk]
    for key, columns in expected.items():
        word = key.split("/")[-1]
        width = len(clip_tokenizer.tokenize(word))
        for start in range(0, len(columns), width):
            pieces = clip_tokenizer.convert_ids_to_tokens([flat[c] for c in columns[start:start + width]])
            assert "".join(pieces).replace("</w>", "") == word


def test_sot_columns_and_width_follow_chunks(clip_tokenizer):
    one_chunk = resolve("a cat and a frog", "cat | frog", clip_tokenizer)
    two_chunks = resolve("a cat BREAK a frog", "cat | frog", clip_tokenizer)
    assert (one_chunk.sot_columns, one_chunk.n_columns) == ((0,), 77)
    assert (two_chunks.sot_columns, two_chunks.n_columns) == ((0, 77), 154)


def test_comma_backtracking_really_moved_the_words(clip_tokenizer):
    """Guards the case above: without backtracking "frog" would sit at column 75 of chunk 1."""
    chunks = tokenize_line("a cat " + " ".join(["very"] * 70) + ", green frog standing", clip_tokenizer)
    comma = clip_tokenizer.get_vocab()[",</w>"]
    assert chunks[0][73] == comma and chunks[0][74:] == [EOS_ID] * 3


def test_missing_word_is_named(clip_tokenizer):
    with pytest.raises(EntityNotInPromptError, match="'frog'") as error:
        resolve("a black cat and a dog", "black cat | frog", clip_tokenizer)
    assert error.value.words == ("frog",)
    assert "as written" in str(error.value)
    assert isinstance(error.value, EntitySpecError)


def test_all_missing_words_are_named_at_once(clip_tokenizer):
    with pytest.raises(EntityNotInPromptError) as error:
        resolve("a cat and a dog", "green frog | cat | blue bird", clip_tokenizer)
    assert error.value.words == ("green", "frog", "blue", "bird")


def test_word_does_not_match_inside_a_longer_word(clip_tokenizer):
    """CLIP's BPE ends words with </w>: "cat" is not a piece of "cats"."""
    with pytest.raises(EntityNotInPromptError, match="'cat'"):
        resolve("two cats and a dog", "cat | dog", clip_tokenizer)


def test_phrases_with_emphasis_syntax_are_cleaned(clip_tokenizer, tokenize_word):
    chunks = tokenize_line("a black cat", clip_tokenizer)
    resolved = resolve_entities([EntityPhrase("(Cat:1.2)", ("[black]",))], chunks, tokenize_word)
    assert columns_by_word(resolved) == {"cat": (3,), "cat/black": (2,)}


def test_hf_padded_ids_split_into_chunks_match_the_host_chunks(clip_tokenizer, tokenize_word):
    """The diffusers side tokenises with padding to 77; split, it gives the host's columns."""
    prompt = "a small red teapot and a hummingbird"
    ids = clip_tokenizer(prompt, padding="max_length", max_length=77)["input_ids"]
    assert chunks_from_ids(ids) == tokenize_line(prompt, clip_tokenizer)
    resolved = resolve_entities(parse_spec("small red teapot | hummingbird"), chunks_from_ids(ids), tokenize_word)
    assert columns_by_word(resolved)["hummingbird"] == (7,)


def test_chunks_from_ids_splits_at_77():
    ids = list(range(154))
    assert chunks_from_ids(ids) == [ids[:77], ids[77:]]


@pytest.mark.parametrize("length", [0, 76, 78])
def test_chunks_from_ids_rejects_partial_chunks(length):
    with pytest.raises(ValueError, match="multiple of 77"):
        chunks_from_ids(list(range(length)))


def test_resolve_rejects_chunks_not_77_long(tokenize_word):
    with pytest.raises(ValueError, match="chunk 0 has 76"):
        resolve_entities(parse_spec("cat"), [[49406] + [2368] + [EOS_ID] * 74], tokenize_word)


def test_open_clip_zero_padding_is_skipped(clip_tokenizer, tokenize_word):
    """SD2's open_clip pads after the EOS with 0; with pad_ids covering it, 0s are not text."""
    chunk = [49406, 320, 2368, EOS_ID] + [0] * 73
    resolved = resolve_entities(parse_spec("cat"), [chunk], tokenize_word, pad_ids=(EOS_ID, 0))
    assert resolved.entities[0].columns == (2,)
    assert token_table([chunk], clip_tokenizer.convert_ids_to_tokens, pad_ids=(EOS_ID, 0)) == [
        (1, "a</w>"), (2, "cat</w>")]


def test_token_table_lists_text_tokens_with_columns(clip_tokenizer):
    chunks = tokenize_line("a cat BREAK an axolotl", clip_tokenizer)
    assert token_table(chunks, clip_tokenizer.convert_ids_to_tokens) == [
        (1, "a</w>"), (2, "cat</w>"), (78, "an</w>"), (79, "ax"), (80, "o"), (81, "lot"), (82, "l</w>")]


def test_text_columns_are_the_prompts_tokens_without_start_end_or_padding(clip_tokenizer):
    """Attend-and-Excite's softmax runs over these; they do not decide whether two rows match."""
    resolved = resolve("a black cat", "black cat", clip_tokenizer)
    assert resolved.text_columns == (1, 2, 3)
    long = resolve("a cat " * 40, "cat", clip_tokenizer)  # two chunks: each chunk's text, no BOS/EOS
    assert long.text_columns[:2] == (1, 2) and 77 not in long.text_columns and 78 in long.text_columns
    assert resolved == EntityColumns(resolved.entities, resolved.sot_columns)
