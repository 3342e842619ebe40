"""How well the engine's masks find the objects, variant by variant, without anchoring.

Samples prompts with anchoring off, records the maps ELA would read (the engine's layers) at every
step of the default window, and scores each localisation variant's entity masks against the
objects the evaluator finds in the final image (``metrics.localisation_iou``), with each mask's
share of the map beside the objects' share. Off trajectories keep the comparison fair: every
variant sees the same maps and the same final objects, so a variant that finds objects better
shows it here before any effect run.

    python -m benchmark.studies.mask_quality [--prompt-seed 1] [--prompts-per-family 8] [--seeds 100:104]

Variants: ``otsu`` (the engine's default: ``B(A_i) AND D_i AND NOT B(A_SoT)``), ``mean`` and
``half`` (the other binarisations), ``no_background`` (Otsu without the start-of-text step),
``grown`` (each entity's top cells inside its dominance region ``D_i``, as many as an object
covers on this model, 15% of the map: a mask of the object's size).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ela_ext.anchoring import in_window, localize_target
from ela_ext.config import BINARIZATION_CHOICES, ElaConfig
from ela_ext.diffusers_adapter import prompt_targets
from ela_ext.localize import dominance_masks, localize, top_k_mask, word_map
from ela_ext.tokens import EntityColumns

from ..commands.effect import parse_seeds
from ..judge.evaluate import evaluate
from ..judge.families import FAMILIES, family_prompts
from ..judge.metrics import localisation_iou
from ..models.attention import AttentionRecorder, anchor_layers
from ..models.model import BenchmarkModel, load_model
from ..models.scenes import parse_prompt
from ..paths import BUNDLED_WEIGHTS

VARIANTS = ("otsu", "mean", "half", "no_background", "grown")
GROWN_SHARE = 0.15


def variant_masks(maps: torch.Tensor, target, variant: str) -> np.ndarray:
    """(n, h, w) entity masks of one image's maps (columns, h, w) under ``variant``."""
    if variant in BINARIZATION_CHOICES:  # the engine's own localisation
        return localize_target(maps, target, variant).entity_masks.numpy()
    entity_maps = torch.stack([word_map(maps, entity.columns) for entity in target.entities])
    if variant == "grown":
        dominance = dominance_masks(entity_maps)
        k = max(1, round(GROWN_SHARE * entity_maps[0].numel()))
        return np.stack([top_k_mask(torch.where(d, m, m.min() - 1), k).numpy()
                         for d, m in zip(dominance, entity_maps)])
    no_background = torch.zeros_like(entity_maps[0])  # a constant map binarises to no background
    names = [entity.word for entity in target.entities]
    return localize(entity_maps, no_background, names, "otsu").entity_masks.numpy()


def off_trajectory_maps(model: BenchmarkModel, prompt: str, seeds: Sequence[int], steps: int, guidance: float,
                        config: ElaConfig) -> tuple[EntityColumns, dict[int, torch.Tensor], np.ndarray]:
    """Sample ``prompt`` with anchoring off and return its entity target, the maps ELA would read at
    each step of ``config``'s window, ``{step: (images, columns, h, w)}``, and the final images."""
    target = prompt_targets(model.tokenizer, [prompt], [""])[0]
    recorder = AttentionRecorder(anchor_layers(model.unet))
    recorded: dict[int, torch.Tensor] = {}

    def on_step(index: int, _timestep) -> None:
        if recorder.maps:
            recorded[index - 1] = recorder.take()[:len(seeds)]  # conditional rows first
        recorder.armed = in_window(index, steps, config)

    try:
        latents = model.sample([prompt] * len(seeds), ElaConfig(), seeds, num_steps=steps, guidance_scale=guidance,
                               on_step=on_step).latents
    finally:
        recorder.remove()
    spatial = {}
    for step, maps in recorded.items():
        side = int(round(maps.shape[1] ** 0.5))
        spatial[step] = maps.transpose(1, 2).reshape(maps.shape[0], -1, side, side)
    return target, spatial, model.decode(latents)


def score_prompt(model: BenchmarkModel, prompt: str, seeds: Sequence[int], steps: int, guidance: float,
                 config: ElaConfig) -> dict[tuple[str, int], list[tuple[Optional[float], float]]]:
    """(variant, anchored step) -> per image (IoU or None, mask share of the map)."""
    target, recorded, images = off_trajectory_maps(model, prompt, seeds, steps, guidance, config)
    objects = parse_prompt(prompt)
    regions = [evaluate(image, objects).masks for image in images]
    scores = defaultdict(list)
    scores[("objects", -1)] = [(None, float(region.mean())) for image in regions for region in image if region.any()]
    for step, maps in sorted(recorded.items()):
        for row, image_regions in enumerate(regions):
            for variant in VARIANTS:
                masks = variant_masks(maps[row], target, variant)
                scores[(variant, step)].append((localisation_iou(masks, image_regions), float(masks.mean())))
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--prompts-per-family", type=int, default=8)
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--seeds", default="100:104")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.weights)
    seeds, config = parse_seeds(args.seeds), ElaConfig()
    scores = defaultdict(list)
    for family in args.families.split(","):
        for prompt in family_prompts(family, args.prompt_seed, args.prompts_per_family):
            for key, values in score_prompt(model, prompt, seeds, args.steps, args.guidance, config).items():
                scores[key].extend(values)
    shares = [share for _, share in scores.pop(("objects", -1))]
    print(f"{len(seeds)} seeds; IoU of entity masks with the objects found in the final image (off), "
          f"mask share of the map in brackets; a found object covers {np.mean(shares):.1%} of the image")
    steps = sorted({step for _, step in scores})
    print(f"{'variant':14s} " + " ".join(f"{'step ' + str(s + 1):>14s}" for s in steps))
    for variant in VARIANTS:
        cells = []
        for step in steps:
            values = scores[(variant, step)]
            ious = [iou for iou, _ in values if iou is not None]
            cells.append(f"{np.mean(ious):.3f} ({np.mean([share for _, share in values]):.1%})")
        print(f"{variant:14s} " + " ".join(f"{c:>14s}" for c in cells))


if __name__ == "__main__":
    main()
