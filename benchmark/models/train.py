"""Train the benchmark model on procedural scenes, on CPU, resumably: SD's UNet layout (DDPM, epsilon) or,
with ``--backbone mmdit``, the SD3-style MM-DiT of ``benchmark.models.mmdit`` (rectified flow, SD3's
logit-normal sigmas, no loss on attention maps: ``--grounding`` is the UNet's only).

    OMP_NUM_THREADS=1 python -m benchmark.models.train --name NAME [--max-minutes M] [design options]
    python -m benchmark.models.train --name NAME --export      # EMA weights -> benchmark/weights/

The run lives in runs/NAME/: ``ckpt.pt`` (written atomically every --ckpt-minutes), ``train.log`` (mean
loss every --log-every steps) and ``args.json``. Starting again with the same NAME resumes from the
checkpoint with the arguments saved there (``kill PID`` saves a checkpoint first); every batch (scenes, noise, timesteps, caption dropout) is a
function of (seed, step), so an interrupted run continues the same data stream it would have seen.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from ..paths import RUNS_DIR, WEIGHTS_DIR
from .attention import AttentionRecorder, anchor_layers
from .clip_tokenizer import encode, load_tokenizer
from .autoencoder import LATENT_SHAPE as AE_LATENT_SHAPE, SCALE as AE_SCALE, AutoencoderConfig, load_run, to_pixels
from .mmdit import MMDiTConfig, flow_loss, flow_scheduler_config, logit_normal_sigmas
from .run_loop import open_run, run_steps
from .model import (DEFAULT_LATENT, PIXEL_UNSHUFFLE_SHAPE, ModelConfig, SCHEDULES, build_denoiser, encode_images,
                    scheduler_config)
from .scenes import training_scene



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", choices=("unet", "mmdit"), default="unet")
    p.add_argument("--mmdit-depth", type=int, default=6, help="MM-DiT joint blocks")
    p.add_argument("--mmdit-heads", type=int, default=4)
    p.add_argument("--mmdit-head-dim", type=int, default=32)
    p.add_argument("--logit-mean", type=float, default=0.0, help="MM-DiT: SD3's logit-normal sigma sampling")
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--text-lr-scale", type=float, default=0.0,
                   help="text encoder learning rate as a fraction of --lr; 0 freezes it (the learned "
                        "EOS column still trains at --lr)")
    p.add_argument("--beta-schedule", choices=sorted(SCHEDULES), default="scaled_linear")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of empty captions")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--text-layers", type=int, default=1)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--no-blank-eos", action="store_true", help="keep the EOS/padding columns informative")
    p.add_argument("--unet-heads", type=int, default=4)
    p.add_argument("--block-channels", default="64,128", help="UNet channels per resolution level")
    p.add_argument("--attention-levels", type=int, default=None,
                   help="levels with cross-attention, from the highest resolution (default: all)")
    p.add_argument("--no-mid-attention", action="store_true",
                   help="the middle block without cross-attention (text only at the levels' blocks)")
    p.add_argument("--autoencoder", default=None,
                   help="runs/NAME of a trained benchmark.autoencoder: learn on its 4x16x16 latents of "
                        "128 px scenes instead of the pixel-unshuffled 12x16x16 (copied into the run)")
    p.add_argument("--grounding", type=float, default=None,
                   help="UNet: weight of the shape words' attention grounding loss on the anchor layers (0: off; "
                        "default 0.05); the MM-DiT takes none")
    p.add_argument("--relations", type=float, default=0.0,
                   help="share of two-object captions that name where the first object is (scenes.training_scene)")
    p.add_argument("--positions", type=float, default=0.0,
                   help="share of captions that name where each object is in the image (scenes.training_scene)")
    p.add_argument("--init-from", default=None,
                   help="a new run starts from runs/INIT_FROM's checkpoint (weights, EMA, optimizer, step, "
                        "design); this command's data options (--relations, --positions) apply from there")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--max-minutes", type=float, default=10**9, help="stop (with a checkpoint) after this")
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--export", action="store_true", help="export the run's EMA weights and exit")
    p.add_argument("--export-name", default="model", help="file stem under benchmark/weights/")
    args = p.parse_args(argv)
    if args.grounding is None:
        args.grounding = 0.05 if args.backbone == "unet" else 0.0
    if args.backbone == "mmdit" and args.grounding:
        p.error("the MM-DiT trains without any loss on attention maps (--grounding is the UNet's)")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig | MMDiTConfig:
    if getattr(args, "backbone", "unet") == "mmdit":
        return MMDiTConfig(text_layers=args.text_layers, text_heads=args.text_heads, blank_eos=not args.no_blank_eos,
                           depth=args.mmdit_depth, heads=args.mmdit_heads, head_dim=args.mmdit_head_dim)
    return ModelConfig(text_layers=args.text_layers, text_heads=args.text_heads,
                       blank_eos=not args.no_blank_eos, unet_heads=args.unet_heads,
                       block_channels=tuple(int(c) for c in getattr(args, "block_channels", "64,128").split(",")),
                       attention_levels=getattr(args, "attention_levels", None),
                       mid_attention=not getattr(args, "no_mid_attention", False))


def make_batch(args, step: int, tokenizer, cache: dict, autoencoder=None):
    """(scenes, latents, token ids, noise, timesteps) of ``step``: a pure function of (seed, step)."""
    base = (args.seed * 1_000_003 + step) * args.batch
    scenes = [training_scene(base + i, 1 if autoencoder is None else AE_SCALE, getattr(args, "relations", 0.0),
                             getattr(args, "positions", 0.0)) for i in range(args.batch)]
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    drop = torch.rand(args.batch, generator=gen) < args.cfg_dropout
    captions = ["" if d else s.caption for s, d in zip(scenes, drop.tolist())]
    for c in set(captions) - cache.keys():
        cache[c] = encode(tokenizer, [c])[0]
    ids = torch.stack([cache[c] for c in captions])
    images = np.stack([s.image for s in scenes])
    if autoencoder is None:
        latents = encode_images(images)
    else:
        with torch.no_grad():
            latents = autoencoder.encode(to_pixels(images))
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=gen)
    return scenes, latents, ids, noise, timesteps


@functools.cache
def shape_token(shape: str) -> int:
    """CLIP id of a shape word (each is one token)."""
    return load_tokenizer()(shape)["input_ids"][1]


def grounding_loss(maps: torch.Tensor, scenes, ids: torch.Tensor) -> torch.Tensor:
    """TokenCompose-style token grounding (Wang et al., CVPR 2024) on the anchor layers only: mean over
    captioned objects of (1 - share of the shape word's attention that falls on its object's mask)^2.

    Why: without it the anchor maps stayed uniform. Measured with ``localization --renders`` (own/other
    attention mass of each shape word on noised renders, t=600): frozen random 1-layer encoder with
    blank EOS 1.00 after 1100 steps, the same encoder trained at 0.1x lr 1.00 after 740 steps, and
    1.00 at every cross-attention layer and timestep; with this loss (weight 0.05) median 5.6 after
    385 steps, the same scaled_linear run without it 1.03. A model this small conditions through the
    attention-weighted mean of the values (a global vector) and never needs to localise. Only shape
    words (the entities) are grounded; colour binding is left to be learnt, so colours can bleed."""
    side = int(round(maps.shape[1] ** 0.5))
    terms = []
    for b, scene in enumerate(scenes):
        row = ids[b].tolist()
        for obj in scene.objects:
            word_id = shape_token(obj.shape)
            if word_id not in row:  # caption dropped for classifier-free guidance
                continue
            column = maps[b, :, row.index(word_id)]
            mask = F.adaptive_avg_pool2d(torch.from_numpy(obj.mask).float()[None, None], side).flatten()
            terms.append((1 - (column * mask).sum() / column.sum().clamp_min(1e-8)) ** 2)
    return torch.stack(terms).mean() if terms else maps.sum() * 0


def ema_update(ema: dict, model_state: dict, decay: float) -> None:
    with torch.no_grad():
        for k, v in model_state.items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
            else:
                ema[k].copy_(v)


def full_state(unet, text_encoder) -> dict:
    return {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
            **{f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}}


def logged_seconds(log_path: Path) -> float:
    """Training time of a run from its log: each start or resume restarts the logged ``elapsed Ns``,
    so the time is the sum of every segment's last value (up to the last logged step of each)."""
    total, last = 0.0, 0.0
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        if " elapsed " in line and line.endswith("s"):
            elapsed = float(line.rsplit(" elapsed ", 1)[1][:-1])
            if elapsed < last:
                total += last
            last = elapsed
    return total + last


def autoencoder_record(name: str) -> dict:
    """How the autoencoder a run learnt on was trained (its own run in ``runs/``)."""
    ckpt = torch.load(RUNS_DIR / name / "ckpt.pt", map_location="cpu", weights_only=False)
    return {"run": name, "command": ckpt["command"], "step": ckpt["step"], "batch": ckpt["args"]["batch"],
            "seconds": round(logged_seconds(RUNS_DIR / name / "train.log"))}


def export(run_dir: Path, stem: str, out_dir: Path = WEIGHTS_DIR) -> Path:
    """Write the EMA weights in fp16 safetensors plus a JSON with config, command, step and training
    time (and, for a learned latent, the autoencoder's)."""
    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{stem}.safetensors"
    tensors = dict(ckpt["ema"])
    latent = DEFAULT_LATENT  # pixel-unshuffled images, unless the run learnt on an autoencoder's latents
    if "autoencoder" in ckpt:
        tensors.update({f"autoencoder.{k}": v for k, v in ckpt["autoencoder"].items()})
        latent = {"kind": "autoencoder", "config": ckpt["autoencoder_config"],
                  "training": autoencoder_record(ckpt["args"]["autoencoder"])}
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(out))
    args = ckpt["args"]
    backbone = args.get("backbone", "unet")
    schedule = (flow_scheduler_config() if backbone == "mmdit" else
                scheduler_config(args.get("beta_schedule", "linear"), clip_sample=latent == DEFAULT_LATENT))
    out.with_suffix(".json").write_text(json.dumps({
        "backbone": backbone, "model_config": ckpt["model_config"], "latent": latent, "scheduler_config": schedule,
        "step": ckpt["step"], "images_seen": ckpt["step"] * args["batch"], "ema_decay": args["ema"],
        "seconds": round(logged_seconds(run_dir / "train.log") + args.get("init_seconds", 0.0)),
        "train_args": args, "command": ckpt["command"],
        "export_command": f"python -m benchmark.models.train --name {args['name']} --export --export-name {stem}",
    }, indent=1) + "\n")
    return out


def initial_checkpoint(args: argparse.Namespace) -> tuple[dict, argparse.Namespace]:
    """A run started with ``--init-from``: the other run's checkpoint and design, with this command's
    name, data options and limits; its recorded command says both stages, ``init_seconds`` the
    first stage's training time (the export adds it)."""
    ckpt = torch.load(RUNS_DIR / args.init_from / "ckpt.pt", map_location="cpu", weights_only=False)
    own = {key: getattr(args, key) for key in ("name", "init_from", "relations", "positions", "max_steps", "max_minutes")}
    own["init_seconds"] = logged_seconds(RUNS_DIR / args.init_from / "train.log")
    command = " ".join(["python -m benchmark.models.train"] + sys.argv[1:])
    ckpt = {**ckpt, "command": f"{ckpt['command']} (to step {ckpt['step']}); then {command}"}
    return ckpt, argparse.Namespace(**{**ckpt["args"], **own})


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    run_dir = RUNS_DIR / args.name
    ckpt_path, ckpt, args = open_run(run_dir, args)
    if ckpt is None and getattr(args, "init_from", None):
        ckpt, args = initial_checkpoint(args)
    config = model_config(args)
    latent_shape = PIXEL_UNSHUFFLE_SHAPE if getattr(args, "autoencoder", None) is None else AE_LATENT_SHAPE
    backbone = getattr(args, "backbone", "unet")
    unet, text_encoder = build_denoiser(backbone, config, args.seed, latent_shape)
    text_params = [p for n, p in text_encoder.named_parameters() if n != "eos_column"]
    if args.text_lr_scale == 0:
        for p in text_params:
            p.requires_grad_(False)
    groups = [{"params": list(unet.parameters()) + [text_encoder.eos_column], "lr": args.lr}]
    if args.text_lr_scale > 0:
        groups.append({"params": text_params, "lr": args.lr * args.text_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = DDPMScheduler(**scheduler_config(args.beta_schedule))
    step, command = 0, " ".join(["python -m benchmark.models.train"] + sys.argv[1:])
    ema = {k: v.detach().clone() for k, v in full_state(unet, text_encoder).items()}
    if ckpt is not None:
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        ema, step, command = ckpt["ema"], ckpt["step"], ckpt["command"]
    autoencoder = None
    if args.autoencoder is not None:  # the run keeps its own copy, so a resumed run encodes the same
        autoencoder, ae_ckpt = load_run(args.autoencoder)
        ae_config = AutoencoderConfig.from_dict(ae_ckpt["config"])
        if ckpt is not None:
            autoencoder.load_state_dict(ckpt["autoencoder"])
    (run_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
    tokenizer, cache = load_tokenizer(), {}
    recorder = AttentionRecorder(anchor_layers(unet)) if backbone == "unet" else None
    if recorder is not None:
        recorder.armed = args.grounding > 0
    log = open(run_dir / "train.log", "a")
    log.write(f"# {'resume' if ckpt else 'start'} at step {step}: {command}\n")
    log.flush()

    def save(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                    "optimizer": optimizer.state_dict(), "ema": ema, "step": step, "args": vars(args),
                    "model_config": asdict(config), "command": command,
                    **({} if autoencoder is None else {"autoencoder": autoencoder.state_dict(),
                                                       "autoencoder_config": asdict(ae_config)})}, tmp)
        os.replace(tmp, ckpt_path)

    def train_step(step: int) -> dict[str, float]:
        scenes, latents, ids, noise, timesteps = make_batch(args, step, tokenizer, cache, autoencoder)
        context = text_encoder(ids)[0]
        if backbone == "mmdit":  # the DDPM timesteps of the batch go unused; the sigmas are (seed, step)'s too
            generator = torch.Generator().manual_seed(2**40 + args.seed * 1_000_003 + step)
            sigmas = logit_normal_sigmas(args.batch, generator, args.logit_mean, args.logit_std)
            mse = flow_loss(unet, latents, noise, sigmas, context)
        else:
            noisy = scheduler.add_noise(latents, noise, timesteps)
            mse = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=context).sample, noise)
        armed = recorder is not None and recorder.armed
        ground = grounding_loss(recorder.take(), scenes, ids) if armed else torch.zeros(())
        loss = mse + args.grounding * ground
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        # warm-up form of the decay, so early exports are not dominated by the random init
        ema_update(ema, full_state(unet, text_encoder), min(args.ema, (2 + step) / (11 + step)))
        return {"loss": mse.item(), "grounding": ground.item()}

    unet.train()
    run_steps(train_step, save, log, step, args.max_steps, args.max_minutes, args.ckpt_minutes, args.log_every)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.export:
        print(export(RUNS_DIR / args.name, args.export_name))
    else:
        train(args)


if __name__ == "__main__":
    main()
