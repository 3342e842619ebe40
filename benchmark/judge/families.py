"""The benchmark's prompt families: what a two- or three-entity prompt can ask of the model.

* ``held_out``: two objects in a pairing no training caption had (``scenes.held_out_prompts``): the
  model has to compose what it never drew side by side, so missing objects dominate.
* ``seen``: two objects in pairings the training captions had: the model can draw both, and
  bleeding (a colour on the wrong object, merged objects) rather than ignorance is the failure.
* ``three``: three objects in seen pairings: entity masks for n > 2 (method.md, step 2).
* ``single``: one coloured object ("a red circle"). ELA needs two entities, so anchoring leaves
  these images alone (the WebUI warns and samples them plain); the family is there for what acts
  on every image, a fine-tuned LoRA: it must not cost the model what it draws alone. Every
  colour-shape combination is seen alone in training (held-out pairings are held out of
  multi-object captions only), and there are only 30: the reported file holds 16, development
  sets draw from the other 14. Not among ``FAMILIES``, the default of every tool that anchors.

Family ``seed`` 0 is the set written to ``prompts/`` (the README's tables). Any other seed draws a
fresh set that excludes every prompt in ``prompts/``: the development set defaults are chosen on,
so that nothing is tuned on the prompts the tables report.
"""

from __future__ import annotations

import itertools
import random

from ..models.scenes import HELD_SHAPE_PAIRS, PALETTE, SHAPES, held_out_prompts, is_held_out, prompt_text
from ..paths import PROMPTS_DIR

SINGLE = "single"
FILES = {"held_out": "test_prompts.txt", "seen": "seen_prompts.txt", "three": "three_prompts.txt",
         SINGLE: "single_prompts.txt"}
FAMILIES = ("held_out", "seen", "three")  # the anchorable families
SINGLE_REPORTED = 16


def _seen_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    while True:
        pairs = list(zip(rng.sample(SHAPES, n), rng.sample(sorted(PALETTE), n)))
        if not is_held_out(pairs):
            return pairs


def seen_prompts(seed: int, count: int = 48) -> list[str]:
    """A third seen shape pairs without colours, two thirds coloured seen pairs, shuffled so that
    the first N of the list mix both."""
    rng = random.Random(seed)
    prompts = [prompt_text([(a, None), (b, None)]) for a, b in itertools.permutations(SHAPES, 2)
               if frozenset((a, b)) not in HELD_SHAPE_PAIRS]
    rng.shuffle(prompts)
    prompts = prompts[:count // 3]
    while len(prompts) < count:
        text = prompt_text(_seen_pairs(rng, 2))
        if text not in prompts:
            prompts.append(text)
    rng.shuffle(prompts)
    return prompts


def three_prompts(seed: int, count: int = 48) -> list[str]:
    """Three coloured objects, distinct shapes and colours, no held-out pairing."""
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < count:
        text = prompt_text(_seen_pairs(rng, 3))
        if text not in prompts:
            prompts.append(text)
    return prompts


def single_prompts(seed: int, count: int = SINGLE_REPORTED) -> list[str]:
    """``count`` of the 30 one-object prompts, in an order drawn from ``seed``."""
    prompts = [prompt_text([(shape, colour)]) for shape in SHAPES for colour in sorted(PALETTE)]
    random.Random(seed).shuffle(prompts)
    return prompts[:count]


def _generate(family: str, seed: int, count: int) -> list[str]:
    if family == "held_out":
        return [prompt_text(objects) for objects in held_out_prompts(seed, count)]
    return {"seen": seen_prompts, "three": three_prompts, SINGLE: single_prompts}[family](seed, count)


def family_prompts(family: str, seed: int = 0, count: int = 48) -> list[str]:
    """``count`` prompts of ``family``: the file in ``prompts/`` for seed 0, else a fresh set
    disjoint from it."""
    if family not in FILES:
        raise ValueError(f"unknown prompt family {family!r}; one of {', '.join(FILES)}")
    path = PROMPTS_DIR / FILES[family]
    if seed == 0:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()][:count]
    reported = set(path.read_text().splitlines())
    fresh = [p for p in _generate(family, seed, count + len(reported)) if p not in reported]
    random.Random(seed).shuffle(fresh)
    return fresh[:count]


def write_prompt_files() -> None:
    """Write the reported sets (seed 0); ``test_prompts.txt`` is ``scenes.write_test_prompts``'s."""
    for family, count in (("seen", 48), ("three", 48), (SINGLE, SINGLE_REPORTED)):
        (PROMPTS_DIR / FILES[family]).write_text("\n".join(_generate(family, 0, count)) + "\n")


if __name__ == "__main__":
    write_prompt_files()
    print(f"wrote {', '.join(FILES[f] for f in ('seen', 'three', SINGLE))} in {PROMPTS_DIR}")
