"""How far a benchmark model behaves like Stable Diffusion where our methods need it to: the yardstick
for a model to test them on, printed for the model given and, beside it, for a reference (the bundled
one unless ``--reference`` names another).

    python -m benchmark.commands.fidelity [--weights FILE] [--reference FILE] [--parts a,b,c,d,e,f | --skip f]
        [--json] [--prompts-per-family 8] [--prompt-seed 0] [--seeds 8] [--steps 20] [--guidance 5]
        [--steer-families held_out,seen] [--window 0.3] [--scenes 64] [--timesteps 900,700,500]
        [--finetune-steps 400]

Every method we ship rests on one property of SD: cross-attention maps decide where things go
(Prompt-to-Prompt keeps a layout by injecting maps, DenseDiffusion places objects by modulating
attention, Separate-and-Enhance's ``to_k`` fine-tuning lifts two-object success 0.209 -> 0.410).
Each part asks it of the model in the way one of those methods uses it. Sampling is the engine's
loop (``ela_ext.diffusers_adapter.sample``, anchoring off), DDIM ``--steps``, guidance
``--guidance``, the steering families' first ``--prompts-per-family`` prompts (``--prompt-seed``)
with every seed of ``--seeds``. A layout is one vertical strip per entity (entity i of n: the i-th
strip of the image); the edits are ``benchmark.models.attention_edits``'s.

a. Steering through cross-attention only (all a change to ``to_k`` can do): each entity's columns
   (word and attributes) confined to its strip in every cross-attention layer, conditional rows,
   the first ``--window`` of the steps. *Layout followed*: every requested object found (drawn as
   its own component: ok, wrong colour or wrong shape, not merged or missing) with its centre
   inside its own strip; own maps -> forced.
b. The same layout through cross- and self-attention as DenseDiffusion steers (Kim et al. 2023):
   pre-softmax modulation in every cross-attention layer (entity columns) and every
   self-attention layer (pixels of one strip), the first ``--window`` of the steps; layout
   followed, own -> modulated.
c. Map injection as Prompt-to-Prompt: the conditional rows' cross-attention probabilities of
   every cross-attention layer are recorded while seed s samples (at the steps that are replayed)
   and replace those of seed s' (the next seed of ``--seeds``, cyclically; same prompt) for the
   first ``--window`` of the steps. *Same place*: every requested object found in both images and
   each one's centre within ``side / 8`` pixels (4 of 32) of its centre in seed s's image. The
   control is the same pair without replay: how often s' puts them there by itself.
d. Localisation that emerges: ``--scenes`` two- and three-object training scenes rendered,
   encoded with the model's latent, noised to each of ``--timesteps`` (of 1000; an MM-DiT's sigma
   is timestep / 1000, SD3's convention), one conditional pass; the maps of the engine's anchor
   layers (``ElaConfig().layers``; an MM-DiT's joint blocks ``ElaConfig().joint_blocks`` through the
   joint capture its sampler uses, ``BenchmarkModel.anchor_maps``) localised exactly as the engine
   does (``ela_ext.anchoring.localize_target``: Otsu, dominance, background removal). *IoU*: each
   entity's mask (upsampled) against its object's rendered mask, median / mean over entities,
   scenes and timesteps. *Own > other*: the entity word's mean attention inside its own object
   beats its mean inside every other object.
e. Bleeding with anchoring off, per family (held_out, seen, three, single): both correct and the
   failure kinds, ``benchmark.commands.effect``'s ``off`` setting on the same prompts and seeds.
f. Separate-and-Enhance's recipe at 1.0x: ``benchmark.commands.finetune`` with its defaults (the
   paper's ``to_k`` LoRA, noise inputs) for ``--finetune-steps`` on the model, then held_out both
   correct without -> with the LoRA merged (effect's ``--lora`` machinery). Minutes: ``--skip f``.

An MM-DiT (``benchmark.models.mmdit``) runs a-e, sampling by flow-matching Euler instead of DDIM
(the edits' t / T is the step's flow sigma); f fine-tunes a UNet's ``to_k`` (``UNET_ONLY``). Its text
enters through one softmax per joint block over image and text keys, and a-c edit every joint block
(``attention_edits.EditedJointAttention``): the image queries' text keys stand for the
cross-attention, their image keys for the self-attention, the text queries are left alone, and the
strips are cut on the image-token grid (64 tokens: 8x8). a: the entity columns' probability outside
their strip taken from the image rows, each row renormalised over all its keys (image keys take
their share). b: the modulation of the image rows' entity columns and of their image keys (pixels of
one strip), each part's score range its own. c: the maps recorded and replayed are the image rows'
text part renormalised over the text columns (the engine's joint maps), and a replayed map keeps
each row's own text mass: only where its text attention goes changes.

Figures are printed, never asserted: the tests check the parts' mechanics, not a model's scores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ela_ext.anchoring import localize_target
from ela_ext.config import ElaConfig
from ela_ext.diffusers_adapter import encode, prompt_targets
from ela_ext.localize import word_map
from ela_ext.lora_file import merged_lora

from ..judge.evaluate import MERGED, MISSING, WRONG_COLOUR, WRONG_SHAPE, Report, evaluate
from ..judge.families import family_prompts
from ..judge.metrics import centroid, mask_iou
from ..models.attention_edits import (AttentionEdit, DenseModulation, MapRecorder, MapReplay, StripConfinement,
                                      editable_layers, edited)
from ..models.model import BenchmarkModel, load_model
from ..models.scenes import Scene, parse_prompt, training_scene
from ..paths import BUNDLED_WEIGHTS
from . import finetune
from .effect import FOUND, parse_seeds, run_setting, summary

PARTS = ("a", "b", "c", "d", "e", "f")
# Parts that fine-tune a UNet's cross-attention (``attn2.to_k``); an MM-DiT has none: its text enters
# through joint attention, where f's LoRA would need the text keys ``add_k_proj``, not written yet.
UNET_ONLY = ("f",)
BLEEDING_FAMILIES = ("held_out", "seen", "three", "single")
FAILURES = (MISSING, WRONG_COLOUR, MERGED, WRONG_SHAPE)


@dataclass(frozen=True)
class Sizes:
    """How much each part samples (the command's options)."""

    prompts_per_family: int = 8
    prompt_seed: int = 0
    seeds: tuple[int, ...] = tuple(range(8))
    steps: int = 20
    guidance: float = 5.0
    steer_families: tuple[str, ...] = ("held_out", "seen")
    window: float = 0.3
    scenes: int = 64
    timesteps: tuple[int, ...] = (900, 700, 500)
    finetune_steps: int = 400

    def prompts(self, family: str) -> list[str]:
        return family_prompts(family, self.prompt_seed, self.prompts_per_family)


# --- the judgements --------------------------------------------------------------------------------

def found(report: Report) -> list[bool]:
    """Per requested object: drawn as its own component (ok, wrong colour or wrong shape; a merged
    blob or a missing object has no place of its own)."""
    return [status in FOUND for status in report.status]


def layout_followed(report: Report) -> bool:
    """Every requested object found, its centre inside its own strip (object i of n: the i-th)."""
    count = len(report.masks)
    for index, (mask, present) in enumerate(zip(report.masks, found(report))):
        if not present:
            return False
        centre = (np.nonzero(mask)[1].mean() + 0.5) / mask.shape[1]
        if not index / count <= centre < (index + 1) / count:
            return False
    return True


def same_place(reference: Report, other: Report) -> bool:
    """Every requested object found in both images, each centre within side / 8 pixels of the
    reference's."""
    tolerance = reference.masks[0].shape[0] / 8
    for a, b, both in zip(reference.masks, other.masks, np.logical_and(found(reference), found(other))):
        if not both:
            return False
        (y0, x0), (y1, x1) = centroid(a), centroid(b)
        if np.hypot(y0 - y1, x0 - x1) > tolerance:
            return False
    return True


def share(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


# --- a, b, c: steering while sampling ------------------------------------------------------------------

def sample_reports(model: BenchmarkModel, prompt: str, seeds: Sequence[int], edits: Sequence[AttentionEdit],
                   sizes: Sizes) -> list[Report]:
    """Plain sampling of ``prompt`` for ``seeds`` in one batch, ``edits`` on every editable layer (a
    UNet's attention layers, an MM-DiT's joint attention) and active for the first ``sizes.window`` of
    the steps; the evaluator's report per image."""
    total_time = model.scheduler_config["num_train_timesteps"]  # on_step gives DDIM's or the flow's timestep

    def on_step(step_index: int, timestep: Any) -> None:
        for edit in edits:
            edit.at_step(step_index, float(timestep) / total_time, step_index < sizes.window * sizes.steps)

    with edited(editable_layers(model.unet) if edits else [], edits):
        latents = model.sample([prompt] * len(seeds), ElaConfig(), seeds, num_steps=sizes.steps,
                               guidance_scale=sizes.guidance, on_step=on_step).latents
    objects = parse_prompt(prompt)
    return [evaluate(image, objects) for image in model.decode(latents)]


def steering(model: BenchmarkModel, sizes: Sizes, parts: Sequence[str]) -> dict[str, dict]:
    """Parts a, b and c over the steering families: per part, per family and pooled, the shares
    defined in the module's docstring. Seed s's own images serve a and b (own maps) and c (the
    recorded layout, and s' of the control)."""
    seeds = list(sizes.seeds)
    if "c" in parts and len(seeds) < 2:
        raise SystemExit("part c pairs seeds: give at least two")
    following = seeds[1:] + seeds[:1]  # c: image j samples seed j + 1 with seed j's maps
    flags: dict[str, dict[str, list[bool]]] = {key: {} for key in ("own", "a", "b", "replay", "control")}
    for family in sizes.steer_families:
        for store in flags.values():
            store[family] = []
        for prompt in sizes.prompts(family):
            targets = prompt_targets(model.tokenizer, [prompt] * len(seeds), [""] * len(seeds))
            recorder = MapRecorder(len(seeds))
            own = sample_reports(model, prompt, seeds, [recorder] if "c" in parts else [], sizes)
            flags["own"][family] += [layout_followed(report) for report in own]
            if "a" in parts:
                forced = sample_reports(model, prompt, seeds, [StripConfinement(targets)], sizes)
                flags["a"][family] += [layout_followed(report) for report in forced]
            if "b" in parts:
                modulated = sample_reports(model, prompt, seeds, [DenseModulation(targets)], sizes)
                flags["b"][family] += [layout_followed(report) for report in modulated]
            if "c" in parts:
                replayed = sample_reports(model, prompt, following, [MapReplay(recorder.maps, len(seeds))], sizes)
                flags["replay"][family] += [same_place(a, b) for a, b in zip(own, replayed)]
                flags["control"][family] += [same_place(a, own[(j + 1) % len(own)]) for j, a in enumerate(own)]

    def by_family(key: str) -> dict[str, float]:
        pooled = [flag for values in flags[key].values() for flag in values]
        return {**{family: share(values) for family, values in flags[key].items()}, "all": share(pooled)}

    results = {}
    for part, (before, after) in (("a", ("own", "a")), ("b", ("own", "b")), ("c", ("control", "replay"))):
        if part in parts:
            results[part] = {"before": by_family(before), "after": by_family(after),
                             "images": sum(len(values) for values in flags[after].values())}
    return results


# --- d: localisation on ground-truth scenes -----------------------------------------------------------

def localisation_scenes(count: int) -> list[Scene]:
    """The first ``count`` training scenes (seeds 0, 1, ...) with two or three objects."""
    scenes, seed = [], 0
    while len(scenes) < count:
        scene = training_scene(seed)
        if len(scene.objects) > 1:
            scenes.append(scene)
        seed += 1
    return scenes


def mean_inside(attention: torch.Tensor, mask: np.ndarray) -> float:
    """The map's mean over the object's pixels (its mask area-pooled to the map's size as weights)."""
    weights = F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], tuple(attention.shape)).squeeze()
    return float((attention * weights).sum() / weights.sum().clamp_min(1e-12))


@torch.no_grad()
def emerging_localisation(model: BenchmarkModel, sizes: Sizes) -> dict:
    """Part d: each entity's engine mask against its object's rendered mask, and own > other."""
    scenes = localisation_scenes(sizes.scenes)
    captions = [scene.caption for scene in scenes]
    targets = prompt_targets(model.tokenizer, captions, [""] * len(scenes))
    context = encode(model.tokenizer, model.text_encoder, captions)
    latents = model.encode(np.stack([scene.image for scene in scenes]))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    ious, own_wins = [], []
    for timestep in sizes.timesteps:
        maps = model.anchor_maps(model.add_noise(latents, noise, timestep), timestep, context)
        for scene, target, scene_maps in zip(scenes, targets, maps):
            localization = localize_target(scene_maps, target, ElaConfig().binarization)
            by_shape = {obj.shape: obj for obj in scene.objects}
            for index, entity in enumerate(target.entities):
                own = by_shape[entity.word]
                ious.append(mask_iou(localization.entity_masks[index].numpy(), own.mask))
                attention = word_map(scene_maps, entity.columns)
                own_mean = mean_inside(attention, own.mask)
                own_wins.append(all(own_mean > mean_inside(attention, obj.mask)
                                    for obj in scene.objects if obj is not own))
    return {"iou_median": float(np.median(ious)), "iou_mean": float(np.mean(ious)), "own_gt_other": share(own_wins),
            "entities": len(ious)}


# --- e, f: the effect benchmark's machinery ---------------------------------------------------------------

def off_rows(model: BenchmarkModel, sizes: Sizes, families: Sequence[str]) -> dict[str, dict]:
    """Effect's ``off`` row per family: both correct and the failure kinds."""
    rows = {}
    for family in families:
        prompts = sizes.prompts(family)
        result = run_setting(model, prompts, list(sizes.seeds), "off", ElaConfig(), sizes.steps, sizes.guidance)
        row = summary([result], prompts)[0]
        rows[family] = {key: row[key] for key in ("images", "both_correct", *FAILURES)}
    return rows


def separate_and_enhance(model: BenchmarkModel, sizes: Sizes, without: Optional[dict]) -> dict:
    """Part f: finetune's defaults for ``sizes.finetune_steps`` on ``model``'s weights (its log to
    stderr), then held_out both correct without the LoRA (``without``: part e's row, else sampled)
    and with it merged at 1.0."""
    with tempfile.TemporaryDirectory() as folder:
        lora = Path(folder) / "separate_enhance.safetensors"
        with contextlib.redirect_stdout(sys.stderr):
            finetune.main(["--weights", str(model.weights_path), "--steps", str(sizes.finetune_steps),
                           "--out", str(lora)])
        with merged_lora(model.unet, lora, 1.0):
            with_lora = off_rows(model, sizes, ["held_out"])["held_out"]
    without = without if without is not None else off_rows(model, sizes, ["held_out"])["held_out"]
    return {"without": without["both_correct"], "with": with_lora["both_correct"], "images": with_lora["images"]}


# --- the whole yardstick ------------------------------------------------------------------------------

def measure(model: BenchmarkModel, sizes: Sizes, parts: Sequence[str],
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """Every chosen part on one model: a dict keyed by part."""
    results: dict[str, Any] = {}
    if model.backbone != "unet":
        skipped = [part for part in parts if part in UNET_ONLY]
        if skipped:
            progress(f"{','.join(skipped)}: left out, it fine-tunes a UNet's cross-attention (an MM-DiT has none)")
        parts = [part for part in parts if part not in UNET_ONLY]
    if {"a", "b", "c"} & set(parts):
        progress("a-c: steering")
        results.update(steering(model, sizes, parts))
    if "d" in parts:
        progress("d: localisation on rendered scenes")
        results["d"] = emerging_localisation(model, sizes)
    if "e" in parts:
        progress("e: bleeding with anchoring off")
        results["e"] = off_rows(model, sizes, BLEEDING_FAMILIES)
    if "f" in parts:
        progress(f"f: Separate-and-Enhance's LoRA, {sizes.finetune_steps} steps")
        results["f"] = separate_and_enhance(model, sizes, results.get("e", {}).get("held_out"))
    return results


def _percent(value: float) -> str:
    return "-" if value != value else f"{value:.1%}"


def table_rows(results: dict) -> list[tuple[str, str]]:
    """(label, cell) per line of the table, in part order; a-c per steering family, then pooled."""
    rows = []
    for part, title in (("a", "a cross-attn forced: layout followed, own -> forced"),
                        ("b", "b DenseDiffusion: layout followed, own -> modulated"),
                        ("c", "c P2P replay: same place, control -> replayed")):
        if part in results:
            families = list(results[part]["before"])
            for family in families if len(families) > 2 else families[:1]:
                before, after = results[part]["before"][family], results[part]["after"][family]
                rows.append((f"{title} ({family})", f"{_percent(before)} -> {_percent(after)}"))
    if "d" in results:
        d = results["d"]
        rows.append(("d entity mask IoU median / mean; own > other",
                     f"{d['iou_median']:.2f} / {d['iou_mean']:.2f}; {_percent(d['own_gt_other'])}"))
    for family, row in results.get("e", {}).items():
        cell = " / ".join(f"{100 * row[key]:.1f}" for key in ("both_correct", *FAILURES))
        rows.append((f"e {family}: % ok / missing / wrong col / merged / wrong shp", cell))
    if "f" in results:
        rows.append(("f held_out both correct, without -> with S&E LoRA",
                     f"{_percent(results['f']['without'])} -> {_percent(results['f']['with'])}"))
    return rows


def print_table(given: dict, reference: dict, given_name: str, reference_name: str, out=None) -> None:
    """Rows a-f, columns: the model given, the reference (the bundled one unless named)."""
    out = out or sys.stdout
    left, right = table_rows(given), dict(table_rows(reference))
    label_width = max(len(label) for label, _ in left)
    width = max(len(given_name), len(reference_name), *(len(cell) for _, cell in left),
                *(len(cell) for cell in right.values()))
    print(f"{'part':{label_width}s}  {given_name:>{width}s}  {reference_name:>{width}s}", file=out)
    for label, cell in left:
        print(f"{label:{label_width}s}  {cell:>{width}s}  {right[label]:>{width}s}", file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Sizes()
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS, help="the model held against SD")
    parser.add_argument("--reference", type=Path, default=BUNDLED_WEIGHTS,
                        help="the model measured beside it (default: the bundled one)")
    parser.add_argument("--parts", default=",".join(PARTS), help="of a,b,c,d,e,f")
    parser.add_argument("--skip", default="", help="parts left out, e.g. f (minutes of training)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--prompts-per-family", type=int, default=defaults.prompts_per_family)
    parser.add_argument("--prompt-seed", type=int, default=defaults.prompt_seed, help="0: the reported sets")
    parser.add_argument("--seeds", default=str(len(defaults.seeds)), help="a count, a:b or a list (effect's)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--guidance", type=float, default=defaults.guidance)
    parser.add_argument("--steer-families", default=",".join(defaults.steer_families), help="families of a-c")
    parser.add_argument("--window", type=float, default=defaults.window, help="a-c: the steps steered, a fraction")
    parser.add_argument("--scenes", type=int, default=defaults.scenes, help="d: rendered scenes")
    parser.add_argument("--timesteps", default=",".join(map(str, defaults.timesteps)), help="d: noise levels")
    parser.add_argument("--finetune-steps", type=int, default=finetune.build_parser().get_default("steps"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    parts = [part for part in args.parts.split(",") if part and part not in args.skip.split(",")]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}: of {','.join(PARTS)}")
    sizes = Sizes(args.prompts_per_family, args.prompt_seed, tuple(parse_seeds(args.seeds)), args.steps,
                  args.guidance, tuple(args.steer_families.split(",")), args.window, args.scenes,
                  tuple(int(t) for t in args.timesteps.split(",")), args.finetune_steps)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    progress(f"model {args.weights}")
    given = measure(load_model(args.weights), sizes, parts, progress)
    same = args.weights.resolve() == args.reference.resolve()
    if not same:
        progress(f"reference {args.reference}")
    reference = given if same else measure(load_model(args.reference), sizes, parts, progress)
    if args.json:
        print(json.dumps({"weights": str(args.weights), "reference": str(args.reference), "sizes": asdict(sizes),
                          "parts": parts, "model": given, "reference_model": reference}, indent=2))
        return
    print(f"{len(sizes.seeds)} seeds; a-c: {','.join(sizes.steer_families)}, e: {','.join(BLEEDING_FAMILIES)}, "
          f"{sizes.prompts_per_family} prompts each (prompt seed {sizes.prompt_seed}); DDIM {sizes.steps} steps, "
          f"guidance {sizes.guidance}, window {sizes.window}; d: {sizes.scenes} scenes at t = "
          f"{','.join(map(str, sizes.timesteps))}; f: {sizes.finetune_steps} training steps")
    reference_name = "bundled" if args.reference.resolve() == BUNDLED_WEIGHTS.resolve() else args.reference.stem
    print_table(given, reference, args.weights.stem if not same else f"{reference_name} (given)", reference_name)


if __name__ == "__main__":
    main()
