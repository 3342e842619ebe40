"""Shared fixtures: a tiny real diffusers UNet (random weights, built here, nothing from a hub)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

from benchmark.models.tiny_unet import CONTEXT_DIM, build_tiny_unet  # noqa: E402


@pytest.fixture(scope="session")
def tiny_unet():
    return build_tiny_unet()


@pytest.fixture
def context():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, 77, CONTEXT_DIM, generator=generator)


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizer with the real CLIP BPE vocabulary, written offline from the
    copy open_clip ships (benchmark.models.clip_tokenizer)."""
    from benchmark.models.clip_tokenizer import load_tokenizer

    try:
        return load_tokenizer(tmp_path_factory.mktemp("clip-bpe"))
    except RuntimeError as error:
        pytest.skip(str(error))
