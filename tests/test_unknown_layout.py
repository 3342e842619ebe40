"""A model ELA cannot read (no cross-attention, or cross-attention in a layout it cannot place):
one clear warning and the image ELA off gives, never an exception. The WebUI script reports the
same warning in the image's ``ELA warnings`` infotext (its sessions are these sessions)."""

import pytest
import torch
from torch import nn

from benchmark.models.tiny_unet import CONTEXT_DIM, build_tiny_unet
from ela_ext.anchoring import SamplerSpace
from ela_ext.config import ElaConfig, replace
from ela_ext.session import AnchoringSession
from ela_ext.tokens import EntityColumns, ResolvedEntity

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

CONFIG = replace(ElaConfig(enabled=True, entities="cat | frog"), window_end=1.0, max_iterations=2, loss_threshold=0.0)
TARGETS = [EntityColumns(entities=(ResolvedEntity("cat", (2,), ()), ResolvedEntity("frog", (5,), ())),
                         sot_columns=(0,))]


def unet_without_cross_attention() -> nn.Module:
    """The tiny UNet with every transformer block's cross-attention removed, as diffusers allows
    (``attn2 = None``: the block then runs self-attention and its feed-forward only)."""
    unet = build_tiny_unet()
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock):
            module.attn2 = None
            module.norm2 = None
    return unet


class UnknownLayoutUNet(nn.Module):
    """Real cross-attention layers, in blocks named like no UNet ELA knows (``stages.N``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stages = nn.ModuleList(BasicTransformerBlock(32, 2, 16, cross_attention_dim=CONTEXT_DIM)
                                    for _ in range(2))


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


@pytest.mark.parametrize("make_unet, expected", [
    (unet_without_cross_attention, "no cross-attention layer (attn2 with to_q/to_k) found in this model"),
    (UnknownLayoutUNet, "cross-attention layers in an unknown UNet layout (e.g. stages.0.attn2; "
                        "expected input/middle/output_blocks or down/mid/up_blocks)"),
])
def test_unreadable_model_warns_once_and_returns_the_latent_untouched(make_unet, expected):
    unet = make_unet()
    session = AnchoringSession(unet, CONFIG, TARGETS)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    before = latent.clone()
    calls = []  # the UNet's branch must never be run for a grad pass

    def forward(x):
        calls.append(x)
    for step in range(3):
        assert session.maybe_anchor(latent, SamplerSpace.from_sigma(10.0), step, 3, forward) is latent
    assert torch.equal(latent, before)
    assert calls == [] and session.steps == [] and hook_count(unet) == 0
    assert session.warnings == [f"{expected}: image left unanchored"]
    assert session.warnings_for(0) == session.warnings
    assert session.infotext_summary() == "steps=0" and session.mask_grid(0) is None


def test_unreadable_model_samples_exactly_as_off_in_the_diffusers_loop(clip_tokenizer):
    """Through the whole sampling loop: ELA on gives the latents of ELA off and says why."""
    import transformers

    from ela_ext.diffusers_adapter import sample

    torch.manual_seed(0)
    encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=CONTEXT_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77)).eval()
    unet = unet_without_cross_attention()
    results = {}
    for name, config in {"off": ElaConfig(), "on": replace(CONFIG, entities="black cat | green frog")}.items():
        scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
        results[name] = sample(unet, encoder, clip_tokenizer, scheduler, ["a black cat and a green frog"], config,
                               latents, num_steps=4)
    assert torch.equal(results["on"].latents, results["off"].latents)
    assert results["on"].session.warnings == [
        "no cross-attention layer (attn2 with to_q/to_k) found in this model: image left unanchored"]
