"""The benchmark's MM-DiT (diffusers' SD3Transformer2DModel, tiny) and the host-free glue that anchors
it: training resumes bit for bit, the export loads through ``load_model`` and samples, the flow sampler
is a plain CFG Euler sampler with anchoring off and changes the image with it on, the anchoring loss
falls on a random model, and no hook outlives a sampling call."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from diffusers import FlowMatchEulerDiscreteScheduler

from benchmark.models import autoencoder as autoencoder_module
from benchmark.models import train as train_module
from benchmark.models.autoencoder import LATENT_SHAPE
from benchmark.models.clip_tokenizer import load_tokenizer
from benchmark.models.mmdit import MMDiTConfig, flow_scheduler_config, velocity
from benchmark.models.model import build_denoiser, load_model
from benchmark.models.scenes import training_scene
from ela_ext.config import ElaConfig
from ela_ext.diffusers_adapter import encode, sample_flow
from ela_ext.diffusers_mmdit import feeding, joint_capture

PROMPT = "a red circle and a blue square"
MMDIT_ARGS = ["--backbone", "mmdit", "--batch", "2", "--mmdit-depth", "2", "--mmdit-heads", "2",
              "--mmdit-head-dim", "8", "--log-every", "1"]
ANCHOR = dict(enabled=True, window_start=0.0, window_end=0.5, max_iterations=3, loss_threshold=0.0)


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(autoencoder_module, "RUNS_DIR", tmp_path)
    monkeypatch.setattr(train_module, "RUNS_DIR", tmp_path)
    monkeypatch.setattr(train_module, "WEIGHTS_DIR", tmp_path / "weights")
    return tmp_path


def train_mmdit(name: str, steps: int) -> None:
    train_module.train(train_module.parse_args(
        ["--name", name, "--max-steps", str(steps), "--autoencoder", "ae", *MMDIT_ARGS]))


@pytest.fixture(scope="module")
def tiny():
    """A random tiny MM-DiT on the autoencoder's 4x16x16 latent (64 image tokens), and the text side."""
    config = MMDiTConfig(depth=3, heads=2, head_dim=16)
    transformer, text_encoder = build_denoiser("mmdit", config, 0, LATENT_SHAPE)
    for module in (transformer, text_encoder):
        module.eval().requires_grad_(False)
    return transformer, text_encoder, load_tokenizer()


def run(tiny, config: ElaConfig, steps: int = 4, **options):
    transformer, text_encoder, tokenizer = tiny
    noise = torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    return sample_flow(transformer, text_encoder, tokenizer, FlowMatchEulerDiscreteScheduler(**flow_scheduler_config()),
                       [PROMPT], config, noise, num_steps=steps, guidance_scale=4.0, **options)


def hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_mmdit_training_resumes_bit_for_bit_exports_and_samples(runs):
    autoencoder_module.train(autoencoder_module.parse_args(["--name", "ae", "--max-steps", "1", "--batch", "2"]))
    train_mmdit("straight", 3)
    train_mmdit("stopped", 2)
    train_mmdit("stopped", 3)  # the same command again resumes from step 2
    straight, stopped = (torch.load(runs / n / "ckpt.pt", weights_only=False) for n in ("straight", "stopped"))
    assert straight["step"] == stopped["step"] == 3
    for part in ("unet", "ema", "optimizer"):
        state_a, state_b = (s if part != "optimizer" else {k: v for k, v in s["state"].items()}
                            for s in (straight[part], stopped[part]))
        if part == "optimizer":
            state_a = {f"{i}.{k}": v for i, d in state_a.items() for k, v in d.items()}
            state_b = {f"{i}.{k}": v for i, d in state_b.items() for k, v in d.items()}
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), (part, key)
    assert any(not torch.equal(straight["unet"][k], straight["ema"][f"unet.{k}"]) for k in straight["unet"])

    weights = train_module.export(runs / "straight", "mmdit", runs / "weights")  # the default is bound at import
    model = load_model(weights)
    assert model.backbone == "mmdit" and model.meta["backbone"] == "mmdit"
    assert type(model.unet).__name__ == "SD3Transformer2DModel" and model.latent_shape == LATENT_SHAPE
    assert model.meta["step"] == 3 and model.meta["seconds"] >= 0
    assert model.meta["train_args"]["backbone"] == "mmdit"
    off = model.sample([PROMPT], ElaConfig(), [0], num_steps=3)
    on = model.sample([PROMPT], ElaConfig(enabled=True, window_end=0.5), [0], num_steps=3)
    assert on.session.steps and not torch.equal(on.latents, off.latents)
    images = model.decode(off.latents)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    scene = training_scene(5)  # fidelity d's pass: a rendered scene noised the model's way, the joint maps
    latents = model.encode(scene.image[None])
    noisy = model.add_noise(latents, torch.randn_like(latents), 700)
    maps = model.anchor_maps(noisy, 700, encode(model.tokenizer, model.text_encoder, [scene.caption]))
    assert maps.shape == (1, 77, 8, 8) and torch.allclose(maps.sum(1), torch.ones(1, 8, 8), atol=1e-5)
    assert hooks(model.unet) == 0


def test_mmdit_backbone_refuses_an_attention_loss():
    with pytest.raises(SystemExit):
        train_module.parse_args(["--name", "x", "--backbone", "mmdit", "--grounding", "0.05"])
    assert train_module.parse_args(["--name", "x", "--backbone", "mmdit"]).grounding == 0
    assert train_module.parse_args(["--name", "x"]).grounding == 0.05


def test_off_is_a_plain_cfg_euler_flow_sampler(tiny):
    transformer, text_encoder, tokenizer = tiny
    steps_seen = []
    first, second = run(tiny, ElaConfig()), run(tiny, ElaConfig(), on_step=lambda *step: steps_seen.append(step))
    assert torch.equal(first.latents, second.latents) and first.session is None

    context = encode(tokenizer, text_encoder, [PROMPT, ""])
    x = torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    # shift 1: SD3's schedule through diffusers, sigma linear from 1 to 1/1000 over the 4 steps, then 0
    sigmas = torch.cat([torch.linspace(1, 1e-3, 4), torch.zeros(1)])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v_cond, v_uncond = velocity(transformer, torch.cat([x, x]), sigma.expand(2), context).chunk(2)
        x = x + (sigma_next - sigma) * (v_uncond + 4.0 * (v_cond - v_uncond))
    torch.testing.assert_close(first.latents, x, rtol=1e-5, atol=1e-5)
    assert steps_seen == [(index, 1000 * float(sigma)) for index, sigma in enumerate(sigmas[:-1])]  # on_step: SD3's timestep


def test_anchoring_changes_the_image_and_leaves_no_hook(tiny):
    transformer = tiny[0]
    off, on = run(tiny, ElaConfig()), run(tiny, ElaConfig(**ANCHOR))
    assert [log.step for log in on.session.steps] == [0, 1] and not on.session.warnings
    assert all(log.updates > 0 for log in on.session.steps)
    assert not torch.equal(off.latents, on.latents)
    assert hooks(transformer) == 0


def test_anchoring_loss_falls_on_a_random_model(tiny):
    result = run(tiny, ElaConfig(**{**ANCHOR, "max_iterations": 6, "step_size": 0.1}), steps=2)
    losses = result.session.steps[0].losses
    assert len(losses) == 6 and losses[-1] < losses[0], losses


def test_hooks_read_the_joint_attention_without_changing_it(tiny):
    """The hooked pass gives the same velocity, and the recorded map is the text part of the joint
    softmax renormalised: recomputed here from the processor's own projections, image first."""
    transformer, text_encoder, tokenizer = tiny
    context = encode(tokenizer, text_encoder, [PROMPT])
    x, sigma = torch.randn(1, *LATENT_SHAPE, generator=torch.Generator().manual_seed(1)), torch.tensor([0.7])
    plain = velocity(transformer, x, sigma, context)
    capture = joint_capture(transformer, ElaConfig())
    capture.stop_after_last = False
    with feeding(transformer, capture), capture.capturing(LATENT_SHAPE[1:]):
        hooked = velocity(transformer, x, sigma, context)
        maps = capture.maps
    assert torch.equal(plain, hooked) and capture.blocks == (1,)

    block = transformer.transformer_blocks[1].attn
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    velocity(transformer, x, sigma, context)
    handle.remove()
    image, text = seen["hidden_states"], seen["encoder_hidden_states"]
    split = lambda t: t.reshape(1, t.shape[1], block.heads, -1).transpose(1, 2)  # noqa: E731
    q = torch.cat([split(block.to_q(image)), split(block.add_q_proj(text))], 2)
    k = torch.cat([split(block.to_k(image)), split(block.add_k_proj(text))], 2)
    joint = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)[:, :, :64, 64:]
    expected = (joint / joint.sum(-1, keepdim=True)).mean(1).transpose(1, 2).reshape(1, 77, 8, 8)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def mmdit_weights(tmp_path_factory):
    """A random tiny MM-DiT on the (random) autoencoder latent, written as ``train.export`` writes one."""
    from dataclasses import asdict
    import json

    from safetensors.torch import save_file

    from benchmark.models.autoencoder import AutoencoderConfig, SceneAutoencoder

    config = MMDiTConfig(text_hidden=32, text_heads=2, depth=3, heads=2, head_dim=16)
    transformer, text_encoder = build_denoiser("mmdit", config, 0, LATENT_SHAPE)
    state = {f"unet.{k}": v for k, v in transformer.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    state.update({f"autoencoder.{k}": v for k, v in SceneAutoencoder(AutoencoderConfig()).state_dict().items()})
    path = tmp_path_factory.mktemp("tiny-mmdit") / "mmdit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({
        "backbone": "mmdit", "model_config": asdict(config), "step": 0, "scheduler_config": flow_scheduler_config(),
        "latent": {"kind": "autoencoder", "config": asdict(AutoencoderConfig())}}))
    return path


def test_effect_and_demo_take_an_mmdit(mmdit_weights, capsys, tmp_path):
    import json

    from benchmark.commands import demo, effect

    effect.main(["--weights", str(mmdit_weights), "--families", "held_out", "--prompts-per-family", "1",
                 "--seeds", "2", "--steps", "4", "--settings", "off,default,random", "--json"])
    off, default, control = json.loads(capsys.readouterr().out)["tables"]["held_out"]
    assert off["images"] == default["images"] == 2
    assert default["pixel_change"] > 0 and control["pixel_change"] > 0  # anchored through the joint capture
    demo.main(["--weights", str(mmdit_weights), "--seeds", "0,1", "--steps", "3", "--out", str(tmp_path / "demo.png")])
    assert (tmp_path / "demo.png").exists()


def test_fidelity_runs_every_part_but_f_on_an_mmdit(mmdit_weights, capsys):
    """a-c edit the joint attention, d and e as on a UNet; f (a UNet's ``to_k``) is left out. The model is
    its own reference here (the bundled UNet's column is test_fidelity's)."""
    import json

    from benchmark.commands.fidelity import main

    main(["--weights", str(mmdit_weights), "--reference", str(mmdit_weights), "--json", "--prompts-per-family", "1",
          "--seeds", "2", "--steps", "3", "--steer-families", "held_out", "--scenes", "2", "--timesteps", "500"])
    report = json.loads(capsys.readouterr().out)
    print(json.dumps(report["model"], indent=1))  # the random model's figures, for the log: never asserted
    assert set(report["model"]) == {"a", "b", "c", "d", "e"}
    assert all(report["model"][part]["images"] == 2 for part in "abc")
    assert 0 <= report["model"]["d"]["iou_mean"] <= 1 and report["model"]["d"]["entities"] >= 4
    assert report["model"]["e"]["held_out"]["images"] == 2
