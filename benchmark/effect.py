"""What anchoring fixes on the bundled model: the same prompts and seeds with ELA off, on, and a
random-direction control, judged by the exact evaluator.

    python -m benchmark.effect [--prompts benchmark/prompts/test_prompts.txt] [--seeds 64 | 0,1,2]
                               [--json] [--settings off,ela,random] [--workers 2]
                               [engine settings, e.g. --lambda 0.3]

Sampling goes through ``ela_ext.diffusers_adapter.sample``, the engine the WebUI script uses. Each
setting sees the same initial noise per (prompt, seed), so results are paired: ``fixed`` counts
images that fail off and are correct with the setting, ``broken`` the reverse. The random control
takes steps of the same size as ELA's in random directions: an effect ELA has and the control does
not is the objective's, not the push's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from ela_ext.config import ElaConfig, replace
from ela_ext.diffusers_adapter import sample

from .evaluate import MERGED, MISSING, OK, WRONG_COLOUR, WRONG_SHAPE, evaluate
from .model import decode, initial_noise, load_model
from .scenes import parse_prompt

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = HERE / "weights" / "model.safetensors"
DEFAULT_PROMPTS = HERE / "prompts" / "test_prompts.txt"
SETTINGS = ("off", "ela", "random")
FAILURES = (MISSING, WRONG_COLOUR, MERGED, WRONG_SHAPE)
# Engine settings a run may override, as (flag, ElaConfig field, type).
OVERRIDES = (("--lambda", "lambda_weight", float), ("--window-start", "window_start", float),
             ("--window-end", "window_end", float), ("--iterations", "max_iterations", int),
             ("--threshold", "loss_threshold", float), ("--step-size", "step_size", float),
             ("--objective", "objective", str), ("--layers", "layers", str),
             ("--binarization", "binarization", str))


@dataclass
class SettingResult:
    """Per image (in prompt-major, seed-minor order): the evaluator's status per requested object."""

    name: str
    statuses: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0

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


def run_prompt(model: tuple, prompt_index: int, prompt: str, seeds: Sequence[int], setting: str,
               config: ElaConfig, steps: int, guidance: float) -> tuple[list[list[str]], float]:
    """One prompt for all seeds in one batch: the evaluator's statuses per image, and the seconds
    sampling took. The random control's directions are seeded by the prompt's index."""
    from diffusers import DDIMScheduler

    unet, text_encoder, tokenizer, scheduler_config = model
    options = ({"direction": "random", "generator": torch.Generator().manual_seed(prompt_index)}
               if setting == "random" else None)
    start = time.perf_counter()
    latents = sample(unet, text_encoder, tokenizer, DDIMScheduler(**scheduler_config), [prompt] * len(seeds),
                     replace(config, enabled=setting != "off"), initial_noise(seeds), num_steps=steps,
                     guidance_scale=guidance, loop_options=options).latents
    seconds = time.perf_counter() - start
    objects = parse_prompt(prompt)
    return [evaluate(image, objects).status for image in decode(latents)], seconds


_worker_model: Optional[tuple] = None


def _load_worker_model(weights: Path) -> None:
    global _worker_model
    torch.set_num_threads(1)
    _worker_model = load_model(weights)


def _run_prompt_in_worker(job: tuple) -> tuple[list[list[str]], float]:
    return run_prompt(_worker_model, *job)


def worker_pool(weights: Path, workers: int) -> ProcessPoolExecutor:
    """Processes that each load the model once and sample whole prompts on one thread (this machine
    has one core per worker; two threads per process against a busy core are far slower)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_load_worker_model, initargs=(weights,))


@contextmanager
def sampling_backend(weights: Path, workers: int) -> Iterator[tuple[Optional[tuple], Optional[ProcessPoolExecutor]]]:
    """``(model, None)`` loaded in this process for one worker, else ``(None, pool)`` of ``workers``
    processes, shut down on exit: the two arguments ``run_setting`` takes."""
    if workers <= 1:
        yield load_model(weights), None
    else:
        with worker_pool(weights, workers) as pool:
            yield None, pool


def run_setting(model: Optional[tuple], prompts: Sequence[str], seeds: Sequence[int], setting: str,
                config: ElaConfig, steps: int, guidance: float,
                pool: Optional[ProcessPoolExecutor] = None) -> SettingResult:
    """Sample every prompt for all seeds and evaluate each image, in this process with ``model`` or
    prompt by prompt in ``pool``. Results come in prompt order either way, and ``seconds`` sums the
    sampling time of each prompt, so seconds per image do not depend on the number of workers."""
    jobs = [(index, prompt, list(seeds), setting, config, steps, guidance) for index, prompt in enumerate(prompts)]
    outputs = pool.map(_run_prompt_in_worker, jobs) if pool is not None else (run_prompt(model, *job) for job in jobs)
    result = SettingResult(setting)
    for statuses, seconds in outputs:
        result.statuses.extend(statuses)
        result.seconds += seconds
    return result


def paired(off: SettingResult, other: SettingResult) -> tuple[int, int]:
    """(fixed, broken): images wrong off and right with ``other``, and the reverse."""
    fixed = sum(not a and b for a, b in zip(off.correct, other.correct))
    broken = sum(a and not b for a, b in zip(off.correct, other.correct))
    return fixed, broken


def summary(results: list[SettingResult]) -> list[dict]:
    off = next((r for r in results if r.name == "off"), None)
    rows = []
    for result in results:
        n = len(result.statuses)
        row = {"setting": result.name, "images": n, "both_correct": result.rate(OK), "apart": result.apart_rate(),
               **{kind: result.rate(kind) for kind in FAILURES}, "seconds_per_image": result.seconds / n}
        if off is not None and result is not off:
            row["time_vs_off"] = result.seconds / off.seconds
            row["fixed"], row["broken"] = paired(off, result)
        rows.append(row)
    return rows


def print_table(rows: list[dict], out=sys.stdout) -> None:
    header = (f"{'setting':8s} {'images':>6s} {'both ok':>8s} {'apart':>6s} {'missing':>8s} {'wrong col':>9s} "
              f"{'merged':>7s} {'wrong shp':>9s} {'s/image':>8s} {'time/off':>8s} {'fixed':>6s} {'broken':>6s}")
    print(header, file=out)
    for row in rows:
        extra = (f"{row['time_vs_off']:7.2f}x {row['fixed']:6d} {row['broken']:6d}"
                 if "time_vs_off" in row else f"{'':8s} {'':6s} {'':6s}")
        print(f"{row['setting']:8s} {row['images']:6d} {row['both_correct']:8.1%} {row['apart']:6.1%} "
              f"{row[MISSING]:8.1%} {row[WRONG_COLOUR]:9.1%} {row[MERGED]:7.1%} {row[WRONG_SHAPE]:9.1%} "
              f"{row['seconds_per_image']:8.3f} {extra}", file=out)


def parse_seeds(text: str) -> list[int]:
    """``64`` -> 0..63; ``3,7,11`` -> those seeds."""
    return [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))


def config_from_args(args: argparse.Namespace) -> ElaConfig:
    changes = {name: getattr(args, name) for _, name, _ in OVERRIDES if getattr(args, name) is not None}
    return replace(ElaConfig(), **changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="one prompt per line")
    parser.add_argument("--limit-prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--seeds", default="64", help="a count (0..N-1) or a comma-separated list")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="of off, ela, random")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--workers", type=int, default=1, help="processes sampling prompts side by side, "
                        "one thread each (at most one per free core)")
    for flag, name, kind in OVERRIDES:
        parser.add_argument(flag, dest=name, type=kind, default=None, help=f"ElaConfig.{name}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    prompts = prompts[:args.limit_prompts] if args.limit_prompts else prompts
    seeds = parse_seeds(args.seeds)
    config = config_from_args(args)
    with sampling_backend(args.weights, args.workers) as (model, pool):
        results = [run_setting(model, prompts, seeds, setting, config, args.steps, args.guidance, pool)
                   for setting in args.settings.split(",")]
    rows = summary(results)
    if args.json:
        print(json.dumps({"config": config.to_infotext(), "prompts": len(prompts), "seeds": len(seeds),
                          "steps": args.steps, "guidance": args.guidance, "rows": rows}, indent=2))
    else:
        print(f"{len(prompts)} prompts x {len(seeds)} seeds, DDIM {args.steps} steps, guidance {args.guidance}; "
              f"ELA {config.to_infotext()}")
        print_table(rows)


if __name__ == "__main__":
    main()
