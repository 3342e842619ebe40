"""Gate: does each entity word's cross-attention land on its own object?

ELA can only steer a model whose entity tokens attend to their own objects. This samples two-object
prompts, records the cross-attention maps of the lowest-resolution up-block with cross-attention (the
layers ELA anchors on) at one step mid-sampling, segments the FINAL image with the exact evaluator, and
reports per entity word the ratio (attention mass on its own object's mask) / (mass on the other
object's mask), over images where both objects were found as separate components. It also reports the
plain sampler's failure rates.

    OMP_NUM_THREADS=1 python -m benchmark.studies.localization --run NAME      # EMA of runs/NAME/ckpt.pt
    OMP_NUM_THREADS=1 python -m benchmark.studies.localization --weights benchmark/weights/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from ela_ext.config import ElaConfig

from ..judge.evaluate import MERGED, MISSING, evaluate
from ..models.attention import AttentionRecorder, anchor_layers
from ..models.clip_tokenizer import encode
from ..models.model import BenchmarkModel, load_model
from ..models.scenes import held_out_prompts, prompt_text, training_scene
from ..models.train import export
from ..paths import BUNDLED_WEIGHTS, RUNS_DIR


def word_column(tokenizer, prompt: str, word: str) -> int:
    """Column of ``word`` (one CLIP token) in the prompt's 77 columns."""
    ids = tokenizer(prompt)["input_ids"]
    return ids.index(tokenizer(word)["input_ids"][1])


def measure(model: BenchmarkModel, prompts_objects, seed=0, steps=20,
            guidance=5.0, eta=0.0, at=0.4, batch=32, grid_path: Path | None = None) -> dict:
    """Sample ``prompts_objects`` and report failure rates and own/other attention mass ratios."""
    recorder = AttentionRecorder(anchor_layers(model.unet))
    capture_step = int(at * steps)
    masses = {"shape": [], "colour": []}  # (own, other) pairs
    status, images_ok = Counter(), 0
    n_images, all_images = 0, []
    try:
        for start in range(0, len(prompts_objects), batch):
            chunk = prompts_objects[start:start + batch]
            prompts = [prompt_text(p) for p in chunk]
            captured = {}

            def on_step(i, _t):
                recorder.armed = i == capture_step
                if i == capture_step + 1:
                    captured["maps"] = recorder.take()

            seeds = range(seed + start, seed + start + len(chunk))
            latents = model.sample(prompts, ElaConfig(), seeds, num_steps=steps, guidance_scale=guidance,
                             generator=torch.Generator().manual_seed(seed + start),
                             step_options={"eta": eta}, on_step=on_step).latents
            images = model.decode(latents)
            all_images.append(images)
            maps = captured["maps"][:len(chunk)]  # conditional rows
            side = int(round(maps.shape[1] ** 0.5))
            for objects, prompt, image, amap in zip(chunk, prompts, images, maps):
                n_images += 1
                report = evaluate(image, objects)
                status.update(report.status)
                images_ok += report.all_ok
                if any(st in (MISSING, MERGED) for st in report.status):
                    continue  # the ratio is defined where the two objects are separate components
                pooled = [F.adaptive_avg_pool2d(torch.from_numpy(m).float()[None, None], side).flatten()
                          for m in report.masks]
                for kind, words in (("shape", [o[0] for o in objects]), ("colour", [o[1] for o in objects])):
                    if None in words:
                        continue
                    for j, word in enumerate(words):
                        column = amap[:, word_column(model.tokenizer, prompt, word)]
                        own, other = float(column @ pooled[j]), float(column @ pooled[1 - j])
                        masses[kind].append((own, other))
    finally:
        recorder.remove()
    if grid_path is not None:
        save_grid(np.concatenate(all_images), grid_path)
    summary = {"images": n_images, "all_ok_rate": images_ok / n_images,
               "object_status": {k: v / (2 * n_images) for k, v in sorted(status.items())}}
    for kind, m in masses.items():
        if m:
            summary[f"{kind}_ratio"] = _ratio_summary(np.asarray(m))
    return summary


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """Images in rows of ``columns``, 4x nearest-neighbour enlarged, for a look by eye."""
    rows = -(-len(images) // columns)
    padded = np.concatenate([images, np.zeros((rows * columns - len(images),) + images.shape[1:], np.uint8)])
    grid = padded.reshape(rows, columns, *images.shape[1:]).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * images.shape[1], columns * images.shape[2], 3)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


@torch.no_grad()
def measure_on_renders(model: BenchmarkModel, n=64, timestep=600, seed=0) -> dict:
    """The same ratio with the layout given: noise rendered two-object training-distribution scenes to
    ``timestep``, run the conditional UNet once, and use the ground-truth masks. Needs no successful
    sampling, so it tells early in training whether the word columns localise at all."""
    rng, scenes = random.Random(seed), []
    while len(scenes) < n:
        scene = training_scene(rng.randrange(10**9))
        if len(scene.objects) == 2:
            scenes.append(scene)
    recorder = AttentionRecorder(anchor_layers(model.unet))
    latents = model.encode(np.stack([s.image for s in scenes]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.full((n,), timestep)
    noisy = DDPMScheduler(**model.scheduler_config).add_noise(latents, noise, t)
    recorder.armed = True
    try:
        context = model.text_encoder(encode(model.tokenizer, [s.caption for s in scenes]))[0]
        model.unet(noisy, t, encoder_hidden_states=context)
        maps = recorder.take()
    finally:
        recorder.remove()
    side = int(round(maps.shape[1] ** 0.5))
    masses = {"shape": [], "colour": []}
    for scene, amap in zip(scenes, maps):
        pooled = [F.adaptive_avg_pool2d(torch.from_numpy(o.mask).float()[None, None], side).flatten()
                  for o in scene.objects]
        named_colours = len(scene.caption.split()) == 7
        for kind in ("shape", "colour") if named_colours else ("shape",):
            for j, obj in enumerate(scene.objects):
                column = amap[:, word_column(model.tokenizer, scene.caption, getattr(obj, kind))]
                masses[kind].append((float(column @ pooled[j]), float(column @ pooled[1 - j])))
    return {f"{kind}_ratio": _ratio_summary(np.asarray(m)) for kind, m in masses.items() if m}


def _ratio_summary(m: np.ndarray) -> dict:
    """Own/other statistics from (own, other) mass pairs."""
    r = m[:, 0] / np.clip(m[:, 1], 1e-12, None)
    return {"n": len(r), "mean": float(r.mean()), "median": float(np.median(r)),
            "geo_mean": float(np.exp(np.log(np.clip(r, 1e-6, None)).mean())),
            "pooled": float(m[:, 0].sum() / m[:, 1].sum()), "own_gt_other": float(np.mean(m[:, 0] > m[:, 1]))}


def gate_prompts(kind: str, n: int, seed: int = 0) -> list[list[tuple[str, str | None]]]:
    """``test``: the held-out prompts, cycled; ``train``: two-object training-distribution captions."""
    if kind == "test":
        pool = held_out_prompts()
        return [pool[i % len(pool)] for i in range(n)]
    rng, out = random.Random(seed), []
    while len(out) < n:
        scene = training_scene(rng.randrange(10**9))
        if len(scene.objects) == 2:
            named = " and a " in scene.caption and len(scene.caption.split()) == 7
            out.append([(o.shape, o.colour if named else None) for o in scene.objects])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run")
    p.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS, help="used without --run")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--prompts", choices=["test", "train"], default="test")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--at", type=float, default=0.4, help="fraction of the steps at which maps are taken")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=Path, help="also save the samples as one PNG here")
    p.add_argument("--renders", action="store_true",
                   help="measure on noised ground-truth renders instead of samples (no sampling)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.run:
        run_dir = RUNS_DIR / args.run
        weights = export(run_dir, "ema", out_dir=run_dir / "export")
    else:
        weights = args.weights
    model = load_model(weights)
    if args.renders:
        summary = measure_on_renders(model, n=args.n, timestep=int(1000 * (1 - args.at)), seed=args.seed)
    else:
        summary = measure(model, gate_prompts(args.prompts, args.n),
                          seed=args.seed, steps=args.steps, guidance=args.guidance, eta=args.eta, at=args.at,
                          grid_path=args.grid)
    summary["step"] = model.meta["step"]
    summary["prompts"] = args.prompts
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
