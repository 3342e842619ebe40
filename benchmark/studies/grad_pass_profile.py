"""Where one ELA grad pass spends its time, on SD 1.5's or SDXL's UNet layout (random weights).

    python -m benchmark.studies.grad_pass_profile --layout sd15 --latent 16 [--passes 5] [--device cpu]

Runs the engine's own loop (``anchor_latent`` inside ``AttentionCapture``, exactly as a session
does) at the first sampling step with the threshold at 0, so every pass updates, and times its
parts by wrapping the functions it calls: the truncated forward (with the map recomputation in
the capture's pre-hooks, also timed on its own), localisation (once per anchored step), the
objective, the backward to the latent, and the rest of the loop (checks, the step, host syncs).
For scale it also times a plain no-grad forward of one row and the guided forward (cond + uncond)
that every sampling step pays. ``--weights-frozen`` repeats the loop with every weight's
``requires_grad`` off, to measure what gradients for weights would cost.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch

from benchmark.commands.real_scale import ENTITIES, PROMPT, build_unet, in_forked_child, sdxl_added_cond
from ela_ext import anchoring, capture
from ela_ext.anchoring import SamplerSpace, anchor_latent
from ela_ext.capture import AttentionCapture, find_cross_attention_layers, run_truncated
from ela_ext.config import ElaConfig, replace
from ela_ext.diffusers_adapter import prompt_targets


class Timers:
    """Seconds per named part, summed over calls: CPU seconds of this one-thread process on CPU
    (other work on a shared machine does not count), synchronised wall time on CUDA."""

    def __init__(self, device: str):
        self.device = device
        self._clock = time.perf_counter if device == "cuda" else time.process_time
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            start = self._clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[name] += self._clock() - start
                self.calls[name] += 1
        return timed

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


@contextlib.contextmanager
def patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def frozen_weights(unet: torch.nn.Module) -> Iterator[None]:
    flags = [(parameter, parameter.requires_grad) for parameter in unet.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def profile_loop(unet: torch.nn.Module, forward: Callable[[torch.Tensor], Any], latent: torch.Tensor,
                 space: SamplerSpace, targets: list, config: ElaConfig, device: str) -> dict[str, float]:
    """Seconds per grad pass of each part of ``anchor_latent`` (localisation: per anchored step)."""
    timers = Timers(device)
    config = config.for_denoiser(joint=False)
    layers = [module for _, module in find_cross_attention_layers(unet, config.layers)]
    objective = anchoring.OBJECTIVES[config.objective]
    timed = {(capture, "attention_probs"): "map recomputation", (anchoring, "localize_target"): "localisation",
             (anchoring, "objective_input"): "objective"}
    with contextlib.ExitStack() as stack:
        for (owner, name), part in timed.items():
            stack.enter_context(patched(owner, name, timers.wrap(part, getattr(owner, name))))
        stack.enter_context(patched(anchoring, "OBJECTIVES", {config.objective: timers.wrap("objective", objective)}))
        stack.enter_context(patched(torch.autograd, "grad", timers.wrap("backward", torch.autograd.grad)))
        cap = stack.enter_context(AttentionCapture(layers, tuple(latent.shape[-2:]), stop_after_last=True))
        truncated = timers.wrap("truncated forward", lambda x: run_truncated(cap, lambda: forward(x)))
        whole = timers.wrap("whole loop", anchor_latent)
        result = whole(latent, space, truncated, targets, config)
    passes = len(result.losses)
    parts = {name: seconds / passes for name, seconds in timers.seconds.items()}
    parts["rest of loop"] = parts["whole loop"] - sum(
        seconds for name, seconds in parts.items() if name not in ("whole loop", "map recomputation"))
    return parts


def saved_for_backward_mib(unet: torch.nn.Module, forward: Callable[[torch.Tensor], Any], latent: torch.Tensor,
                           layers: list[torch.nn.Module]) -> float:
    """MiB that autograd keeps for the backward of one truncated grad pass, weights excluded: the
    grad pass's own memory, measured exactly (unlike RSS) through ``saved_tensors_hooks``."""
    weights = {parameter.data_ptr() for parameter in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in weights:
            seen[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    leaf = latent.detach().float().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            AttentionCapture(layers, tuple(latent.shape[-2:]), stop_after_last=True) as capture:
        run_truncated(capture, lambda: forward(leaf.to(latent.dtype)))
    return sum(seen.values()) / 2 ** 20


def median_seconds(fn: Callable[[], Any], repeats: int, device: str) -> float:
    timers = Timers(device)
    timed = timers.wrap("run", fn)
    values = []
    for _ in range(repeats):
        before = timers.seconds["run"]
        timed()
        values.append(timers.seconds["run"] - before)
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--passes", type=int, default=5, help="grad passes (iterations) in the loop")
    parser.add_argument("--repeats", type=int, default=3, help="loops / forwards timed, median")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", default="up_lowest")
    parser.add_argument("--weights-frozen", action="store_true", help="also time with weights' requires_grad off")
    parser.add_argument("--saved-only", action="store_true", help="only the memory saved for backward")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    from benchmark.models.clip_tokenizer import load_tokenizer

    dtype = getattr(torch, args.dtype)
    unet = build_unet(args.layout, 1, dtype, args.device)
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(args.device, dtype)
    added = sdxl_added_cond(args.latent, dtype, args.device, 1) if args.layout == "sdxl" else None
    latent = torch.randn(1, 4, args.latent, args.latent, generator=generator).to(args.device, dtype)
    timestep = 901
    targets = prompt_targets(load_tokenizer(), [PROMPT], [ENTITIES])
    config = replace(ElaConfig(enabled=True, entities=ENTITIES, layers=args.layers),
                     max_iterations=args.passes, loss_threshold=0.0)
    space = SamplerSpace.from_sigma(14.6)

    def forward(x: torch.Tensor, rows: int = 1) -> Any:
        extra = {} if added is None else {"added_cond_kwargs": {k: v[:rows] for k, v in added.items()}}
        return unet(x, timestep, encoder_hidden_states=context[:rows], **extra)

    variants = {"weights require grad": contextlib.nullcontext}
    if args.weights_frozen:
        variants["weights frozen"] = lambda: frozen_weights(unet)
    layers = [module for _, module in find_cross_attention_layers(unet, args.layers)]
    for name, context_manager in variants.items():
        with context_manager():
            print(f"saved for backward, {name}: {saved_for_backward_mib(unet, forward, latent, layers):.0f} MiB")
    if args.saved_only:
        return
    with torch.no_grad():
        one_row = median_seconds(lambda: forward(latent), args.repeats, args.device)
        guided = median_seconds(lambda: forward(torch.cat([latent, latent]), rows=2), args.repeats, args.device)
    requiring = sum(p.requires_grad for p in unet.parameters())
    print(f"{args.layout} latent {args.latent}x{args.latent} {args.dtype} {args.device}, layers {args.layers} "
          f"({len(layers)}), {args.passes} passes per loop, "
          f"{requiring} of {sum(1 for _ in unet.parameters())} weight tensors require grad")
    print(f"plain forward, one row: {one_row * 1000:.0f} ms; guided forward (sampling step): {guided * 1000:.0f} ms")
    for name, context_manager in variants.items():
        runs, peaks = [], []
        for _ in range(args.repeats):
            with context_manager():
                loop = lambda: profile_loop(unet, forward, latent, space, targets, config, args.device)  # noqa: E731
                if args.device == "cpu":
                    parts, peak, base = in_forked_child(loop)
                else:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    parts = loop()
                    peak = torch.cuda.max_memory_allocated()
            runs.append(parts)
            peaks.append((peak - base) / 2 ** 20)
        print(f"{name}: ms per grad pass (median of {args.repeats} loops), peak above the weights "
              f"{max(peaks):.0f} MiB ({'RSS' if args.device == 'cpu' else 'allocated'})")
        for part in runs[0]:
            value = statistics.median(run[part] for run in runs)
            print(f"  {part:22s} {value * 1000:9.1f} ms   {value / guided:5.2f} sampling steps")


if __name__ == "__main__":
    main()
