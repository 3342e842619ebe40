"""What a WebUI prompt says in plain words.

Entity detection reads words, not the WebUI's prompt syntax. This module removes that syntax the
way the host reads it (``modules/prompt_parser.py``, ``modules/extra_networks.py``) without
importing the host: ``<lora:...>`` tags, emphasis ``(x:1.3)``/``(x)``/``[x]``, escapes ``\\(``,
``BREAK``, scheduling ``[from:to:when]``, alternation ``[a|b]`` and ``AND`` sub-prompts.

Scheduling and alternation change the text from step to step; mapping the text of the current
step to token columns is the host adapter's job. For detection we read the text the image ends
with: the ``to`` part of ``[from:to:when]`` and the first option of ``[a|b]``.
"""

from __future__ import annotations

import re

# modules/extra_networks.py: re_extra_net
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
# modules/prompt_parser.py: re_AND and re_weight (a sub-prompt's trailing ":weight")
_AND = re.compile(r"\bAND\b")
_SUB_PROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
# modules/prompt_parser.py: re_break
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPED = re.compile(r"\\(.)")
_INNERMOST_ROUND = re.compile(r"\(([^()\[\]]*)\)")
_INNERMOST_SQUARE = re.compile(r"\[([^()\[\]]*)\]")
_EMPHASIS_WEIGHT = re.compile(r"\s*:\s*[+-]?[.\d]+\s*$")
_SCHEDULE = re.compile(r"^(?:(?P<before>[^:]*):)?(?P<after>[^:]*):\s*[+-]?[.\d]+\s*$")
_STRAY_BRACKETS = re.compile(r"[()\[\]]")
# Escaped brackets are literal text; private-use characters keep them out of the bracket passes.
_ESCAPE_PLACEHOLDERS = {"(": "\ue000", ")": "\ue001", "[": "\ue002", "]": "\ue003", "\\": "\ue004",
                        ":": "\ue005", "|": "\ue006"}


def sub_prompts(prompt: str) -> list[str]:
    """Plain text of each ``AND`` sub-prompt, in order, their ``:weight`` suffixes dropped.

    The host conditions on each sub-prompt as a separate row, so each has its own token columns.
    """
    texts = []
    for part in _AND.split(prompt):
        match = _SUB_PROMPT_WEIGHT.search(part)
        texts.append(plain_prompt_text(match.group(1) if match else part))
    return texts


def plain_prompt_text(prompt: str) -> str:
    """The words of one (sub-)prompt with the WebUI's syntax removed; split ``AND`` with sub_prompts.

    ``BREAK`` becomes a comma: it separates parts of the prompt the way a comma does for a reader.
    Unbalanced brackets are dropped, as the host's attention parser drops them from the text.
    """
    text = _EXTRA_NETWORK.sub("", prompt)
    text = _ESCAPED.sub(lambda m: _ESCAPE_PLACEHOLDERS.get(m.group(1), m.group(1)), text)
    text = _resolve_brackets(text)
    text = _STRAY_BRACKETS.sub("", text)
    for literal, placeholder in _ESCAPE_PLACEHOLDERS.items():
        text = text.replace(placeholder, literal)
    text = _BREAK.sub(", ", text)
    return _tidy_spacing(text)


def _resolve_brackets(text: str) -> str:
    """Replace bracket groups, innermost first, by the text they stand for (see module docstring)."""
    while True:
        replaced = _INNERMOST_ROUND.sub(lambda m: _EMPHASIS_WEIGHT.sub("", m.group(1)), text)
        replaced = _INNERMOST_SQUARE.sub(lambda m: _square_bracket_text(m.group(1)), replaced)
        if replaced == text:
            return text
        text = replaced


def _square_bracket_text(inner: str) -> str:
    """``[a|b]`` -> ``a``; ``[from:to:when]`` and ``[to:when]`` -> ``to``; ``[x]`` -> ``x``."""
    if "|" in inner:
        return inner.split("|", 1)[0]
    schedule = _SCHEDULE.match(inner)
    if schedule:
        return schedule.group("after")
    return inner


def _tidy_spacing(text: str) -> str:
    """Collapse the runs of spaces and doubled commas that removed syntax leaves behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;!?])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")
