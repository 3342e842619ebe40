"""Whether a subset of SDXL's lowest up level (``up_blocks.0``: 3 transformers x 10 layers = 30
cross-attention layers) gives the maps of all 30, and what the truncated grad pass then costs.

    python -m benchmark.studies.layer_subset --latent 16

Maps: one conditional forward (no grad) captures each layer's head-averaged map; a subset's map
is the mean of its layers' maps (they share one resolution), compared with all 30's by the
Pearson correlation of each prompt word's spatial map, averaged over the words. Cost: one
truncated grad pass (forward to the subset's last layer, backward to the latent), CPU seconds of
this one-thread process (synchronised wall time on CUDA), relative to all 30.

The weights are random (no SDXL weights reach this machine): the cost fractions hold for SDXL,
the correlations do not say how a trained SDXL's layers agree. Measured at latent 16x16 (CPU):
the first transformer's 10 layers 0.65x the pass of all 30, its first 5 layers 0.60x, every 3rd
layer or each transformer's first 1.00x (the pass still reaches the third transformer).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Any, Callable

import torch

from benchmark.studies.grad_pass_profile import Timers
from benchmark.commands.real_scale import PROMPT, build_text_encoder, build_unet, sdxl_added_cond
from ela_ext.capture import AttentionCapture, find_cross_attention_layers, run_truncated

SUBSETS: dict[str, Callable[[int], bool]] = {
    "all 30": lambda index: True,
    "first transformer (10)": lambda index: index < 10,
    "first 5 of the first transformer": lambda index: index < 5,
    "every 3rd layer (10)": lambda index: index % 3 == 0,
    "first layer of each transformer (3)": lambda index: index % 10 == 0,
}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double() - a.double().mean(), b.flatten().double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--divisor", type=int, default=1, help="divide every width (a quick check)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    from benchmark.models.clip_tokenizer import load_tokenizer

    unet = build_unet("sdxl", args.divisor, torch.float32, args.device)
    tokenizer = load_tokenizer()
    ids = tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    words = list(range(1, int((ids[0] != tokenizer.eos_token_id).sum())))
    text_encoder = build_text_encoder(unet.config.cross_attention_dim, torch.float32, args.device)
    with torch.no_grad():
        context = text_encoder(ids.to(args.device))[0]
    both_rows = sdxl_added_cond(args.latent, torch.float32, args.device, args.divisor)
    added = {key: value[:1] for key, value in both_rows.items()}
    latent = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0)).to(args.device)
    layers = [module for _, module in find_cross_attention_layers(unet)]
    hw = (args.latent, args.latent)

    def forward(x: torch.Tensor) -> Any:
        return unet(x, 500, encoder_hidden_states=context, added_cond_kwargs=added)

    with torch.no_grad(), contextlib.ExitStack() as stack:
        captures = [stack.enter_context(AttentionCapture([layer], hw)) for layer in layers]
        forward(latent)
        per_layer = torch.stack([capture.maps[0] for capture in captures])  # (30, columns, h, w)

    def grad_pass(chosen: list[torch.nn.Module]) -> None:
        leaf = latent.clone().requires_grad_(True)
        with torch.enable_grad(), AttentionCapture(chosen, hw, stop_after_last=True) as capture:
            maps = run_truncated(capture, lambda: forward(leaf))
            torch.autograd.grad(maps[:, words].pow(2).sum(), [leaf])

    timers = Timers(args.device)
    costs: dict[str, list[float]] = {name: [] for name in SUBSETS}
    for _ in range(args.repeats):
        for name, keep in SUBSETS.items():
            chosen = [layer for index, layer in enumerate(layers) if keep(index)]
            before = timers.seconds[name]
            timers.wrap(name, grad_pass)(chosen)
            costs[name].append(timers.seconds[name] - before)
    full = statistics.median(costs["all 30"])
    print(f"SDXL layout (random weights, width / {args.divisor}), latent {args.latent}x{args.latent}, "
          f"{args.device}; words {words}; truncated grad pass of all 30 layers: {full:.2f} s")
    print("| layers | Pearson r of word maps vs all 30 (mean, min) | grad pass vs all 30 |\n|---|---|---|")
    reference = per_layer.mean(0)
    for name, keep in SUBSETS.items():
        subset = per_layer[[index for index in range(len(layers)) if keep(index)]].mean(0)
        correlations = [pearson(subset[word], reference[word]) for word in words]
        print(f"| {name} | {statistics.mean(correlations):.3f}, {min(correlations):.3f} | "
              f"{statistics.median(costs[name]) / full:.2f} |")


if __name__ == "__main__":
    main()
