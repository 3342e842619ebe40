"""What the engine costs, as ratios measured in one run on the tiny UNet (machines are noisy).

    python -m benchmark.commands.engine_speed [--size 32] [--width 32] [--repeats 30] [--device cpu]

Prints: a full grad pass (whole UNet forward, backward to the latent) against the truncated one
(forward stops after the last captured layer), and a plain no-grad forward with capture off
against on. The passes alternate so drift hits both alike; medians are compared. On CUDA it also
prints peak memory per pass.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from benchmark.models.tiny_unet import CONTEXT_DIM, build_tiny_unet
from ela_ext.capture import AttentionCapture, find_cross_attention_layers, run_truncated


def timed(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory(fn: Callable[[], None], device: str) -> str:
    if device != "cuda":
        return "n/a on cpu"
    torch.cuda.reset_peak_memory_stats()
    fn()
    return f"{torch.cuda.max_memory_allocated() / 2 ** 20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--width", type=int, default=32, help="UNet base channels")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)

    unet = build_tiny_unet(width=args.width).to(args.device)
    layers = [module for _, module in find_cross_attention_layers(unet)]
    latent = torch.randn(1, 4, args.size, args.size, device=args.device)
    context = torch.randn(1, 77, CONTEXT_DIM, device=args.device)
    hw = (args.size, args.size)

    def grad_pass(truncated: bool) -> Callable[[], None]:
        def run() -> None:
            leaf = latent.clone().requires_grad_(True)
            with torch.enable_grad(), AttentionCapture(layers, hw, stop_after_last=truncated) as capture:
                maps = run_truncated(capture, lambda: unet(leaf, 500, encoder_hidden_states=context))
                torch.autograd.grad(maps[:, 1].pow(2).sum(), [leaf])
        return run

    def forward(captured: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                if captured:
                    with AttentionCapture(layers, hw):
                        unet(latent, 500, encoder_hidden_states=context)
                else:
                    unet(latent, 500, encoder_hidden_states=context)
        return run

    cases = {"grad pass, full UNet": grad_pass(False), "grad pass, truncated": grad_pass(True),
             "forward, capture off": forward(False), "forward, capture on": forward(True)}
    for fn in cases.values():
        fn()  # warm up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn, args.device))
    median = {name: statistics.median(values) for name, values in times.items()}

    print(f"tiny UNet width {args.width}, latent {args.size}x{args.size}, {args.device}, "
          f"{args.repeats} alternating repeats, medians")
    for name, value in median.items():
        print(f"  {name:24s} {value * 1000:8.2f} ms   peak {peak_memory(cases[name], args.device)}")
    print(f"full / truncated grad pass:      {median['grad pass, full UNet'] / median['grad pass, truncated']:.2f}x")
    print(f"forward capture on / off:        {median['forward, capture on'] / median['forward, capture off']:.3f}x")


if __name__ == "__main__":
    main()
