"""Does the image follow the cross-attention maps on the bundled model? Force them and look.

    python -m benchmark.studies.maps_steer [--families held_out,seen] [--prompt-seed 1] [--prompts-per-family 8]
                                           [--seeds 100:108] [--window 0.3] [--layers all|up_lowest] [--boost 1]

A trained ``to_k`` change can only move where each word's attention goes. Whether that can place
objects is a property of the model, measured here without any training: during plain sampling
each entity's columns (its word and its attributes) are confined to a fixed layout (entity i of
n: the i-th vertical strip of the image), every head of the chosen cross-attention layers, the
conditional rows only, for the first ``--window`` of the steps; outside its strip an entity's
attention is multiplied by ``--floor`` (0: removed), inside by ``--boost``, and each pixel's
attention is renormalised over the columns. "Layout followed" counts images where every requested
object is found with its centre inside its own strip. If forcing the maps does not move the
objects, no change to the keys can: the layout is decided elsewhere (the latent, self-attention,
the convolutions), which is where test-time anchoring acts (its gradient reaches ``z_t``).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ela_ext.capture import find_cross_attention_layers, is_cross_attention
from ela_ext.config import ElaConfig
from ela_ext.diffusers_adapter import prompt_targets
from ela_ext.tokens import EntityColumns

from ..commands.effect import parse_seeds
from ..judge.evaluate import evaluate
from ..judge.families import family_prompts
from ..models.model import BenchmarkModel, load_model
from ..models.scenes import parse_prompt
from ..paths import BUNDLED_WEIGHTS


def strip_masks(count: int, side: int) -> torch.Tensor:
    """(count, side * side): entity i's vertical strip of a side x side map, flattened."""
    xs = (torch.arange(side) + 0.5) / side
    strips = torch.stack([((xs >= i / count) & (xs < (i + 1) / count)).float() for i in range(count)])
    return strips[:, None, :].expand(count, side, side).reshape(count, side * side)


class LayoutAttention:
    """A diffusers attention processor that computes the probabilities explicitly and, while
    ``active``, confines each conditional row's entity columns to its strip."""

    def __init__(self, targets: Sequence[EntityColumns], floor: float = 0.0, boost: float = 1.0):
        self.targets, self.floor, self.boost = list(targets), floor, boost
        self.active = False

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor]
                 = None, attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        if self.active:
            probs = self.confined(probs, attn.heads)
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))

    def confined(self, probs: torch.Tensor, heads: int) -> torch.Tensor:
        """``probs`` (batch * heads, pixels, columns), rows batch-major; the conditional rows are
        the first ``len(targets)`` images of the batch."""
        probs = probs.clone()
        side = int(round(probs.shape[1] ** 0.5))
        for row, target in enumerate(self.targets):
            strips = strip_masks(len(target.entities), side).to(probs)
            for strip, entity in zip(strips, target.entities):
                columns = list(entity.columns) + [c for attribute in entity.attributes for c in attribute.columns]
                factor = strip * self.boost + (1 - strip) * self.floor
                probs[row * heads:(row + 1) * heads, :, columns] *= factor[None, :, None]
        return probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)


@contextmanager
def processors(layers: Sequence[nn.Module], processor: object) -> Iterator[None]:
    saved = [layer.processor for layer in layers]
    try:
        for layer in layers:
            layer.set_processor(processor)
        yield
    finally:
        for layer, old in zip(layers, saved):
            layer.set_processor(old)


def layout_followed(report, count: int) -> bool:
    """Every requested object found, its centre inside its own strip."""
    for index, mask in enumerate(report.masks):
        if not mask.any():
            return False
        centre = (np.nonzero(mask)[1].mean() + 0.5) / mask.shape[1]
        if not index / count <= centre < (index + 1) / count:
            return False
    return True


def run(model: BenchmarkModel, prompts: Sequence[str], seeds: Sequence[int], forced: bool, window: float, layers: str,
        floor: float, boost: float, steps: int = 20, guidance: float = 5.0) -> tuple[list[bool], list[bool]]:
    """(right, layout followed) per image, plain sampling with the maps forced or not."""
    chosen = ([m for name, m in model.unet.named_modules() if is_cross_attention(name, m)] if layers == "all"
              else [m for _, m in find_cross_attention_layers(model.unet, layers)])
    right, followed = [], []
    for prompt in prompts:
        targets = prompt_targets(model.tokenizer, [prompt] * len(seeds), [""] * len(seeds))
        processor = LayoutAttention(targets, floor, boost)

        def on_step(step_index: int, timestep) -> None:
            processor.active = forced and step_index < window * steps
        with processors(chosen, processor):
            sampled = model.sample([prompt] * len(seeds), ElaConfig(), seeds, num_steps=steps, guidance_scale=guidance,
                                   on_step=on_step)
        objects = parse_prompt(prompt)
        for image in model.decode(sampled.latents):
            report = evaluate(image, objects)
            right.append(report.all_ok)
            followed.append(layout_followed(report, len(objects)))
    return right, followed


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--families", default="held_out,seen")
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--prompts-per-family", type=int, default=8)
    parser.add_argument("--seeds", default="100:108")
    parser.add_argument("--window", type=float, default=0.3, help="fraction of the steps with forced maps")
    parser.add_argument("--layers", default="all", help="all cross-attention layers, or a capture choice")
    parser.add_argument("--floor", type=float, default=0.0)
    parser.add_argument("--boost", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(args.weights)
    seeds = parse_seeds(args.seeds)
    print(f"{'family':10s} {'maps':7s} {'images':>6s} {'right':>7s} {'layout followed':>16s}")
    for family in args.families.split(","):
        prompts = family_prompts(family, args.prompt_seed, args.prompts_per_family)
        for forced in (False, True):
            right, followed = run(model, prompts, seeds, forced, args.window, args.layers, args.floor, args.boost)
            print(f"{family:10s} {'forced' if forced else 'own':7s} {len(right):6d} {np.mean(right):7.1%} "
                  f"{np.mean(followed):16.1%}", flush=True)


if __name__ == "__main__":
    main()
