"""The real CLIP BPE tokenizer, built offline for tests.

open_clip ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz``; from it we write the ``vocab.json`` and
``merges.txt`` that transformers' CLIPTokenizer reads, exactly as
``/work/shared/real-host/tools/make_tiny_clip.py`` does (OpenAI's SimpleTokenizer layout). The ids
are those of openai/clip-vit-large-patch14, the SD1 text encoder. open_clip itself is not
imported: it needs torchvision, which the test environment lacks.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

VOCAB_SIZE = 49408


def _bpe_merges() -> list[str]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip (for its bundled CLIP BPE vocabulary) is not installed")
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    return lines[1:49152 - 256 - 2 + 1]  # the slice open_clip and HF CLIPTokenizer use


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def write_clip_tokenizer_files(directory: Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config for CLIPTokenizer.from_pretrained."""
    merges = _bpe_merges()
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE
    (directory / "vocab.json").write_text(
        json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
         "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"}))
    return directory


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer with the real CLIP vocabulary, from files written offline."""
    transformers = pytest.importorskip("transformers")
    directory = write_clip_tokenizer_files(tmp_path_factory.mktemp("clip-bpe"))
    return transformers.CLIPTokenizer.from_pretrained(str(directory))
