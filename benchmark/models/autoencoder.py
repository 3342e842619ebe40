"""A learned autoencoder latent for the benchmark, as Stable Diffusion's: 4 channels, 8x downsampling.

    OMP_NUM_THREADS=1 python -m benchmark.models.autoencoder --name NAME [--max-minutes M]   # resumable

Scenes rendered at 128 px are encoded to 4x16x16 latents scaled to unit variance (SD's
``scaling_factor``, measured here on training scenes at export), and decoded back to 128 px, which
the judge box-downsamples to the 32 px it evaluates. Why learned and not the bundled model's
pixel-unshuffle: in a pixel latent every channel is a pixel, so the noise in each latent pixel is
read directly as colour evidence and a denoiser can decide what goes where from the noise alone;
SD's latent is a learned, compressed code, and this benchmark's second model follows SD there
(which difference matters is measured by ``benchmark.fidelity``).

The network is a small KL-regularised convolutional autoencoder (SD's KL-f8 in miniature: stride-2
convolutions down, nearest upsampling + convolution up, residual blocks at the latent side, KL
weight 1e-6 as SD's), trained with L1 + MSE on the 128 px renders. Every batch is a function of
(seed, step), so an interrupted run resumes the same stream (``kill PID`` saves first).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..paths import RUNS_DIR
from .run_loop import open_run, run_steps
from .scenes import SIZE, training_scene

SCALE = 4  # scene pixels per judge pixel: 128 px images
LATENT_CHANNELS, DOWNSAMPLE = 4, 8
LATENT_SHAPE = (LATENT_CHANNELS, SIZE * SCALE // DOWNSAMPLE, SIZE * SCALE // DOWNSAMPLE)  # 4x16x16



@dataclass
class AutoencoderConfig:
    channels: tuple[int, ...] = (16, 32, 64)  # after each of the three stride-2 stages
    latent_channels: int = LATENT_CHANNELS

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        return cls(channels=tuple(d["channels"]), latent_channels=d["latent_channels"])


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SceneAutoencoder(nn.Module):
    """128 px RGB in [-1, 1] <-> (latent_channels, 16, 16). ``scaling_factor`` multiplies the mean of
    the posterior, so that latents have unit variance as the UNet expects (SD: 0.18215)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c1, c2, c3 = config.channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c1, 4, stride=2, padding=1), nn.SiLU(),            # 64
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), ResBlock(c2),        # 32
            nn.Conv2d(c2, c3, 4, stride=2, padding=1), ResBlock(c3),        # 16
            nn.GroupNorm(8, c3), nn.SiLU(), nn.Conv2d(c3, 2 * config.latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(config.latent_channels, c3, 3, padding=1), ResBlock(c3),
            nn.Upsample(scale_factor=2), nn.Conv2d(c3, c2, 3, padding=1), ResBlock(c2),   # 32
            nn.Upsample(scale_factor=2), nn.Conv2d(c2, c1, 3, padding=1), nn.SiLU(),      # 64
            nn.Upsample(scale_factor=2), nn.Conv2d(c1, c1, 3, padding=1), nn.SiLU(),      # 128
            nn.Conv2d(c1, 3, 3, padding=1))
        self.register_buffer("scaling_factor", torch.ones(()))

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 128, 128) in [-1, 1] -> scaled latents (the posterior's mean, as SD samples)."""
        return self.posterior(images)[0] * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, 128, 128), roughly in [-1, 1]."""
        return self.decoder(latents / self.scaling_factor)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_judge(images: torch.Tensor) -> np.ndarray:
    """Decoded (B, 3, 128, 128) -> uint8 (B, 32, 32, 3): box-downsampled to the judge's resolution."""
    x = F.avg_pool2d(images.detach().float().cpu().clamp(-1, 1), SCALE)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class AutoencoderLatent:
    """``benchmark.models.model``'s latent kind ``"autoencoder"``: the weights file carries the
    autoencoder under ``autoencoder.``, its JSON entry the config. The judge's 32 px images are
    upsampled (nearest) to 128 px to be encoded; decoded images are box-downsampled to 32 px."""

    shape = LATENT_SHAPE

    def __init__(self, model: SceneAutoencoder):
        self.model = model

    @classmethod
    def load(cls, entry: dict, state: dict[str, torch.Tensor]) -> "AutoencoderLatent":
        model = SceneAutoencoder(AutoencoderConfig.from_dict(entry["config"]))
        model.load_state_dict({k[len("autoencoder."):]: v for k, v in state.items() if k.startswith("autoencoder.")})
        return cls(model.eval().requires_grad_(False))

    def encode(self, images: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode(F.interpolate(to_pixels(images), scale_factor=SCALE, mode="nearest"))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return to_judge(self.model.decode(latents.detach().float().cpu()))


def scene_batch(seed: int, step: int, batch: int) -> torch.Tensor:
    """The 128 px renders of ``batch`` training scenes of ``step``: a pure function of (seed, step)."""
    base = (seed * 1_000_003 + step) * batch
    return to_pixels(np.stack([training_scene(base + i, SCALE).image for i in range(batch)]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl", type=float, default=1e-6)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--max-minutes", type=float, default=10**9)
    p.add_argument("--ckpt-minutes", type=float, default=2.0)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def measure_scaling(model: SceneAutoencoder, seed: int = 12345, scenes: int = 256) -> float:
    """1 / std of the posterior means over training scenes (SD's scaling factor, measured the same way)."""
    with torch.no_grad():
        means = torch.cat([model.posterior(scene_batch(seed, step, 32))[0] for step in range(scenes // 32)])
    return float(1.0 / means.std())


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    run_dir = RUNS_DIR / args.name
    ckpt_path, ckpt, args = open_run(run_dir, args)
    config = AutoencoderConfig()
    torch.manual_seed(args.seed)
    model = SceneAutoencoder(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, command = 0, " ".join(["python -m benchmark.models.autoencoder"] + sys.argv[1:])
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, command = ckpt["step"], ckpt["command"]
    log = open(run_dir / "train.log", "a")

    def save(step: int) -> None:
        model.scaling_factor.fill_(measure_scaling(model))
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "args": vars(args), "config": asdict(config), "command": command}, tmp)
        os.replace(tmp, ckpt_path)

    def train_step(step: int) -> dict[str, float]:
        images = scene_batch(args.seed, step, args.batch)
        mean, logvar = model.posterior(images)
        gen = torch.Generator().manual_seed(args.seed * 7919 + step)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)
        recon = model.decoder(z)
        rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        optimizer.zero_grad(set_to_none=True)
        (rec + args.kl * kl).backward()
        optimizer.step()
        return {"recon": rec.item()}

    run_steps(train_step, save, log, step, args.max_steps, args.max_minutes, args.ckpt_minutes, args.log_every)


def load_run(name: str) -> tuple[SceneAutoencoder, dict]:
    """(autoencoder, checkpoint) of runs/NAME, eval mode, no gradients."""
    ckpt = torch.load(RUNS_DIR / name / "ckpt.pt", map_location="cpu", weights_only=False)
    model = SceneAutoencoder(AutoencoderConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval().requires_grad_(False), ckpt


if __name__ == "__main__":
    train(parse_args())
