"""Gate: does each entity word's cross-attention land on its own object?

ELA can only steer a model whose entity tokens attend to their own objects. This samples two-object
prompts, records the cross-attention maps of the lowest-resolution up-block with cross-attention (the
layers ELA anchors on) at one step mid-sampling, segments the FINAL image with the exact evaluator, and
reports per entity word the ratio (attention mass on its own object's mask) / (mass on the other
object's mask), over images where both objects were found as separate components. It also reports the
plain sampler's failure rates.

    OMP_NUM_THREADS=1 python -m benchmark.localization --run NAME      # EMA of runs/NAME/ckpt.pt
    OMP_NUM_THREADS=1 python -m benchmark.localization --weights benchmark/weights/model.safetensors
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
from PIL import Image

from .evaluate import MERGED, MISSING, evaluate
from .model import load_model
from .sampling import sample
from .scenes import prompt_text, held_out_prompts, training_scene
from .train import ROOT, export


def anchor_layers(unet) -> list[torch.nn.Module]:
    """attn2 modules of the first up-block (execution order = lowest resolution) that has any."""
    for block in unet.up_blocks:
        layers = [m for n, m in block.named_modules() if n.endswith("attn2")]
        if layers:
            return layers
    raise ValueError("no up-block with cross-attention")


class AttentionRecorder:
    """Forward pre-hooks that recompute softmax(q k^T * scale) in fp32, head-averaged, when armed."""

    def __init__(self, layers):
        self.armed, self.maps = False, []
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in layers]

    def _hook(self, module, args, kwargs):
        if not self.armed:
            return
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        q, k = module.to_q(x).float(), module.to_k(ctx).float()
        b, n, _ = q.shape
        q = q.view(b, n, module.heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], module.heads, -1).transpose(1, 2)
        self.maps.append((q @ k.transpose(-1, -2) * module.scale).softmax(-1).mean(1))  # (B, HW, 77)

    def take(self) -> torch.Tensor:
        """Mean over recorded layers, (B, HW, 77); clears the record."""
        out = torch.stack(self.maps).mean(0)
        self.maps = []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def word_column(tokenizer, prompt: str, word: str) -> int:
    ids = tokenizer(prompt)["input_ids"]
    return ids.index(tokenizer(word)["input_ids"][1])


def measure(unet, text_encoder, tokenizer, scheduler_config, prompts_objects, seed=0, steps=20,
            guidance=5.0, at=0.4, batch=32, grid_path: Path | None = None) -> dict:
    recorder = AttentionRecorder(anchor_layers(unet))
    capture_step = int(at * steps)
    ratios = {"shape": [], "colour": []}
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

            images = sample(unet, text_encoder, tokenizer, scheduler_config, prompts, seed=seed + start,
                            steps=steps, guidance=guidance, on_step=on_step)
            all_images.append(images)
            maps = captured["maps"][len(chunk):]  # conditional half
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
                        column = amap[:, word_column(tokenizer, prompt, word)]
                        own, other = float(column @ pooled[j]), float(column @ pooled[1 - j])
                        ratios[kind].append(own / max(other, 1e-12))
                        masses[kind].append((own, other))
    finally:
        recorder.remove()
    if grid_path is not None:
        save_grid(np.concatenate(all_images), grid_path)
    summary = {"images": n_images, "all_ok_rate": images_ok / n_images,
               "object_status": {k: v / (2 * n_images) for k, v in sorted(status.items())}}
    for kind in ratios:
        r, m = np.asarray(ratios[kind]), np.asarray(masses[kind])
        if len(r):
            summary[f"{kind}_ratio"] = {
                "n": len(r), "mean": float(r.mean()), "median": float(np.median(r)),
                "geo_mean": float(np.exp(np.log(np.clip(r, 1e-6, None)).mean())),
                "pooled": float(m[:, 0].sum() / m[:, 1].sum()), "own_gt_other": float(np.mean(m[:, 0] > m[:, 1]))}
    return summary


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """Images in rows of ``columns``, 4x nearest-neighbour enlarged, for a look by eye."""
    rows = -(-len(images) // columns)
    padded = np.concatenate([images, np.zeros((rows * columns - len(images),) + images.shape[1:], np.uint8)])
    grid = padded.reshape(rows, columns, *images.shape[1:]).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * images.shape[1], columns * images.shape[2], 3)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


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
    p.add_argument("--weights")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--prompts", choices=["test", "train"], default="test")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--at", type=float, default=0.4, help="fraction of the steps at which maps are taken")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=Path, help="also save the samples as one PNG here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.run:
        run_dir = ROOT / "runs" / args.run
        weights = export(run_dir, "ema", out_dir=run_dir / "export")
    else:
        weights = Path(args.weights)
    unet, text_encoder, tokenizer, scheduler_config = load_model(weights)
    summary = measure(unet, text_encoder, tokenizer, scheduler_config, gate_prompts(args.prompts, args.n),
                      seed=args.seed, steps=args.steps, guidance=args.guidance, at=args.at,
                      grid_path=args.grid)
    summary["step"] = json.loads(weights.with_suffix(".json").read_text())["step"]
    summary["prompts"] = args.prompts
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
