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
# modules/prompt_parser.py: re_AND, and re_weight's trailing ":weight" of a sub-prompt. Only that
# suffix is matched, from its colon: the host's whole-text pattern takes quadratic time on long
# runs of spaces.
_AND = re.compile(r"\bAND\b")
_SUB_PROMPT_WEIGHT = re.compile(r":\s*[-+]?(?:\d+\.?|\d*\.\d+)\s*$")
# modules/prompt_parser.py: re_break
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPED = re.compile(r"\\(.)")
_CLOSING = {")": "(", "]": "["}
# The number after a group's last colon: re_attention's emphasis weight "(x:1.3)", and the
# schedule parser's SIGNED_NUMBER (exponent allowed) in "[from:to:0.5]".
_EMPHASIS_NUMBER = re.compile(r"\s*[+-]?[.\d]+\s*")
_SCHEDULE_NUMBER = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")
_WHITESPACE = re.compile(r"\s+")
# Escaped brackets are literal text; private-use characters keep them out of the bracket passes.
_ESCAPE_PLACEHOLDERS = {"(": "\ue000", ")": "\ue001", "[": "\ue002", "]": "\ue003", "\\": "\ue004",
                        ":": "\ue005", "|": "\ue006"}


def sub_prompts(prompt: str) -> list[str]:
    """Plain text of each ``AND`` sub-prompt, in order, their ``:weight`` suffixes dropped.

    The host conditions on each sub-prompt as a separate row, so each has its own token columns.
    """
    texts = []
    for part in _AND.split(prompt):
        weight = _SUB_PROMPT_WEIGHT.search(part)
        texts.append(plain_prompt_text((part[:weight.start()] if weight else part).rstrip()))
    return texts


def plain_prompt_text(prompt: str) -> str:
    """The words of one (sub-)prompt with the WebUI's syntax removed; split ``AND`` with sub_prompts.

    ``BREAK`` becomes a comma: it separates parts of the prompt the way a comma does for a reader.
    Unbalanced brackets are dropped, as the host's attention parser drops them from the text.
    Whitespace runs are collapsed first: every pattern here then takes time linear in the length.
    """
    text = _WHITESPACE.sub(" ", _EXTRA_NETWORK.sub("", prompt))
    text = _ESCAPED.sub(lambda m: _ESCAPE_PLACEHOLDERS.get(m.group(1), m.group(1)), text)
    text = _resolve_brackets(text)
    for literal, placeholder in _ESCAPE_PLACEHOLDERS.items():
        text = text.replace(placeholder, literal)
    text = _BREAK.sub(", ", text)
    return _tidy_spacing(text)


def _resolve_brackets(text: str) -> str:
    """Replace each bracket group by the text it stands for (see module docstring); drop the rest.

    One pass with a stack of open groups, innermost replaced first. A closing bracket of the other
    kind than the innermost open group ("([)]") can never pair up, and neither can any group open
    around it: those groups' brackets are stray and their text stays as it is. Stray brackets are
    dropped, as the host's attention parser drops them.
    """
    open_groups: list[tuple[str, list[str]]] = []
    current: list[str] = []
    for piece in re.split(r"([()\[\]])", text):
        if piece in "([" and piece:
            open_groups.append((piece, current))
            current = []
        elif piece in _CLOSING and piece:
            if open_groups and open_groups[-1][0] == _CLOSING[piece]:
                kind, enclosing = open_groups.pop()
                inner = "".join(current)
                enclosing.append(_round_bracket_text(inner) if kind == "(" else _square_bracket_text(inner))
                current = enclosing
            else:
                current = _unclosed_text(open_groups, current)
                open_groups = []
        else:
            current.append(piece)
    return "".join(_unclosed_text(open_groups, current))


def _unclosed_text(open_groups: list[tuple[str, list[str]]], current: list[str]) -> list[str]:
    """The pieces of groups that will never close, outermost first, their brackets dropped."""
    return [piece for _, enclosing in open_groups for piece in enclosing] + current


def _round_bracket_text(inner: str) -> str:
    """``(x:1.3)`` -> ``x``; ``(x)`` -> ``x``."""
    head = _before_number(inner, _EMPHASIS_NUMBER)
    return inner if head is None else head.rstrip()


def _square_bracket_text(inner: str) -> str:
    """``[a|b]`` -> ``a``; ``[from:to:when]`` and ``[to:when]`` -> ``to``; ``[x]`` -> ``x``."""
    if "|" in inner:
        return inner.split("|", 1)[0]
    head = _before_number(inner, _SCHEDULE_NUMBER)
    if head is not None and head.count(":") <= 1:
        return head.rpartition(":")[2]
    return inner


def _before_number(inner: str, number_pattern: re.Pattern) -> str | None:
    """The group's text before a trailing ``:number``, or None when it has none.

    Only the text after the last colon is matched: a pattern over the whole group would scan the
    text of every nested group again, quadratic in the nesting depth.
    """
    head, colon, number = inner.rpartition(":")
    return head if colon and number_pattern.fullmatch(number) else None


def _tidy_spacing(text: str) -> str:
    """Collapse the runs of spaces and doubled commas that removed syntax leaves behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;!?])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")
