"""What ELA costs on SD 1.5's and SDXL's UNet layouts: whole-image time and peak memory, off vs on.

    python -m benchmark.commands.real_scale --layout sd15 --latent 16 --steps 10          # CPU, one thread
    python -m benchmark.commands.real_scale --layout sdxl --latent 128 --steps 20 --dtype float16 --device cuda
    python -m benchmark.commands.real_scale --layout sd15 --latent 16 --train-steps 3     # training step cost

The UNets are diffusers ``UNet2DConditionModel`` s built from SD 1.5's and SDXL's configs with
random weights (no hub): the cost of a pass depends on the layout, not on the weights. The text
encoder is a one-layer CLIP text model with random weights at the layout's context width (SDXL's
pooled ``text_embeds`` are random too, its ``time_ids`` the image size), since a real encoder runs
once per image and only hides the UNet's cost. Images are sampled through
``ela_ext.diffusers_adapter.sample`` (DDIM, guidance 5, one prompt with two entities) and not
decoded (the VAE would add the same time to both sides).

Every round samples one image off and then one per ELA setting, so drift hits all alike; the
ratios are medians of on over off. Peak memory on CPU is the peak resident set size (``ru_maxrss``)
of a forked child that samples one image, so every image starts from the same process state; on
CUDA it is ``torch.cuda.max_memory_allocated`` per image. Both include the weights; ``extra`` is
the peak above the memory held before sampling (weights, encoder, latents).

``--train-steps N`` measures ``ela_ext.finetune`` instead: N training steps of the paper's recipe
(noise-only ``x_0``, the attention objective, every ``to_k`` at rank 4) at batch ``--train-batch``,
reported as seconds per step and as sampling steps (one guided UNet evaluation, batch 2) per step.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

from ela_ext.config import ElaConfig, replace
from ela_ext.diffusers_adapter import sample

PROMPT = "a black cat and a green frog"
ENTITIES = "black cat | green frog"

# diffusers' UNet2DConditionModel defaults are SD 1.x's layout; only the context width differs.
SD15 = {"cross_attention_dim": 768, "sample_size": 64}
# SDXL base's unet/config.json (attention_head_dim is the head COUNT there, a diffusers quirk).
SDXL = {
    "sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
SDXL_POOLED_DIM = 1280  # text_embeds width; 2816 = 1280 + 6 time ids x 256
LAYOUTS = {"sd15": SD15, "sdxl": SDXL}

# name -> changes to the current ElaConfig defaults (the effect issue chooses those defaults)
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {}, "iter1": {"max_iterations": 1}, "iter2": {"max_iterations": 2},
    "iter5": {"max_iterations": 5}, "end0.15": {"window_end": 0.15}, "end0.3": {"window_end": 0.3},
}


def unet_config(layout: str, divisor: int = 1) -> dict[str, Any]:
    """The layout's config; ``divisor`` > 1 divides every width (channels, context, norm groups)
    but keeps the blocks, layer counts and head counts, for a test that must run in seconds."""
    config = dict(LAYOUTS[layout])
    channels = config.get("block_out_channels", (320, 640, 1280, 1280))
    config["block_out_channels"] = tuple(c // divisor for c in channels)
    config["norm_num_groups"] = 32 // divisor
    config["cross_attention_dim"] //= divisor
    if layout == "sdxl":
        config["addition_time_embed_dim"] //= divisor
        config["projection_class_embeddings_input_dim"] //= divisor
    return config


def build_unet(layout: str, divisor: int, dtype: torch.dtype, device: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(layout, divisor)).to(device=device, dtype=dtype).eval()


def build_text_encoder(width: int, dtype: torch.dtype, device: str, seed: int = 1):
    """One random CLIP text layer of the context width: token-dependent embeddings, cheap."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=1, num_attention_heads=max(1, width // 64),
                                         max_position_embeddings=77)
    return transformers.CLIPTextModel(config).to(device=device, dtype=dtype).eval()


def sdxl_added_cond(latent: int, dtype: torch.dtype, device: str, divisor: int) -> dict[str, torch.Tensor]:
    """SDXL's ``text_embeds`` (random pooled embeddings) and ``time_ids`` (original size, crop
    (0, 0), target size, in pixels), conditional row then unconditional row."""
    pooled = torch.randn(2, SDXL_POOLED_DIM // divisor, generator=torch.Generator().manual_seed(2))
    pixels = float(latent * 8)
    time_ids = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * 2)
    return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids.to(device=device, dtype=dtype)}


@dataclass
class Image:
    """One sampled image: seconds, peak memory (bytes), memory held before it, and ELA's log."""

    seconds: float
    peak_bytes: int
    base_bytes: int
    anchored_steps: int = 0
    updates: int = 0
    warnings: tuple[str, ...] = ()
    latents: Optional[torch.Tensor] = None


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_forked_child(run: Callable[[], Any]) -> tuple[Any, int, int]:
    """``run()`` in a forked child: (its result, the child's peak RSS, its RSS before ``run``).

    The peak is the child's own ``ru_maxrss`` (KiB on Linux): it starts near the parent's
    resident set (the weights) and rises with what ``run`` needs, and every run starts from the
    same process state.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            base = resident_bytes()
            result = run()
            with os.fdopen(write_end, "wb") as out:
                pickle.dump((result, base), out)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as source:
        payload = source.read()
    _, status, usage = os.wait4(pid, 0)
    if status != 0 or not payload:
        raise RuntimeError(f"the benchmark child failed (wait status {status})")
    result, base = pickle.loads(payload)
    return result, usage.ru_maxrss * 1024, base


def sample_image(models: dict[str, Any], config: ElaConfig, latent: int, steps: int, device: str) -> Image:
    """One whole image through the adapter, timed: CPU seconds of this (one-thread) process on CPU,
    so other work on a shared machine does not count; synchronised wall time and peak memory on
    CUDA."""
    import diffusers

    unet, dtype = models["unet"], models["dtype"]
    noise = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    clock = time.perf_counter if device == "cuda" else time.process_time
    start = clock()
    result = sample(unet, models["text_encoder"], models["tokenizer"], scheduler, [PROMPT], config, noise,
                    num_steps=steps, added_cond_kwargs=models["added_cond"])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = clock() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    session = result.session
    return Image(seconds, peak, base, len(session.steps) if session else 0,
                 sum(log.updates for log in session.steps) if session else 0,
                 tuple(session.warnings) if session else (), result.latents.float().cpu())


def measure(models: dict[str, Any], config: ElaConfig, latent: int, steps: int, device: str) -> Image:
    if device != "cpu":
        return sample_image(models, config, latent, steps, device)
    image, peak, base = in_forked_child(lambda: sample_image(models, config, latent, steps, device))
    image.peak_bytes, image.base_bytes = peak, base
    return image


@dataclass
class Row:
    layout: str
    latent: int
    dtype: str
    device: str
    setting: str
    off_s: float
    on_s: float
    ratio: float
    peak_off_mib: float
    peak_on_mib: float
    extra_off_mib: float
    extra_on_mib: float
    anchored_steps: int
    updates: int
    warnings: tuple[str, ...]
    finite: bool  # every image's final latent finite (random weights in float16 could overflow)


def load_models(layout: str, divisor: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    from benchmark.models.clip_tokenizer import load_tokenizer

    unet = build_unet(layout, divisor, dtype, device)
    return {"unet": unet, "dtype": dtype, "tokenizer": load_tokenizer(),
            "text_encoder": build_text_encoder(unet.config.cross_attention_dim, dtype, device)}


def run_benchmark(layout: str, latent: int, steps: int, dtype: torch.dtype, device: str, settings: list[str],
                  repeats: int = 1, divisor: int = 1, models: Optional[dict[str, Any]] = None) -> list[Row]:
    """Rounds of [off, on at each setting]; medians per setting. Returns one row per setting."""
    models = dict(models or load_models(layout, divisor, dtype, device))
    models["added_cond"] = sdxl_added_cond(latent, dtype, device, divisor) if layout == "sdxl" else None
    configs = {name: replace(ElaConfig(enabled=True, entities=ENTITIES), **SETTINGS[name]) for name in settings}
    off_images: list[Image] = []
    on_images: dict[str, list[Image]] = {name: [] for name in settings}
    if device == "cuda":  # kernels' first-call setup (cuDNN, allocator) outside the timed rounds
        for config in [ElaConfig(), *configs.values()][:2]:
            measure(models, config, latent, steps, device)
    for _ in range(repeats):
        off_images.append(measure(models, ElaConfig(), latent, steps, device))
        for name, config in configs.items():
            on_images[name].append(measure(models, config, latent, steps, device))
    off_s = statistics.median(image.seconds for image in off_images)
    peak_off = max(image.peak_bytes for image in off_images)
    extra_off = max(image.peak_bytes - image.base_bytes for image in off_images)
    rows = []
    for name, images in on_images.items():
        on_s = statistics.median(image.seconds for image in images)
        peak_on = max(image.peak_bytes for image in images)
        extra_on = max(image.peak_bytes - image.base_bytes for image in images)
        rows.append(Row(layout, latent, str(dtype).replace("torch.", ""), device, name, off_s, on_s, on_s / off_s,
                        peak_off / 2 ** 20, peak_on / 2 ** 20, extra_off / 2 ** 20, extra_on / 2 ** 20,
                        images[-1].anchored_steps, images[-1].updates, images[-1].warnings,
                        all(bool(torch.isfinite(image.latents).all()) for image in off_images + images)))
    return rows


def training_step_cost(layout: str, latent: int, steps: int, batch: int, divisor: int = 1,
                       models: Optional[dict[str, Any]] = None) -> dict[str, float]:
    """CPU seconds per training step of ``train_key_projections`` (S&E's recipe, rank 4, every
    ``to_k``, maps from the anchor layers) and of one guided sampling step, on one thread."""
    import diffusers

    from ela_ext.diffusers_adapter import encode, prompt_targets
    from ela_ext.finetune import FinetuneConfig, TrainingPrompt, train_key_projections

    models = dict(models or load_models(layout, divisor, torch.float32, "cpu"))
    unet, tokenizer, text_encoder = models["unet"], models["tokenizer"], models["text_encoder"]
    added = sdxl_added_cond(latent, torch.float32, "cpu", divisor) if layout == "sdxl" else None

    def extra(rows: int) -> dict[str, Any]:
        return {} if added is None else {"added_cond_kwargs": {k: v[:1].expand(rows, -1) for k, v in added.items()}}

    def denoise(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, encoder_hidden_states=context, **extra(x_t.shape[0])).sample

    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    prompts = [TrainingPrompt(PROMPT, target) for target in prompt_targets(tokenizer, [PROMPT], [ENTITIES])]
    config = FinetuneConfig(steps=steps, batch_size=batch, learning_rate=1e-5)
    start = time.process_time()
    train_key_projections(unet, denoise, lambda texts: encode(tokenizer, text_encoder, texts), prompts,
                          scheduler.alphas_cumprod, (4, latent, latent), config)
    per_step = (time.process_time() - start) / steps
    x = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    context = encode(tokenizer, text_encoder, [PROMPT, ""])
    start = time.process_time()
    with torch.no_grad():
        for _ in range(steps):
            denoise(x, torch.tensor([500, 500]), context)
    sampling_step = (time.process_time() - start) / steps
    return {"train_step_s": per_step, "sampling_step_s": sampling_step, "ratio": per_step / sampling_step}


def format_row(row: Row) -> str:
    return (f"| {row.layout} | {row.latent}x{row.latent} | {row.dtype} | {row.device} | {row.setting} | "
            f"{row.off_s:.1f} | {row.on_s:.1f} | {row.ratio:.2f}x | {row.peak_off_mib:.0f} / {row.peak_on_mib:.0f} | "
            f"{row.extra_off_mib:.0f} / {row.extra_on_mib:.0f} | {row.anchored_steps} x {row.updates} |")


HEADER = ("| layout | latent | dtype | device | setting | off s | on s | ratio | peak MiB off / on | "
          "extra MiB off / on | anchored steps x updates |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="sd15")
    parser.add_argument("--latent", type=int, default=16, help="latent height and width (pixels / 8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", nargs="+", default=["defaults", "iter1", "iter2"], choices=sorted(SETTINGS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds of off + every setting")
    parser.add_argument("--divisor", type=int, default=1, help="divide every width (tests only)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--train-steps", type=int, default=0, help="measure N training steps instead (CPU)")
    parser.add_argument("--train-batch", type=int, default=4)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.train_steps:
        cost = training_step_cost(args.layout, args.latent, args.train_steps, args.train_batch, args.divisor)
        print(f"{args.layout}, latent {args.latent}x{args.latent}, batch {args.train_batch}: training step "
              f"{cost['train_step_s']:.2f} s, guided sampling step {cost['sampling_step_s']:.2f} s, "
              f"ratio {cost['ratio']:.2f}")
        return
    rows = run_benchmark(args.layout, args.latent, args.steps, getattr(torch, args.dtype), args.device,
                         args.settings, args.repeats, args.divisor)
    print(f"defaults: {ElaConfig()}\n{args.steps} DDIM steps, {args.repeats} round(s), medians\n{HEADER}")
    for row in rows:
        print(format_row(row))
        for warning in row.warnings:
            print(f"  warning ({row.setting}): {warning}")
        if not row.finite:
            print(f"  non-finite latents ({row.setting}): this dtype overflows with random weights; try bfloat16")
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(row) for row in rows], out, indent=1)


if __name__ == "__main__":
    main()
