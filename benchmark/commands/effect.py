"""What anchoring fixes on the bundled model: the same prompts and seeds with anchoring off, with
each objective, and with a random-direction control, judged by the exact evaluator.

    python -m benchmark.commands.effect [--families held_out,seen,three[,single]] [--prompts-per-family 16]
                                        [--prompt-seed 0] [--seeds 16 | 0,1,2] [--prompts FILE]
                                        [--settings off,default,random,ela,attend_excite,...]
                                        [--json] [--workers 2] [--cache runs/effect]
                                        [--lora FILE [--lora-strength 1.0] [--plain-off]]
                                        [engine settings, e.g. --lambda 0.3]

Settings: ``off``; ``default`` (the engine's config, with any overrides given); ``random`` (that
config, but each update in a random direction); or an objective's name (the config with that
objective). Sampling goes through ``ela_ext.diffusers_adapter.sample``, the engine the WebUI script
uses. Each setting sees the same initial noise per (prompt, seed), so results are paired: ``fixed``
counts images wrong off and right with the setting, ``broken`` the reverse, ``kept`` the share of
images right off that stay right. ``moved`` is the mean pixel change against the off image and
``shift`` how far found objects' centres moved (pixels); ``IoU`` is the entity masks' overlap with
the objects found in the final image at the first and the last anchored step; ``clean`` the share of
found objects drawn in one colour (``benchmark.judge.metrics``: ground-truth renders score 100%), judged
again from the kept images when the table is made, so cached results need no new field.
The random control takes updates of the same size in random directions: an effect a
setting has and the control does not is the objective's, not the push's. ``--prompt-seed`` other
than 0 draws prompts disjoint from ``prompts/`` (``benchmark.judge.families``): choose settings there.
A prompt the engine cannot anchor (one entity: the ``single`` family) is sampled plain in every
setting, as the WebUI leaves such an image unanchored; its table's ``both ok`` is single-object
accuracy, and the pooled table (``all``) pools the two- and three-object families only.
``--lora`` merges a LoRA file (kohya format, the file the WebUI loads; ``ela_ext.lora_file``) into
the model's weights for every setting, ``off`` included: the fine-tuned model is the one measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import pickle
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ela_ext.config import OBJECTIVE_NAMES, ElaConfig, replace
from ela_ext.diffusers_adapter import prompt_targets
from ela_ext.entities import EntitySpecError
from ela_ext.lora_file import merged_lora

from ..judge.evaluate import MERGED, MISSING, OK, WRONG_COLOUR, WRONG_SHAPE, evaluate
from ..judge.families import FAMILIES, FILES, SINGLE, family_prompts
from ..judge.metrics import (Centroid, centroid, centroid_shifts, clean_objects, kept_rate, localisation_iou,
                             pixel_change)
from ..models.model import BenchmarkModel, load_model
from ..models.scenes import parse_prompt
from ..paths import BUNDLED_WEIGHTS

SETTINGS = ("off", "default", "random")
FAILURES = (MISSING, WRONG_COLOUR, MERGED, WRONG_SHAPE)
FOUND = (OK, WRONG_COLOUR, WRONG_SHAPE)  # statuses of an object drawn as its own component
# Engine settings a run may override, as (flag, ElaConfig field, type).
OVERRIDES = (("--lambda", "lambda_weight", float), ("--window-start", "window_start", float),
             ("--window-end", "window_end", float), ("--iterations", "max_iterations", int),
             ("--threshold", "loss_threshold", float), ("--step-size", "step_size", float),
             ("--objective", "objective", str), ("--layers", "layers", str),
             ("--binarization", "binarization", str), ("--joint-blocks", "joint_blocks", str))


@dataclass
class SettingResult:
    """Per image (prompt-major, seed-minor): the evaluator's status per requested object, the
    image, each found object's centre (None otherwise) and the localisation IoU at each anchored
    step (None where no requested object was found)."""

    name: str
    statuses: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0
    images: list[np.ndarray] = field(default_factory=list)
    centroids: list[list[Centroid]] = field(default_factory=list)
    ious: list[list[Optional[float]]] = field(default_factory=list)

    def rate(self, kind: str) -> float:
        if kind == OK:
            return sum(all(s == OK for s in image) for image in self.statuses) / len(self.statuses)
        return sum(kind in image for image in self.statuses) / len(self.statuses)

    def apart_rate(self) -> float:
        """Images where every requested object is found as its own component (none missing or
        merged), whatever its colour and shape: the separation ELA's masks ask for."""
        return sum(not ({MISSING, MERGED} & set(image)) for image in self.statuses) / len(self.statuses)

    @property
    def correct(self) -> list[bool]:
        return [all(s == OK for s in image) for image in self.statuses]

    def mean_iou(self, step: int) -> Optional[float]:
        """Mean localisation IoU at anchored step ``step`` (0 first, -1 last) over scored images."""
        values = [ious[step] for ious in self.ious if ious and ious[step] is not None]
        return float(np.mean(values)) if values else None

    def extend(self, other: "SettingResult") -> None:
        for name in ("statuses", "images", "centroids", "ious"):
            getattr(self, name).extend(getattr(other, name))
        self.seconds += other.seconds


def setting_config(setting: str, config: ElaConfig) -> tuple[ElaConfig, Optional[str]]:
    """The engine config a setting runs and its update direction (None when off)."""
    if setting == "off":
        return replace(config, enabled=False), None
    if setting in ("default", "random"):
        return replace(config, enabled=True), "random" if setting == "random" else "gradient"
    if setting in OBJECTIVE_NAMES:
        return replace(config, enabled=True, objective=setting), "gradient"
    raise ValueError(f"unknown setting {setting!r}: off, default, random or one of {', '.join(OBJECTIVE_NAMES)}")


def anchorable(tokenizer: Any, prompt: str, config: ElaConfig) -> bool:
    """Whether the engine can anchor ``prompt`` with ``config``'s entities (ELA needs two)."""
    try:
        prompt_targets(tokenizer, [prompt], [config.entities])
    except EntitySpecError:
        return False
    return True


def run_prompt(model: BenchmarkModel, prompt_index: int, prompt: str, seeds: Sequence[int], setting: str,
               config: ElaConfig, steps: int, guidance: float) -> SettingResult:
    """One prompt for all seeds in one batch, judged image by image; ``seconds`` is the sampling
    time. The random control's directions are seeded by the prompt's index. A prompt the engine
    cannot anchor is sampled plain, as the WebUI does after its warning."""
    run_config, direction = setting_config(setting, config)
    if direction is not None and not anchorable(model.tokenizer, prompt, run_config):
        run_config, direction = replace(run_config, enabled=False), None
    options = ({"direction": "random", "generator": torch.Generator().manual_seed(prompt_index)}
               if direction == "random" else None)
    start = time.perf_counter()
    sampled = model.sample([prompt] * len(seeds), run_config, seeds, num_steps=steps, guidance_scale=guidance,
                           loop_options=options)
    result = SettingResult(setting, seconds=time.perf_counter() - start)
    objects = parse_prompt(prompt)
    anchored = sampled.session.steps if sampled.session is not None else []
    for row, image in enumerate(model.decode(sampled.latents)):
        report = evaluate(image, objects)
        result.statuses.append(report.status)
        result.images.append(image)
        result.centroids.append([centroid(mask) if status in FOUND else None
                                 for mask, status in zip(report.masks, report.status)])
        result.ious.append([localisation_iou(log.localizations[row].entity_masks.numpy(), report.masks)
                            for log in anchored])
    return result


@dataclass(frozen=True)
class Lora:
    """A LoRA file merged into the model for every setting, at ``strength``."""

    path: Path
    strength: float = 1.0

    def key(self) -> tuple[str, float]:
        """What the images depend on: the file's content (not its name) and the strength."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest(), self.strength


def load_with_lora(weights: Path, lora: Optional[Lora], stack: ExitStack) -> BenchmarkModel:
    """The model in ``weights``, with ``lora`` merged into its weights while ``stack`` is open."""
    model = load_model(weights)
    if lora is not None:
        stack.enter_context(merged_lora(model.unet, lora.path, lora.strength))
    return model


_worker_model: Optional[BenchmarkModel] = None
_worker_stack = ExitStack()  # a worker's LoRA stays merged for the process's life


def _load_worker_model(weights: Path, lora: Optional[Lora]) -> None:
    global _worker_model
    torch.set_num_threads(1)
    _worker_model = load_with_lora(weights, lora, _worker_stack)


def _run_prompt_in_worker(job: tuple) -> SettingResult:
    return run_prompt(_worker_model, *job)


def worker_pool(weights: Path, workers: int, lora: Optional[Lora] = None) -> ProcessPoolExecutor:
    """Processes that each load the model once and sample whole prompts on one thread (this machine
    has one core per worker; two threads per process against a busy core are far slower)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_load_worker_model, initargs=(weights, lora))


@contextmanager
def sampling_backend(weights: Path, workers: int, lora: Optional[Lora] = None
                     ) -> Iterator[tuple[Optional[BenchmarkModel], Optional[ProcessPoolExecutor]]]:
    """``(model, None)`` loaded in this process for one worker, else ``(None, pool)`` of ``workers``
    processes, shut down on exit: the two arguments ``run_setting`` takes; ``lora`` merged in either."""
    if workers <= 1:
        with ExitStack() as stack:
            yield load_with_lora(weights, lora, stack), None
    else:
        with worker_pool(weights, workers, lora) as pool:
            yield None, pool


def run_setting(model: Optional[BenchmarkModel], prompts: Sequence[str], seeds: Sequence[int], setting: str,
                config: ElaConfig, steps: int, guidance: float,
                pool: Optional[ProcessPoolExecutor] = None) -> SettingResult:
    """Sample every prompt for all seeds and evaluate each image, in this process with ``model`` or
    prompt by prompt in ``pool``. Results come in prompt order either way, and ``seconds`` sums the
    sampling time of each prompt, so seconds per image do not depend on the number of workers."""
    jobs = [(index, prompt, list(seeds), setting, config, steps, guidance) for index, prompt in enumerate(prompts)]
    return run_jobs(model, jobs, setting, pool)


def run_jobs(model: Optional[BenchmarkModel], jobs: Sequence[tuple], setting: str,
             pool: Optional[ProcessPoolExecutor] = None) -> SettingResult:
    """``run_prompt``'s argument tuples (after the model), here or in ``pool``, pooled in order."""
    outputs = pool.map(_run_prompt_in_worker, jobs) if pool is not None else (run_prompt(model, *job) for job in jobs)
    result = SettingResult(setting)
    for output in outputs:
        result.extend(output)
    return result


def run_key(prompts: Sequence[str], seeds: Sequence[int], setting: str, config: ElaConfig, steps: int,
            guidance: float, weights: Path, lora: Optional[Lora] = None) -> tuple:
    """What a setting's images depend on: off does not depend on the engine's settings at all; a
    LoRA adds its content hash and strength (without one the key is what it always was)."""
    run_config, direction = setting_config(setting, config)
    settings = run_config.to_infotext() if direction else ""
    key = (list(prompts), list(seeds), setting, settings, steps, guidance, str(weights))
    return key if lora is None else key + (lora.key(),)


def cached_run_setting(cache: Optional[Path], key: tuple, run) -> SettingResult:
    """``run()``, or its pickled result from an earlier run with the same ``key`` (prompts, seeds,
    setting, config, steps, guidance, weights): a long table resumes where it stopped."""
    if cache is None:
        return run()
    path = cache / (hashlib.sha1(repr(key).encode()).hexdigest()[:16] + ".pkl")
    if path.exists():
        return SettingResult(**pickle.loads(path.read_bytes()))
    result = run()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(dataclasses.asdict(result)))  # plain data: loads from any entry point
    return result


def paired(off: SettingResult, other: SettingResult) -> tuple[int, int]:
    """(fixed, broken): images wrong off and right with ``other``, and the reverse."""
    fixed = sum(not a and b for a, b in zip(off.correct, other.correct))
    broken = sum(a and not b for a, b in zip(off.correct, other.correct))
    return fixed, broken


def clean_share(result: SettingResult, prompts: Sequence[str]) -> Optional[float]:
    """Share of the objects found as their own component that are drawn clean
    (``metrics.clean_objects``), judged again from the images (prompt-major: image i answers
    ``prompts[i // seeds]``); None without images or without a found object."""
    if not result.images:
        return None
    per_prompt = len(result.images) // len(prompts)
    flags = [flag for index, image in enumerate(result.images)
             for flag in clean_objects(image, evaluate(image, parse_prompt(prompts[index // per_prompt])))
             if flag is not None]
    return sum(flags) / len(flags) if flags else None


def summary(results: list[SettingResult], prompts: Sequence[str]) -> list[dict]:
    """One row per setting; ``prompts`` are the ones every result sampled, in order."""
    off = next((r for r in results if r.name == "off"), None)
    rows = []
    for result in results:
        n = len(result.statuses)
        row = {"setting": result.name, "images": n, "both_correct": result.rate(OK), "apart": result.apart_rate(),
               **{kind: result.rate(kind) for kind in FAILURES}, "clean": clean_share(result, prompts),
               "seconds_per_image": result.seconds / n, "iou_first": result.mean_iou(0),
               "iou_last": result.mean_iou(-1)}
        if off is not None and result is not off:
            row["time_vs_off"] = result.seconds / off.seconds
            row["fixed"], row["broken"] = paired(off, result)
            row["kept"] = kept_rate(off.correct, result.correct)
            if off.images and result.images:
                row["pixel_change"] = float(np.mean([pixel_change(a, b) for a, b in zip(off.images, result.images)]))
                shifts = [d for a, b in zip(off.centroids, result.centroids) for d in centroid_shifts(a, b)]
                row["centroid_shift"] = float(np.mean(shifts)) if shifts else None
        rows.append(row)
    return rows


def _cell(value: Optional[float], spec: str, width: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}{spec}}"


def print_table(rows: list[dict], out=sys.stdout) -> None:
    header = (f"{'setting':16s} {'images':>6s} {'both ok':>8s} {'kept':>6s} {'apart':>6s} {'missing':>8s} "
              f"{'wrong col':>9s} {'merged':>7s} {'wrong shp':>9s} {'clean':>6s} {'moved':>6s} {'shift':>5s} {'IoU 1st':>7s} "
              f"{'IoU end':>7s} {'s/image':>8s} {'time/off':>8s} {'fixed':>6s} {'broken':>6s}")
    print(header, file=out)
    for row in rows:
        paired_cells = (f"{row['time_vs_off']:7.2f}x {row['fixed']:6d} {row['broken']:6d}"
                        if "time_vs_off" in row else f"{'':8s} {'':6s} {'':6s}")
        print(f"{row['setting']:16s} {row['images']:6d} {row['both_correct']:8.1%} {_cell(row.get('kept'), '.0%', 6)} "
              f"{row['apart']:6.1%} {row[MISSING]:8.1%} {row[WRONG_COLOUR]:9.1%} {row[MERGED]:7.1%} "
              f"{row[WRONG_SHAPE]:9.1%} {_cell(row['clean'], '.1%', 6)} {_cell(row.get('pixel_change'), '.1%', 6)} "
              f"{_cell(row.get('centroid_shift'), '.1f', 5)} {_cell(row['iou_first'], '.2f', 7)} "
              f"{_cell(row['iou_last'], '.2f', 7)} {row['seconds_per_image']:8.3f} {paired_cells}", file=out)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_markdown(rows: list[dict], out=sys.stdout) -> None:
    """The README's comparison table: one row per setting, paired columns against off."""
    print("| setting | both correct | kept | missing | merged | wrong colour | wrong shape | clean | moved (pixels / "
          "centre shift) | mask IoU first -> last step | time vs off | fixed / broken |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    for row in rows:
        paired_row = "time_vs_off" in row
        moved = (f"{_percent(row.get('pixel_change'))} / "
                 f"{'-' if row.get('centroid_shift') is None else format(row['centroid_shift'], '.1f')} px")
        iou = ("-" if row["iou_first"] is None
               else f"{row['iou_first']:.2f} -> {row['iou_last']:.2f}")
        print(f"| {row['setting']} | {row['both_correct']:.1%} | {_percent(row.get('kept'))} | {row[MISSING]:.1%} | "
              f"{row[MERGED]:.1%} | {row[WRONG_COLOUR]:.1%} | {row[WRONG_SHAPE]:.1%} | {_percent(row['clean'])} | "
              f"{moved if paired_row else '-'} | {iou} | "
              f"{format(row['time_vs_off'], '.2f') + 'x' if paired_row else '1x'} | "
              f"{str(row['fixed']) + ' / ' + str(row['broken']) if paired_row else '-'} |", file=out)


def parse_seeds(text: str) -> list[int]:
    """``64`` -> 0..63; ``100:116`` -> 100..115; ``3,7,11`` -> those seeds."""
    if ":" in text:
        start, stop = text.split(":")
        return list(range(int(start), int(stop)))
    return [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))


def config_from_args(args: argparse.Namespace) -> ElaConfig:
    changes = {name: getattr(args, name) for _, name, _ in OVERRIDES if getattr(args, name) is not None}
    return replace(ElaConfig(), **changes)


def prompt_sets(args: argparse.Namespace) -> dict[str, list[str]]:
    """Family name -> prompts; one set named after the file when ``--prompts`` is given."""
    if args.prompts is not None:
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        return {args.prompts.stem: prompts[:args.prompts_per_family]}
    return {family: family_prompts(family, args.prompt_seed, args.prompts_per_family)
            for family in args.families.split(",")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"of {', '.join(FILES)}")
    parser.add_argument("--prompts-per-family", type=int, default=16, help="the first N of each family")
    parser.add_argument("--prompt-seed", type=int, default=0, help="0: the sets in prompts/; "
                        "else fresh prompts disjoint from them (a development set)")
    parser.add_argument("--prompts", type=Path, default=None, help="a file of prompts instead of the families")
    parser.add_argument("--seeds", default="16", help="a count (0..N-1) or a comma-separated list")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="of off, default, random and the objective names")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown (the README's)")
    parser.add_argument("--cache", type=Path, default=None, help="folder keeping each finished setting "
                        "(a rerun resumes); not used when absent")
    parser.add_argument("--workers", type=int, default=1, help="processes sampling prompts side by side, "
                        "one thread each (at most one per free core)")
    parser.add_argument("--lora", type=Path, default=None, help="a LoRA file (kohya format) merged into the "
                        "model for every setting, off included")
    parser.add_argument("--lora-strength", type=float, default=1.0, help="the LoRA's multiplier (<lora:name:S>)")
    parser.add_argument("--plain-off", action="store_true", help="with --lora: add the model without it, "
                        "anchoring off, as the row every LoRA row (named 'lora SETTING') is paired with")
    for flag, name, kind in OVERRIDES:
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"ElaConfig.{name}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    config = config_from_args(args)
    settings = args.settings.split(",")
    for setting in settings:
        setting_config(setting, config)  # an unknown setting fails before any sampling
    sets = prompt_sets(args)
    lora = Lora(args.lora, args.lora_strength) if args.lora is not None else None
    results: dict[str, dict[str, SettingResult]] = {family: {} for family in sets}
    if args.plain_off and lora is not None:
        # the model without the LoRA, anchoring off: every LoRA row below is paired with it
        with sampling_backend(args.weights, args.workers) as (model, pool):
            for family, prompts in sets.items():
                key = run_key(prompts, seeds, "off", config, args.steps, args.guidance, args.weights)
                results[family]["off"] = cached_run_setting(args.cache, key, lambda: run_setting(
                    model, prompts, seeds, "off", config, args.steps, args.guidance, pool))
    with sampling_backend(args.weights, args.workers, lora) as (model, pool):
        for setting in settings:  # setting-major: a stopped run has whole settings over every family
            for family, prompts in sets.items():
                key = run_key(prompts, seeds, setting, config, args.steps, args.guidance, args.weights, lora)
                result = cached_run_setting(args.cache, key, lambda: run_setting(
                    model, prompts, seeds, setting, config, args.steps, args.guidance, pool))
                if args.plain_off and lora is not None:
                    result.name = f"lora {setting}"
                results[family][result.name] = result
    settings = list(results[next(iter(sets))])
    tables = {family: summary(list(by_setting.values()), sets[family]) for family, by_setting in results.items()}
    multi = [family for family in sets if family != SINGLE]  # "both correct" means the same in each
    pooled = {setting: SettingResult(setting) for setting in settings}
    for family in multi:
        for setting, result in results[family].items():
            pooled[setting].extend(result)
    if not args.json:
        for family, prompts in sets.items():
            note = " (one object: both ok = the object right; never anchored)" if family == SINGLE else ""
            print(f"\n{family}: {len(prompts)} prompts x {len(seeds)} seeds{note}")
            (print_markdown if args.markdown else print_table)(tables[family])
    if len(multi) > 1:
        tables["all"] = summary(list(pooled.values()), [p for family in multi for p in sets[family]])
    if args.json:
        print(json.dumps({"config": config.to_infotext(), "families": {f: len(p) for f, p in sets.items()},
                          "seeds": len(seeds), "steps": args.steps, "guidance": args.guidance, "tables": tables,
                          **({} if lora is None else {"lora": {"file": str(lora.path), "sha256": lora.key()[0],
                                                              "strength": lora.strength}})},
                         indent=2))
    else:
        print(f"\nDDIM {args.steps} steps, guidance {args.guidance}; ELA {config.to_infotext()}")
        if lora is not None:
            print(f"LoRA {lora.path} (sha256 {lora.key()[0][:12]}) at strength {lora.strength}, every setting")
        if "all" in tables:
            print(f"pooled ({', '.join(multi)}): {sum(len(sets[f]) for f in multi)} prompts x {len(seeds)} seeds")
            (print_markdown if args.markdown else print_table)(tables["all"])


if __name__ == "__main__":
    main()
