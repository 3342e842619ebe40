"""The newcomer's command: one prompt, the same seeds with anchoring off, with the defaults and with
pure ELA (Eq. 7), side by side, plus the defaults' mask grid of the first seed, in one PNG (about a
minute on a CPU). The prompt is the test set's first and the seeds the first six: nothing picked.

    python -m benchmark.commands.demo [--prompt "a circle and a square"] [--seeds 0,1,2,3]
                                      [--out outputs/ela-demo.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ela_ext.config import ElaConfig, replace

from ..judge.evaluate import evaluate
from ..judge.families import family_prompts
from ..models.model import load_model
from ..models.scenes import parse_prompt
from ..paths import BUNDLED_WEIGHTS
from .effect import parse_seeds

SCALE = 4
LABEL_HEIGHT = 14


def labelled_row(images: np.ndarray, labels: list[str], title: str) -> Image.Image:
    """Images upscaled side by side, each with its evaluator verdict below, a title on the left."""
    size = images.shape[1] * SCALE
    row = Image.new("RGB", (90 + len(images) * (size + 4), size + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(row)
    draw.text((4, size // 2 - 6), title, fill="black")
    for index, (image, label) in enumerate(zip(images, labels)):
        left = 90 + index * (size + 4)
        row.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (left, 0))
        draw.text((left + 2, size), label, fill="black")
    return row


def verdict(statuses: list[str]) -> str:
    return "ok" if all(s == "ok" for s in statuses) else "/".join(statuses)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--prompt", default=family_prompts("held_out")[0])
    parser.add_argument("--entities", default="", help="ELA entity spec; empty: detect from the prompt")
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("outputs/ela-demo.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.weights)
    seeds = parse_seeds(args.seeds)
    rows, objects = [], parse_prompt(args.prompt)
    session = None
    defaults = ElaConfig(enabled=True, entities=args.entities).for_denoiser(joint=model.backbone == "mmdit")
    rows_to_make = (("off", replace(defaults, enabled=False)), (f"{defaults.objective}", defaults),
                    ("ela (Eq. 7)", replace(defaults, objective="ela")))
    for title, config in rows_to_make:
        result = model.sample([args.prompt] * len(seeds), config, seeds, num_steps=args.steps)
        images = model.decode(result.latents)
        labels = [verdict(evaluate(image, objects).status) for image in images]
        print(f"{title}: " + ", ".join(f"seed {seed} {label}" for seed, label in zip(seeds, labels)))
        rows.append(labelled_row(images, labels, title))
        session = session or result.session
    grid = session.mask_grid(0)
    width = max([row.width for row in rows] + [grid.width])
    canvas = Image.new("RGB", (width, 24 + sum(row.height + 6 for row in rows) + grid.height), "white")
    ImageDraw.Draw(canvas).text((4, 6), f'"{args.prompt}"  seeds {args.seeds}; mask grid: {defaults.objective}, seed {seeds[0]}',
                                fill="black")
    top = 24
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height + 6
    canvas.paste(grid, (0, top))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
