"""Benchmark training: a run stopped and resumed ends with the same weights as one that never stopped
(autoencoder and UNet, on the autoencoder's latents), and the exported model loads and samples through
``load_model`` like the bundled one."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from benchmark.models import autoencoder as autoencoder_module
from benchmark.models import train as train_module
from benchmark.models.autoencoder import LATENT_SHAPE, SCALE, load_run, scene_batch, to_judge
from benchmark.models.model import load_model
from benchmark.models.scenes import training_scene
from ela_ext.config import ElaConfig

AE_ARGS = ["--batch", "2", "--log-every", "1"]
UNET_ARGS = ["--batch", "2", "--block-channels", "16,32", "--attention-levels", "1", "--unet-heads", "2",
             "--grounding", "0", "--log-every", "1"]


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(autoencoder_module, "RUNS_DIR", tmp_path)
    monkeypatch.setattr(train_module, "RUNS_DIR", tmp_path)
    return tmp_path


def train_autoencoder(name: str, steps: int) -> None:
    autoencoder_module.train(autoencoder_module.parse_args(["--name", name, "--max-steps", str(steps), *AE_ARGS]))


def train_unet(name: str, steps: int, autoencoder: str, *extra: str) -> None:
    train_module.train(train_module.parse_args(
        ["--name", name, "--max-steps", str(steps), "--autoencoder", autoencoder, *UNET_ARGS, *extra]))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_autoencoder_resumes_to_the_weights_of_an_uninterrupted_run(runs):
    train_autoencoder("straight", 3)
    train_autoencoder("stopped", 1)
    train_autoencoder("stopped", 3)  # same command again: resumes from step 1
    straight, stopped = (torch.load(runs / n / "ckpt.pt", weights_only=False) for n in ("straight", "stopped"))
    assert straight["step"] == stopped["step"] == 3
    assert_same_state(straight["model"], stopped["model"])
    model, _ = load_run("straight")
    assert model.encode(scene_batch(0, 0, 2)).shape == (2, *LATENT_SHAPE)


def test_unet_on_autoencoder_latents_resumes_exports_and_samples(runs):
    train_autoencoder("ae", 1)
    train_unet("straight", 3, "ae")
    train_unet("stopped", 2, "ae")
    train_unet("stopped", 3, "ae")
    straight, stopped = (torch.load(runs / n / "ckpt.pt", weights_only=False) for n in ("straight", "stopped"))
    assert straight["step"] == stopped["step"] == 3
    for part in ("unet", "ema", "autoencoder"):
        assert_same_state(straight[part], stopped[part])
    assert straight["model_config"]["attention_levels"] == 1

    weights = train_module.export(runs / "straight", "latent", runs / "weights")
    model = load_model(weights)
    assert model.latent_shape == LATENT_SHAPE and model.meta["latent"]["kind"] == "autoencoder"
    assert not model.scheduler_config["clip_sample"]  # a learned latent is not image-valued
    assert model.meta["latent"]["training"]["step"] == 1 and model.meta["seconds"] >= 0
    down = [type(block).__name__ for block in model.unet.down_blocks]
    assert down == ["CrossAttnDownBlock2D", "DownBlock2D"]  # SD's layout: no cross-attention at the lowest level
    images = model.decode(model.sample(["a red circle and a blue square"], ElaConfig(), [0], num_steps=2).latents)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    scene = training_scene(3)
    assert model.encode(scene.image[None]).shape == (1, *LATENT_SHAPE)


def test_a_run_initialised_from_another_continues_its_weights_with_its_own_data(runs):
    """``--init-from``: the new run starts at the other's step from its weights and design, sees
    relation and position captions (``--relations``, ``--positions``), and its export records both
    stages."""
    train_autoencoder("ae", 1)
    train_unet("base", 2, "ae")
    train_module.train(train_module.parse_args(["--name", "told", "--init-from", "base", "--relations", "1",
                                                "--positions", "0.5", "--max-steps", "3"]))
    base, told = (torch.load(runs / n / "ckpt.pt", weights_only=False) for n in ("base", "told"))
    assert told["step"] == 3 and told["args"]["relations"] == 1.0 and told["args"]["positions"] == 0.5
    assert told["args"]["block_channels"] == "16,32"
    assert not torch.equal(base["unet"]["conv_in.weight"], told["unet"]["conv_in.weight"])  # it trained on
    train_unet("plain", 3, "ae")  # the base run's third step, without relations: a different update
    plain = torch.load(runs / "plain" / "ckpt.pt", weights_only=False)
    assert not torch.equal(plain["unet"]["conv_in.weight"], told["unet"]["conv_in.weight"])
    args = train_module.argparse.Namespace(**told["args"])
    scenes = train_module.make_batch(args, 2, train_module.load_tokenizer(), {}, None)[0]
    first = (args.seed * 1_000_003 + 2) * args.batch  # make_batch's scene seeds
    assert [s.caption for s in scenes] == [training_scene(first + i, relations=1.0, positions=0.5).caption
                                          for i in range(args.batch)]
    meta = load_model(train_module.export(runs / "told", "told", runs / "weights")).meta
    assert "(to step 2); then" in meta["command"] and meta["train_args"]["init_from"] == "base"


def test_middle_block_without_cross_attention_is_rebuilt_from_the_export(runs):
    train_autoencoder("ae", 1)
    train_unet("no-mid", 1, "ae", "--no-mid-attention")
    model = load_model(train_module.export(runs / "no-mid", "no_mid", runs / "weights"))
    assert type(model.unet.mid_block).__name__ == "UNetMidBlock2D"
    assert not any(name.startswith("mid_block") and name.endswith("attn2") for name, _ in model.unet.named_modules())
    images = model.decode(model.sample(["a red circle and a blue square"], ElaConfig(), [0], num_steps=2).latents)
    assert images.shape == (1, 32, 32, 3)


def test_scaled_scene_is_the_judges_scene_supersampled():
    small, large = training_scene(11), training_scene(11, SCALE)
    assert large.image.shape == (32 * SCALE, 32 * SCALE, 3)
    pooled = to_judge(torch.as_tensor(large.image).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    assert np.abs(pooled.astype(int) - small.image).max() <= 1
    for a, b in zip(small.objects, large.objects):
        assert (a.mask == b.mask).all() and a.bbox == b.bbox


def test_training_time_adds_up_the_segments_of_a_resumed_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("# start at step 0: x\nstep 25 loss 1 elapsed 20s\nstep 50 loss 1 elapsed 41s\n"
                   "# resume at step 50: x\nstep 75 loss 1 elapsed 19s\n# stopped at step 75\n")
    assert train_module.logged_seconds(log) == 60
    assert train_module.logged_seconds(tmp_path / "absent.log") == 0
