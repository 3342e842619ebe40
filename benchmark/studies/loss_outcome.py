"""Can an objective's loss, at an anchored step, tell which images will come out right WITHOUT
anchoring? If it could, a loss threshold (Alg. 1's) or a gate would spare right images and raise
*kept*; this measures whether it can.

Samples prompts with anchoring off, computes each objective's loss on the maps ELA would read at
every step of the window (the engine's own localisation and objectives), judges the final images,
and prints per step the AUC of "lower loss -> right image" (0.5: no better than chance):

    python -m benchmark.studies.loss_outcome [--families seen] [--prompt-seed 3] [--prompts-per-family 24]
                                             [--seeds 100:148] [--objectives ela_enhance,ela,...]

The defaults are ``benchmark.studies.kept``'s development set (1152 images, 19 right off).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
import torch

from ela_ext.anchoring import localize_target, objective_input
from ela_ext.config import OBJECTIVE_NAMES, ElaConfig
from ela_ext.objectives import OBJECTIVES

from ..commands.effect import parse_seeds
from ..judge.evaluate import OK, evaluate
from ..judge.families import family_prompts
from ..models.model import BenchmarkModel, load_model
from ..models.scenes import parse_prompt
from ..paths import BUNDLED_WEIGHTS
from .mask_quality import off_trajectory_maps


def auc_low_is_right(losses: np.ndarray, right: np.ndarray) -> float:
    """P(a right image's loss < a wrong image's), ties counting half: the ROC AUC of ``-loss``."""
    right_losses, wrong_losses = losses[right], losses[~right]
    if not len(right_losses) or not len(wrong_losses):
        return float("nan")
    below = (right_losses[:, None] < wrong_losses[None, :]).mean()
    ties = (right_losses[:, None] == wrong_losses[None, :]).mean()
    return float(below + ties / 2)


def prompt_losses(model: BenchmarkModel, prompt: str, seeds: Sequence[int], steps: int, guidance: float,
                  config: ElaConfig, objectives: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(right off per image, losses (images, anchored steps, objectives)) for one prompt."""
    target, recorded, images = off_trajectory_maps(model, prompt, seeds, steps, guidance, config)
    objects = parse_prompt(prompt)
    right = np.array([all(status == OK for status in evaluate(image, objects).status) for image in images])
    losses = np.zeros((len(images), len(recorded), len(objectives)))
    for column, step in enumerate(sorted(recorded)):
        for row in range(len(images)):
            maps = recorded[step][row].float()
            inputs = objective_input(maps, target, localize_target(maps, target, config.binarization),
                                     config.lambda_weight)
            losses[row, column] = [float(OBJECTIVES[name](inputs)) for name in objectives]
    return right, losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(BUNDLED_WEIGHTS))
    parser.add_argument("--families", default="seen")
    parser.add_argument("--prompts-per-family", type=int, default=24)
    parser.add_argument("--prompt-seed", type=int, default=3)
    parser.add_argument("--seeds", default="100:148")
    parser.add_argument("--objectives", default="ela_enhance,ela,separate_enhance,attend_excite")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    objectives = args.objectives.split(",")
    unknown = set(objectives) - set(OBJECTIVE_NAMES)
    if unknown:
        parser.error(f"unknown objective(s) {', '.join(sorted(unknown))}: of {', '.join(OBJECTIVE_NAMES)}")
    model, seeds, config = load_model(args.weights), parse_seeds(args.seeds), ElaConfig()
    rights, losses = [], []
    for family in args.families.split(","):
        for prompt in family_prompts(family, args.prompt_seed, args.prompts_per_family):
            right, loss = prompt_losses(model, prompt, seeds, args.steps, args.guidance, config, objectives)
            rights.append(right)
            losses.append(loss)
    right, loss = np.concatenate(rights), np.concatenate(losses)
    print(f"{len(right)} images, {int(right.sum())} right with anchoring off; AUC of 'lower loss -> right' "
          f"(0.5: chance), mean loss right / wrong in brackets")
    print(f"{'anchored step':14s} " + " ".join(f"{name:>24s}" for name in objectives))
    for step in range(loss.shape[1]):
        cells = [f"{auc_low_is_right(loss[:, step, k], right):.2f} ({loss[right, step, k].mean():.2f} / "
                 f"{loss[~right, step, k].mean():.2f})" for k in range(len(objectives))]
        print(f"{step + 1:<14d} " + " ".join(f"{cell:>24s}" for cell in cells))


if __name__ == "__main__":
    main()
