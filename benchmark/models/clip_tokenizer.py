"""The real CLIP BPE tokenizer (openai/clip-vit-large-patch14 ids, SD 1.x's), built offline.

open_clip ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz``; from it we write the ``vocab.json`` and
``merges.txt`` that transformers' CLIPTokenizer reads, in OpenAI's SimpleTokenizer layout (as
``/work/shared/real-host/tools/make_tiny_clip.py`` does). open_clip is located, not imported: its
import needs torchvision, which this environment lacks. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

from ..paths import RUNS_DIR

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407
MAX_LENGTH = 77
DEFAULT_CACHE = RUNS_DIR / "clip_tokenizer"


def _bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip (for its bundled CLIP BPE vocabulary) is not installed")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


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
    return dict(zip(printable, [chr(c) for c in characters]))


def build_tokenizer_files(cache_dir: Path | str = DEFAULT_CACHE) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config into ``cache_dir`` (idempotent)."""
    out = Path(cache_dir)
    if (out / "tokenizer_config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the slice open_clip and HF CLIPTokenizer use
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    # tokenizer_config last: its presence marks a complete cache
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": MAX_LENGTH, "do_lower_case": True, "errors": "replace",
         "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"}))
    return out


def load_tokenizer(cache_dir: Path | str = DEFAULT_CACHE) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(build_tokenizer_files(cache_dir)))


def encode(tokenizer: CLIPTokenizer, prompts: list[str]):
    """SD's text input: BOS at column 0, EOS, then EOS padding to 77 columns."""
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids
