"""Training the key projections on a real (tiny) UNet: the loss falls, nothing but the ``to_k``
changes is trained, the model is left bit-identical and hook-free, runs are deterministic, and a
cancel or a non-finite loss ends training with nothing kept."""

import pytest
import torch

from benchmark.models.tiny_unet import CONTEXT_DIM
from ela_ext.capture import AttentionCapture, find_cross_attention_layers, run_truncated
from ela_ext.finetune import (FinetuneConfig, FinetuneError, TrainingCancelled, TrainingPrompt,
                              train_key_projections, trained_layers)
from ela_ext.lora_file import merged_lora, save_lora
from ela_ext.tokens import EntityColumns, ResolvedEntity, WordColumns
from tiny_mmdit import TinyMMDiT

TARGET = EntityColumns(
    entities=(ResolvedEntity("cat", (2,), (WordColumns("black", (1,)),)), ResolvedEntity("frog", (5,), ())),
    sot_columns=(0,))
ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
SHAPE = (4, 16, 16)


def _context(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 77, CONTEXT_DIM, generator=torch.Generator().manual_seed(seed)).expand(batch, -1, -1)


def _denoise(unet):
    return lambda x_t, t, context: unet(x_t, t, encoder_hidden_states=context).sample


def _fixed_latents(batch: int, generator: torch.Generator):
    """One fixed noisy batch, so the loss of consecutive steps is comparable."""
    x_t = torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(7))
    return x_t, torch.full((batch,), 600)


def _train(unet, config, **options):
    return train_key_projections(unet, _denoise(unet), lambda prompts: _context(len(prompts)),
                                 [TrainingPrompt("a black cat and a frog", TARGET)], ALPHAS, SHAPE, config, **options)


def _hooks(unet) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in unet.modules())


@pytest.mark.parametrize("rank", [4, 0], ids=["lora", "full rank"])
def test_training_lowers_the_loss_and_leaves_the_model_as_it_was(tiny_unet, rank):
    before = {name: value.clone() for name, value in tiny_unet.state_dict().items()}
    grads_before = {name: p.requires_grad for name, p in tiny_unet.named_parameters()}
    config = FinetuneConfig(objective="separate_enhance", steps=12, learning_rate=3e-2, batch_size=2, rank=rank)
    result = _train(tiny_unet, config, noisy_latents=_fixed_latents)
    assert result.steps == 12 and len(result.losses) == 12
    assert result.losses[-1] < result.losses[0] - 0.01
    assert all(torch.equal(before[name], value) for name, value in tiny_unet.state_dict().items())
    assert grads_before == {name: p.requires_grad for name, p in tiny_unet.named_parameters()}
    assert _hooks(tiny_unet) == 0
    # every cross-attention layer up to the last map layer; the pass ends there, so the later
    # ones (up_blocks.2 here) get no gradient and no change
    names = {name + ".to_k" for name, _ in trained_layers(tiny_unet, "all") if not name.startswith("up_blocks.2")}
    assert {delta.name for delta in result.deltas} == names
    for delta in result.deltas:
        layer = tiny_unet.get_submodule(delta.name)
        assert delta.weight().shape == layer.weight.shape
        assert delta.weight().abs().max() > 0
        assert (delta.diff is not None) == (rank == 0)


def test_the_trained_change_moves_the_maps_the_loss_reads(tiny_unet, tmp_path):
    config = FinetuneConfig(objective="separate_enhance", steps=8, learning_rate=3e-2, batch_size=2)
    result = _train(tiny_unet, config, noisy_latents=_fixed_latents)
    layers = [module for _, module in find_cross_attention_layers(tiny_unet)]
    x_t, t = _fixed_latents(1, None)

    def maps():
        with torch.no_grad(), AttentionCapture(layers, SHAPE[1:], stop_after_last=True) as capture:
            return run_truncated(capture, lambda: _denoise(tiny_unet)(x_t, t, _context(1)))
    plain = maps()
    path = save_lora(tmp_path / "trained.safetensors", {d.name: d.file_entry() for d in result.deltas}, "sd1")
    with merged_lora(tiny_unet, path, 1.0):
        tuned = maps()
    with merged_lora(tiny_unet, path, 0.0):
        zero = maps()
    assert not torch.allclose(plain, tuned)
    assert torch.equal(plain, zero)
    assert _hooks(tiny_unet) == 0


def test_same_seed_same_change_and_layer_choice(tiny_unet):
    config = FinetuneConfig(steps=3, learning_rate=1e-2, batch_size=2, layers="up_lowest", seed=5)
    first, second = _train(tiny_unet, config), _train(tiny_unet, config)
    assert [d.name for d in first.deltas] == [name + ".to_k" for name, _ in
                                              find_cross_attention_layers(tiny_unet, "up_lowest")]
    assert first.losses == second.losses
    assert all(torch.equal(a.weight(), b.weight()) for a, b in zip(first.deltas, second.deltas))


def test_preservation_term_adds_full_passes(tiny_unet):
    calls = []
    denoise = _denoise(tiny_unet)

    def counting(x_t, t, context):
        calls.append(1)
        return denoise(x_t, t, context)
    config = FinetuneConfig(steps=2, learning_rate=1e-2, batch_size=2, preservation=1.0)
    result = train_key_projections(tiny_unet, counting, lambda prompts: _context(len(prompts)),
                                   [TrainingPrompt("a black cat and a frog", TARGET)], ALPHAS, SHAPE, config,
                                   preservation_prompts=["a frog"])
    assert len(calls) == 2 * 3  # the truncated pass, the untuned and the tuned full pass
    assert result.steps == 2 and _hooks(tiny_unet) == 0


def test_cancel_and_non_finite_loss_keep_nothing(tiny_unet):
    progress = []
    with pytest.raises(TrainingCancelled):
        _train(tiny_unet, FinetuneConfig(steps=10, batch_size=1), progress=lambda *args: progress.append(args),
               should_stop=lambda: len(progress) >= 2)
    assert len(progress) == 2 and _hooks(tiny_unet) == 0

    def nan_latents(batch, generator):
        x_t, t = _fixed_latents(batch, generator)
        return x_t * float("nan"), t
    with pytest.raises(FinetuneError, match="non-finite"):
        _train(tiny_unet, FinetuneConfig(steps=2, batch_size=1), noisy_latents=nan_latents)
    assert _hooks(tiny_unet) == 0


def test_bad_input_is_refused_before_training(tiny_unet):
    one_entity = EntityColumns(entities=(ResolvedEntity("cat", (2,), ()),), sot_columns=(0,))
    with pytest.raises(ValueError, match="two entities"):
        train_key_projections(tiny_unet, _denoise(tiny_unet), lambda prompts: _context(len(prompts)),
                              [TrainingPrompt("a cat", one_entity)], ALPHAS, SHAPE, FinetuneConfig())
    with pytest.raises(ValueError, match="learning_rate"):
        FinetuneConfig(learning_rate=float("nan")).validated()
    with pytest.raises(ValueError, match="preservation prompts"):
        _train(tiny_unet, FinetuneConfig(preservation=0.5))


@pytest.mark.parametrize("layers", ["all", "up_lowest"])
def test_a_model_without_cross_attention_is_refused_before_training(layers):
    """An MM-DiT (joint attention, no ``attn2``): a FinetuneError saying so, the denoiser never called."""
    model = TinyMMDiT()
    calls = []
    with pytest.raises(FinetuneError, match=r"no cross-attention layer .* found in this model: nothing to train"):
        train_key_projections(model, lambda *args: calls.append(args), lambda prompts: _context(len(prompts)),
                              [TrainingPrompt("a black cat and a frog", TARGET)], ALPHAS, SHAPE,
                              FinetuneConfig(layers=layers))
    assert calls == [] and _hooks(model) == 0


def test_denoising_term_trains_values_on_images(tiny_unet):
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    prompts = [TrainingPrompt("a black cat and a frog", TARGET, latent=image)]
    config = FinetuneConfig(steps=3, learning_rate=1e-2, batch_size=2, projections=("to_k", "to_v"),
                            objective_weight=0.0, denoising=1.0)
    result = train_key_projections(tiny_unet, _denoise(tiny_unet), lambda p: _context(len(p)), prompts, ALPHAS,
                                   SHAPE, config)
    names = {delta.name.rsplit(".", 1)[1] for delta in result.deltas}
    assert names == {"to_k", "to_v"}  # the denoising error reaches every layer's values and keys
    assert any(delta.name.startswith("up_blocks.2") for delta in result.deltas)
    assert _hooks(tiny_unet) == 0
    with pytest.raises(ValueError, match="image"):
        train_key_projections(tiny_unet, _denoise(tiny_unet), lambda p: _context(len(p)),
                              [TrainingPrompt("a black cat and a frog", TARGET)], ALPHAS, SHAPE, config)
    with pytest.raises(ValueError, match="projections"):
        FinetuneConfig(projections=("to_out",)).validated()
