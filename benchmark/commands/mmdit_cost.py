"""What ELA costs on SD3.5-medium's and Flux.1-dev's MM-DiT layouts: image time and peak memory,
off vs anchored, measured at a reduced depth and computed for the full depth from per-block times.

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmark.commands.mmdit_cost --layout sd35m
    OMP_NUM_THREADS=1 nice -n 10 python -m benchmark.commands.mmdit_cost --layout flux

The transformers are diffusers' ``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` built
from the released configs with random weights (no hub; the cost of a pass depends on the layout,
not on the weights), in float32 on CPU, one thread. The conditioning is random (a text encoder
runs once per image and only hides the transformer's cost). Images are sampled by
``ela_ext.diffusers_mmdit.sample`` (Euler flow matching, SD3's shift-3 schedule; SD3: classifier-
free guidance, a batch of 2 per step; Flux-dev: one row, guidance embedding) and anchored by the
engine exactly as the hosts do: the same ``JointAttentionCapture`` of the default (middle third)
joint blocks, the same grad pass truncated after the last block read.

Full depth does not fit this budget (Flux.1-dev is 48 GB in float32; SD3.5-medium's 4 steps with
anchoring take tens of CPU minutes), so each layout is built twice:

1. **measured**: the real width at a reduced depth (``REDUCED``), whole images off and anchored,
   each in a forked child (``real_scale.in_forked_child``: CPU seconds and peak RSS). Ratios are
   medians of on over off across ``--repeats`` rounds in one run.
2. **per block**: one block of each kind of that model, on the real token counts: a plain forward
   (no grad, the sampler's batch) and a grad-pass block (batch 1, forward with grad and the
   backward to its inputs, weights frozen as the engine freezes them), medians of ``--block-repeats``.
3. **computed**: full depth = the measured reduced-depth image + the missing blocks at their
   per-block times: every step's plain forward gets the missing blocks, every grad pass the
   missing blocks up to the last one the full model's capture reads. The capture's map (computed
   per read block, under a percent of a block) is counted at the reduced depth's number of reads.

Also computed: the same at a usual step count (``--typical-steps``), where the window covers 30%
of many steps instead of 2 of 4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from benchmark.commands.real_scale import ENTITIES, PROMPT, SETTINGS, in_forked_child
from ela_ext import diffusers_mmdit
from ela_ext.anchoring import in_window
from ela_ext.config import ElaConfig, replace
from ela_ext.joint_attention import choose_blocks

# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35M = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
         "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
         "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
         "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FULL = {"sd35m": SD35M, "flux": FLUX_DEV}
# The measured depth: SD3.5-m's block kinds once each (a dual-attention block, a plain joint block,
# the last, context-pre-only block); Flux two double and two single blocks.
REDUCED = {"sd35m": {"num_layers": 3, "dual_attention_layers": (0,)},
           "flux": {"num_layers": 2, "num_single_layers": 2}}
# The tests' configs: the same classes and block kinds, widths of a few channels.
TINY = {"sd35m": {"sample_size": 8, "num_layers": 3, "dual_attention_layers": (0,), "attention_head_dim": 8,
                  "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 16,
                  "pooled_projection_dim": 8, "pos_embed_max_size": 16},
        "flux": {"in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8,
                 "num_attention_heads": 2, "joint_attention_dim": 16, "pooled_projection_dim": 8,
                 "axes_dims_rope": (2, 2, 4)}}
GUIDANCE = {"sd35m": 4.5, "flux": 3.5}  # SD3: CFG scale; Flux-dev: its guidance embedding


def transformer_config(layout: str, tiny: bool = False, reduced: bool = False) -> dict[str, Any]:
    config = dict(FULL[layout])
    config.update(TINY[layout] if tiny else REDUCED[layout] if reduced else {})
    return config


def build_transformer(layout: str, tiny: bool = False, reduced: bool = False, seed: int = 0):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    cls = SD3Transformer2DModel if layout == "sd35m" else FluxTransformer2DModel
    return cls(**transformer_config(layout, tiny, reduced)).eval()


def latent_channels(model) -> int:
    """The sampler's latent channels: Flux's ``in_channels`` are its 2x2-packed ones."""
    return model.config.in_channels // 4 if diffusers_mmdit.family(model) == "flux" else model.config.in_channels


def parameter_count(layout: str) -> int:
    """Parameters at the full depth, from the meta device (nothing allocated)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if layout == "sd35m" else FluxTransformer2DModel
    with torch.device("meta"):
        return sum(p.numel() for p in cls(**FULL[layout]).parameters())


def conditioning(layout: str, model, text_tokens: int) -> diffusers_mmdit.Conditioning:
    """Random context (T5 width) and pooled embeddings; SD3 also an unconditional pair."""
    generator = torch.Generator().manual_seed(2)
    width, pooled = model.config.joint_attention_dim, model.config.pooled_projection_dim

    def pair():
        return torch.randn(1, text_tokens, width, generator=generator), torch.randn(1, pooled, generator=generator)

    context, pooled_cond = pair()
    if layout != "sd35m":
        return diffusers_mmdit.Conditioning(context, pooled_cond)
    return diffusers_mmdit.Conditioning(context, pooled_cond, *pair())


def targets_for(text_tokens: int):
    """The benchmark prompt's entity columns (CLIP tokens, the first columns of the context)."""
    from benchmark.models.clip_tokenizer import load_tokenizer
    from ela_ext.diffusers_adapter import prompt_targets

    targets = prompt_targets(load_tokenizer(), [PROMPT], [ENTITIES])
    if max(c for e in targets[0].entities for c in e.columns) >= text_tokens:
        raise ValueError(f"{text_tokens} text tokens do not reach the prompt's entities")
    return targets


@dataclass
class Sampled:
    seconds: float
    peak_bytes: int = 0
    base_bytes: int = 0
    anchored_steps: int = 0
    grad_passes: int = 0
    updates: int = 0
    warnings: tuple[str, ...] = ()


def sample_image(layout: str, model, cond, targets, config: ElaConfig, latent: int, steps: int) -> Sampled:
    """One image, CPU seconds of this one-thread process (other work on the machine not counted)."""
    noise = torch.randn(1, latent_channels(model), latent, latent, generator=torch.Generator().manual_seed(0))
    start = time.process_time()
    result = diffusers_mmdit.sample(model, cond, targets, config, noise, diffusers_mmdit.shifted_sigmas(steps),
                                    GUIDANCE[layout])
    seconds = time.process_time() - start
    session = result.session
    if session is None:
        return Sampled(seconds)
    return Sampled(seconds, anchored_steps=len(session.steps),
                   grad_passes=sum(len(log.losses) for log in session.steps),
                   updates=sum(log.updates for log in session.steps), warnings=tuple(session.warnings))


def measure(run: Callable[[], Sampled]) -> Sampled:
    image, peak, base = in_forked_child(run)
    image.peak_bytes, image.base_bytes = peak, base
    return image


def median_seconds(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def block_inputs(model, latent: int, text_tokens: int, batch: int) -> dict[str, Any]:
    """Random hidden states of a block at the real token counts (image tokens, text tokens)."""
    generator = torch.Generator().manual_seed(3)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    image = (latent // 2) ** 2
    inputs = {"hidden_states": torch.randn(batch, image, width, generator=generator),
              "encoder_hidden_states": torch.randn(batch, text_tokens, width, generator=generator),
              "temb": torch.randn(batch, width, generator=generator)}
    if diffusers_mmdit.family(model) == "flux":
        ids = torch.cat([torch.zeros(text_tokens, 3), diffusers_mmdit.image_ids(latent, latent, "cpu", torch.float32)])
        inputs["image_rotary_emb"] = model.pos_embed(ids)
    return inputs


def block_kinds(layout: str, model) -> dict[str, torch.nn.Module]:
    """One block of each kind whose count grows with depth (the last SD3 block is the same at
    every depth: measured, not computed)."""
    blocks = model.transformer_blocks
    if layout == "sd35m":
        return {"dual": next(b for b in blocks if b.attn2 is not None),
                "joint": next(b for b in blocks[:-1] if b.attn2 is None)}
    return {"double": blocks[0], "single": model.single_transformer_blocks[0]}


def per_block_seconds(layout: str, model, latent: int, text_tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per kind: ``plain`` (no grad, the sampler's batch) and ``grad`` (batch 1, forward with
    grad and backward to both token streams, weights frozen) CPU seconds."""
    batch = 2 if layout == "sd35m" else 1
    times: dict[str, dict[str, float]] = {}
    for param in model.parameters():
        param.requires_grad_(False)
    for kind, block in block_kinds(layout, model).items():
        plain_inputs = block_inputs(model, latent, text_tokens, batch)
        grad_inputs = block_inputs(model, latent, text_tokens, 1)

        def plain():
            with torch.no_grad():
                block(**plain_inputs)

        def grad():
            leaves = {k: v.detach().requires_grad_(k in ("hidden_states", "encoder_hidden_states"))
                      if torch.is_tensor(v) else v for k, v in grad_inputs.items()}
            text, image = block(**leaves)
            torch.autograd.grad(text.sum() + image.sum(), [leaves["hidden_states"], leaves["encoder_hidden_states"]])

        plain()
        times[kind] = {"plain": median_seconds(plain, repeats), "grad": median_seconds(grad, repeats)}
    for param in model.parameters():
        param.requires_grad_(True)
    return times


def block_counts(layout: str, config: dict[str, Any], joint_blocks: str) -> dict[str, dict[str, int]]:
    """Per kind: blocks in a plain forward (``plain``) and in a truncated grad pass (``grad``:
    the joint blocks up to the last one read; Flux's single blocks come after every double)."""
    if layout == "sd35m":
        n, duals = config["num_layers"], set(config["dual_attention_layers"])
        reach = choose_blocks(n, joint_blocks)[-1] + 1
        growing = range(n - 1)  # the last block is the same at every depth
        return {"dual": {"plain": sum(i in duals for i in growing), "grad": sum(i in duals for i in range(reach))},
                "joint": {"plain": sum(i not in duals for i in growing),
                          "grad": sum(i not in duals for i in range(min(reach, n - 1)))}}
    reach = choose_blocks(config["num_layers"], joint_blocks)[-1] + 1
    return {"double": {"plain": config["num_layers"], "grad": reach},
            "single": {"plain": config["num_single_layers"], "grad": 0}}


@dataclass
class Row:
    layout: str
    setting: str
    latent: int
    text_tokens: int
    steps: int
    anchored_steps: int
    grad_passes: int
    updates: int
    off_s: float  # measured, reduced depth
    on_s: float
    ratio: float
    peak_off_mib: float
    peak_on_mib: float
    full_off_s: float  # computed, full depth
    full_on_s: float
    full_ratio: float
    typical_steps: int
    typical_anchored_steps: int
    typical_ratio: float  # computed, full depth, usual step count
    warnings: tuple[str, ...]


def full_depth(layout: str, off_s: float, on_s: float, grad_passes: int, steps: int, joint_blocks: str,
               per_block: dict[str, dict[str, float]]) -> tuple[float, float]:
    """(off, on) seconds at the full depth: the reduced images plus the missing blocks."""
    full = block_counts(layout, FULL[layout], joint_blocks)
    reduced = block_counts(layout, transformer_config(layout, reduced=True), joint_blocks)
    plain = sum((full[k]["plain"] - reduced[k]["plain"]) * per_block[k]["plain"] for k in full)
    grad = sum((full[k]["grad"] - reduced[k]["grad"]) * per_block[k]["grad"] for k in full)
    return off_s + steps * plain, on_s + steps * plain + grad_passes * grad


def typical_ratio(full_off: float, full_on: float, steps: int, grad_passes: int, anchored: int,
                  typical_steps: int, config: ElaConfig) -> tuple[int, float]:
    """The full-depth ratio at ``typical_steps``: per-step and per-grad-pass costs from the
    computed full-depth images, the same passes per anchored step."""
    typical_anchored = sum(in_window(i, typical_steps, config) for i in range(typical_steps))
    step, per_pass = full_off / steps, (full_on - full_off) / max(grad_passes, 1)
    passes = grad_passes / max(anchored, 1) * typical_anchored
    return typical_anchored, (typical_steps * step + passes * per_pass) / (typical_steps * step)


def run_benchmark(layout: str, latent: int, text_tokens: int, steps: int, settings: list[str], repeats: int,
                  block_repeats: int, typical_steps: int, tiny: bool = False) -> tuple[list[Row], dict]:
    model = build_transformer(layout, tiny=tiny, reduced=not tiny)
    cond = conditioning(layout, model, text_tokens)
    targets = targets_for(text_tokens)
    configs = {name: replace(ElaConfig(enabled=True, entities=ENTITIES), **SETTINGS[name]) for name in settings}

    def image(config: ElaConfig) -> Sampled:
        return measure(lambda: sample_image(layout, model, cond, targets, config, latent, steps))

    offs, ons = [], {name: [] for name in settings}
    for _ in range(repeats):
        offs.append(image(ElaConfig()))
        for name, config in configs.items():
            ons[name].append(image(config))
    per_block = per_block_seconds(layout, model, latent, text_tokens, block_repeats)
    off_s = statistics.median(i.seconds for i in offs)
    rows = []
    for name, images in ons.items():
        last, config = images[-1], configs[name]
        ratio = statistics.median(on.seconds / off.seconds for on, off in zip(images, offs))
        on_s = statistics.median(i.seconds for i in images)
        full_off, full_on = full_depth(layout, off_s, on_s, last.grad_passes, steps, config.joint_blocks, per_block)
        typical_anchored, typical = typical_ratio(full_off, full_on, steps, last.grad_passes, last.anchored_steps,
                                                  typical_steps, config)
        rows.append(Row(layout, name, latent, text_tokens, steps, last.anchored_steps, last.grad_passes, last.updates,
                        off_s, on_s, ratio, max(i.peak_bytes for i in offs) / 2 ** 20,
                        max(i.peak_bytes for i in images) / 2 ** 20, full_off, full_on, full_on / full_off,
                        typical_steps, typical_anchored, typical, last.warnings))
    return rows, per_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(FULL), default="sd35m")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width (image tokens: (latent/2)^2)")
    parser.add_argument("--text-tokens", type=int, default=77, help="context length (hosts pad T5 longer)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--settings", nargs="+", default=["defaults", "iter1"], choices=sorted(SETTINGS))
    parser.add_argument("--repeats", type=int, default=1, help="rounds of off + every setting")
    parser.add_argument("--block-repeats", type=int, default=3)
    parser.add_argument("--typical-steps", type=int, default=28)
    parser.add_argument("--json", help="also write the rows and per-block times here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, per_block = run_benchmark(args.layout, args.latent, args.text_tokens, args.steps, args.settings,
                                    args.repeats, args.block_repeats, args.typical_steps)
    reduced = transformer_config(args.layout, reduced=True)
    print(f"{args.layout}: real width, measured at reduced depth {REDUCED[args.layout]}; full depth "
          f"{parameter_count(args.layout) / 1e9:.2f} B parameters ({parameter_count(args.layout) * 4 / 2 ** 30:.1f} GiB "
          f"float32) COMPUTED from per-block times, not measured end to end")
    print(f"latent {args.latent}x{args.latent} ({(args.latent // 2) ** 2} image tokens), {args.text_tokens} text "
          f"tokens, {args.steps} Euler flow steps, CPU float32, one thread, {args.repeats} round(s)")
    print("per block, CPU s (plain: no-grad forward at the sampler's batch; grad: batch 1 forward + backward):")
    for kind, times in per_block.items():
        counts = block_counts(args.layout, FULL[args.layout], ElaConfig().joint_blocks)[kind]
        print(f"  {kind}: plain {times['plain']:.3f}, grad {times['grad']:.3f}  "
              f"(full depth: {counts['plain']} per forward, {counts['grad']} per grad pass)")
    print(f"reduced-depth blocks: {block_counts(args.layout, reduced, ElaConfig().joint_blocks)}")
    print("| setting | anchored steps / grad passes / updates | measured off s | on s | ratio | peak RSS MiB off / on "
          "| full depth off s | on s | ratio (computed) | ratio at N steps (computed) |")
    for row in rows:
        print(f"| {row.setting} | {row.anchored_steps} / {row.grad_passes} / {row.updates} | {row.off_s:.1f} | "
              f"{row.on_s:.1f} | {row.ratio:.2f}x | {row.peak_off_mib:.0f} / {row.peak_on_mib:.0f} | "
              f"{row.full_off_s:.0f} | {row.full_on_s:.0f} | {row.full_ratio:.2f}x | "
              f"{row.typical_ratio:.2f}x at {row.typical_steps} ({row.typical_anchored_steps} anchored) |")
        for warning in row.warnings:
            print(f"  warning ({row.setting}): {warning}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rows": [asdict(row) for row in rows], "per_block": per_block}, out, indent=1)


if __name__ == "__main__":
    main()
