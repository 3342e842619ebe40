"""How many images that are right WITHOUT anchoring stay right with it, per setting, on a
development set: the *kept* bound of the defaults (kept >= 95% of right images).

The effect benchmark measures kept on its own images, where few are right off (46 of 768), and its
development set has fewer still. This finds the right-off images of a larger development set once
(anchoring off is the cheap run), then samples each setting on only those images:

    python -m benchmark.studies.kept [--families seen] [--prompt-seed 3] [--prompts-per-family 24]
        [--seeds 100:148] [--grid "step_size=0.05,0.1"] [--settings ela_enhance,random]
        [--workers 2] [--cache runs/kept]

Each row: a setting (an objective, ``default`` or ``random``) at a grid point (the others at their
defaults), the right-off images it keeps, and how far it moved them (mean pixel change). The same
initial noise per (prompt, seed) as the effect benchmark, so the rows are paired with its tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ela_ext.config import ElaConfig, replace

from ..commands.effect import (SettingResult, cached_run_setting, parse_seeds, run_jobs, run_key, run_setting,
                               sampling_backend, setting_config)
from ..judge.families import family_prompts
from ..judge.metrics import pixel_change
from ..paths import BUNDLED_WEIGHTS
from .sweep import parse_grid


def right_off(off: SettingResult, prompts: list[str], seeds: list[int]) -> dict[int, list[int]]:
    """Prompt index -> the seeds whose off image is right (``off`` is prompt-major, seed-minor)."""
    right: dict[int, list[int]] = {}
    for position, correct in enumerate(off.correct):
        if correct:
            right.setdefault(position // len(seeds), []).append(seeds[position % len(seeds)])
    return right


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--families", default="seen", help="the seen pairings have the most right-off images")
    parser.add_argument("--prompts-per-family", type=int, default=24)
    parser.add_argument("--prompt-seed", type=int, default=3, help="a development set, disjoint from prompts/")
    parser.add_argument("--seeds", default="100:148")
    parser.add_argument("--grid", default="step_size=0.1", help='e.g. "step_size=0.05,0.1;max_iterations=1"')
    parser.add_argument("--settings", default="default,random")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping the off run (resume)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prompts = [prompt for family in args.families.split(",")
               for prompt in family_prompts(family, args.prompt_seed, args.prompts_per_family)]
    seeds, settings = parse_seeds(args.seeds), args.settings.split(",")
    for setting in settings:
        setting_config(setting, ElaConfig())  # an unknown setting fails before any sampling
    with sampling_backend(args.weights, args.workers) as (model, pool):
        key = run_key(prompts, seeds, "off", ElaConfig(), args.steps, args.guidance, args.weights)
        off = cached_run_setting(args.cache, key, lambda: run_setting(
            model, prompts, seeds, "off", ElaConfig(), args.steps, args.guidance, pool))
        right = right_off(off, prompts, seeds)
        off_images = [image for image, correct in zip(off.images, off.correct) if correct]
        print(f"{len(prompts)} prompts x {len(seeds)} seeds: {len(off_images)} right with anchoring off "
              f"({len(off_images) / len(off.correct):.1%})", flush=True)
        if not off_images:
            return
        for name, value in parse_grid(args.grid):
            config = replace(ElaConfig(), **{name: value})
            for setting in settings:
                jobs = [(index, prompts[index], right[index], setting, config, args.steps, args.guidance)
                        for index in sorted(right)]
                result = run_jobs(model, jobs, setting, pool)
                kept = sum(result.correct)
                moved = np.mean([pixel_change(a, b) for a, b in zip(off_images, result.images)])
                print(f"{name}={value:<8} {setting:16s} kept {kept:3d} / {len(off_images)} "
                      f"({kept / len(off_images):.0%})  moved {moved:.1%}", flush=True)


if __name__ == "__main__":
    main()
