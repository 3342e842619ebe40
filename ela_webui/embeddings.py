"""Textual-inversion embeddings as words an entity spec can name.

The WebUI's ``tokenize_line`` replaces an embedding's name by one placeholder id (0) per vector
and records where (``chunk.fixes``); the name's own BPE ids never reach the chunk, so a spec word
that is an embedding's name would not be found. ``EmbeddingAwareEncoder`` wraps the model's text
encoder for ``prompts.resolve`` and the token route: each vector's placeholder becomes an id of
its own (negative, so no BPE id can equal it), and tokenising the embedding's name gives those
ids, so the name maps to all of its vectors' columns wherever it occurs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MarkedChunk:
    """A chunk as ``prompts.resolve`` reads it: its 77 ids."""

    tokens: list[int]


def embedding_database(encoder):
    """A1111 keeps it on the model hijack, Forge on its text processing engine."""
    hijack = getattr(encoder, "hijack", None)
    return getattr(hijack, "embedding_db", None) or getattr(encoder, "embeddings", None)


class EmbeddingAwareEncoder:
    """``encoder`` with each loaded embedding's vectors given ids of their own (see module doc)."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.id_end = encoder.id_end
        self.tokenizer = self  # prompts.decode_token asks the tokenizer for a piece's text
        self._embeddings: list[tuple[str, int]] = []  # (name, vectors) j: vector k has id -(1000 * j + k + 1)

    def _ids(self, name: str, vectors: int) -> list[int]:
        if (name, vectors) not in self._embeddings:
            self._embeddings.append((name, vectors))
        index = self._embeddings.index((name, vectors))
        return [-(1000 * index + k + 1) for k in range(vectors)]

    def tokenize_line(self, text: str):
        chunks, token_count = self.encoder.tokenize_line(text)
        marked = []
        for chunk in chunks:
            tokens = list(chunk.tokens)
            for fix in chunk.fixes:
                # The fix's offset counts from the first text token: column 0 is the start token.
                start = fix.offset + 1
                ids = self._ids(fix.embedding.name.lower(), int(fix.embedding.vectors))
                tokens[start:start + len(ids)] = ids
            marked.append(MarkedChunk(tokens))
        return marked, token_count

    def tokenize(self, words: list[str]) -> list[list[int]]:
        database = embedding_database(self.encoder)
        loaded = {name.lower(): embedding for name, embedding in getattr(database, "word_embeddings", {}).items()}
        return [self._ids(word.lower(), int(loaded[word.lower()].vectors)) if word.lower() in loaded
                else self.encoder.tokenize([word])[0] for word in words]

    def convert_ids_to_tokens(self, token_id: int) -> str:
        """A piece's text: an embedding's name on its first vector and nothing on the others, the
        last ending the word (``</w>``), so a preview joins the vectors into the name; else the
        encoder's own BPE piece."""
        if token_id >= 0:
            from ela_webui.prompts import decode_token  # prompts imports this module

            return decode_token(self.encoder, token_id)
        index, vector = divmod(-token_id - 1, 1000)
        name, vectors = self._embeddings[index]
        return (name if vector == 0 else "") + ("</w>" if vector == vectors - 1 else "")
