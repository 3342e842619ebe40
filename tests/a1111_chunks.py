"""A stand-in for A1111's prompt chunking, following the host's real code, for tests CI can run.

The WebUI cannot run in unit tests, but ``ela_ext.tokens`` must map words in the chunks it makes.
This is a faithful port of ``modules/prompt_parser.py: parse_prompt_attention`` and
``modules/sd_hijack_clip.py: TextConditionalModel.tokenize_line`` (A1111 v1.10) with emphasis on,
``comma_padding_backtrack = 20`` (the default) and no textual-inversion embeddings. It returns each
``PromptChunk.tokens``: ``[BOS] + 75 + [EOS]``, padded with EOS.
"""

from __future__ import annotations

import re

CHUNK_LENGTH = 75
COMMA_PADDING_BACKTRACK = 20

re_attention = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """Port of the host's parser: ``[[text, weight], ...]``; ``["BREAK", -1]`` marks a BREAK."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start_position: int, multiplier: float) -> None:
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(re_break, text)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]

    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def tokenize_line(line: str, tokenizer) -> list[list[int]]:
    """Port of ``tokenize_line``: the 77-id token lists of the prompt's chunks.

    ``tokenizer`` is a transformers CLIPTokenizer, called as the host's
    ``FrozenCLIPEmbedderWithCustomWords.tokenize`` calls it.
    """
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma_token = tokenizer.get_vocab()[",</w>"]
    parsed = parse_prompt_attention(line)
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]

    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        chunk = [id_start] + chunk + [id_end] * (CHUNK_LENGTH - len(chunk)) + [id_end]
        last_comma = -1
        chunks.append(chunk)
        chunk = []

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tokens:
            if token == comma_token:
                last_comma = len(chunk)
            elif (len(chunk) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk) - last_comma <= COMMA_PADDING_BACKTRACK):
                break_location = last_comma + 1
                relocated = chunk[break_location:]
                chunk = chunk[:break_location]
                next_chunk()
                chunk = relocated
            if len(chunk) == CHUNK_LENGTH:
                next_chunk()
            chunk.append(token)

    if chunk or not chunks:
        next_chunk()
    return chunks
