"""Generated prompts and entity specs for the property tests (test_fuzz.py) and the host tests.

Prompts are built from the WebUI's syntax (modules/prompt_parser.py: emphasis, ``BREAK``,
scheduling, alternation, ``AND``; extra-network tags; escapes) around words, unicode and noise
(stray brackets and colons, ``(x:.)``, NUL, zero-width space), and arbitrary text.
"""

from __future__ import annotations

from hypothesis import strategies as st

NOUNS = ["cat", "frog", "teapot", "hummingbird", "quetzalcoatl", "axolotl", "cube", "ball", "garden", "dog"]
ADJECTIVES = ["black", "green", "small", "red", "shiny", "old", "blue"]
UNICODE_WORDS = ["café", "猫", "кот", "🐱", "naïve", "straße", "ǅemal", "x\u0301", "عربي", "İstanbul"]
GLUE = ["a", "an", "the", "and", "or", "with", "of", "in", "on", "next to", "photo of", "sitting on", ",", ".", ";"]
PLAIN_WORDS = st.sampled_from(NOUNS + ADJECTIVES + UNICODE_WORDS)
# Emphasis weights as re_attention reads them; a schedule also takes an exponent.
WEIGHTS = st.sampled_from(["1.3", "0.5", ".5", "2", "-1", "+0.8", "0", " 1.1 "])
NUMBERS = st.one_of(WEIGHTS, st.sampled_from(["1e3", "2.5E-1"]))
NOISE = st.sampled_from(["(", ")", "[", "]", ":", "|", "\\(", "\\)", "\\", "BREAK", " AND ", ":0.5", ":.", "::",
                         "<lora:some_lora:0.8>", "<hypernet:net:1>", "<lora:unclosed", "\n", "\t", "  ", "",
                         "embedding:easynegative", "\u200b", "\x00", "AND:2"])


def _syntax(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """The WebUI's prompt syntax around generated text (modules/prompt_parser.py)."""
    return st.one_of(
        inner.map(lambda text: f"({text})"),
        st.tuples(inner, WEIGHTS).map(lambda parts: f"({parts[0]}:{parts[1]})"),
        inner.map(lambda text: f"[{text}]"),
        st.tuples(inner, inner, NUMBERS).map(lambda parts: f"[{parts[0]}:{parts[1]}:{parts[2]}]"),
        st.tuples(inner, NUMBERS).map(lambda parts: f"[{parts[0]}:{parts[1]}]"),
        st.lists(inner, min_size=2, max_size=3).map(lambda options: "[" + "|".join(options) + "]"),
        st.lists(inner, min_size=2, max_size=4).map(" ".join),
        st.lists(inner, min_size=2, max_size=3).map(" BREAK ".join),
        st.lists(inner, min_size=2, max_size=3).map(" AND ".join),
    )


PROMPTS = st.one_of(
    st.recursive(st.one_of(PLAIN_WORDS, st.sampled_from(GLUE), NOISE), _syntax, max_leaves=25),
    st.lists(st.one_of(PLAIN_WORDS, st.sampled_from(GLUE), NOISE), max_size=30).map(" ".join),
    st.text(max_size=200),
)
SPECS = st.one_of(
    st.lists(st.lists(st.one_of(PLAIN_WORDS, NOISE), max_size=4).map(" ".join), max_size=5).map("|".join),
    st.text(alphabet=st.sampled_from(list("ab |()[]:.,1 ")), max_size=40),
    st.text(max_size=60),
)
