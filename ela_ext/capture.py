"""Cross-attention capture: the maps ``A[k]`` of method.md, read from any UNet without changing it.

The WebUI's attention optimisations (xformers, sdp, split attention) replace
``CrossAttention.forward`` and never materialise the probabilities, and diffusers hides them in
processors. So the maps are recomputed per instance from the layer's own inputs: a forward
PRE-hook takes ``x`` and the context, and computes ``softmax(to_q(x) @ to_k(context)^T * scale)``
in fp32. The layer then runs untouched, so its output is bit-identical with or without capture,
the result is differentiable (it goes through ``to_q``/``to_k``, LoRA included), and it works
whatever forward the class was given.

Layers are chosen by position, not size (method.md "Which layers"): the default is the
lowest-resolution up-block that has cross-attention (``up_blocks.1`` of SD 1.x in diffusers,
``output_blocks[3..5]`` in ldm, ``output_blocks[0..2]`` in SDXL).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CaptureError(RuntimeError):
    """No map could be captured (no chosen layer ran, or the shapes do not fit the latent)."""


class StopForward(BaseException):
    """Raised from the last captured layer's hook to end a grad pass early (method.md).

    A BaseException, like KeyboardInterrupt, so that an ``except Exception`` somewhere in a
    host's forward cannot swallow it; ``run_truncated`` is the only place that catches it.
    """


_DIFFUSERS_BLOCK = re.compile(r"(?:^|\.)(down_blocks|up_blocks)\.(\d+)\.")
_LDM_BLOCK = re.compile(r"(?:^|\.)(input_blocks|output_blocks)\.(\d+)\.")
_MID_BLOCK = re.compile(r"(?:^|\.)(mid_block|middle_block)\.")


def is_cross_attention(name: str, module: nn.Module) -> bool:
    """True for ldm/sgm ``CrossAttention`` ``attn2`` and diffusers ``Attention`` with a context."""
    if not all(hasattr(module, attr) for attr in ("to_q", "to_k", "heads")):
        return False
    return name.endswith("attn2") or bool(getattr(module, "is_cross_attention", False))


def _block_levels(blocks: nn.ModuleList, marker: str, after: bool) -> list[int]:
    """Resolution level of each ldm input/output block: a new level starts at a resampler.

    ``after``: output blocks end a level with an Upsample inside the block; input blocks start a
    level with a block that holds only a Downsample.
    """
    levels, level = [], 0
    for block in blocks:
        has_marker = any(marker in type(m).__name__ for m in block.modules())
        if has_marker and not after:
            level += 1
        levels.append(level)
        if has_marker and after:
            level += 1
    return levels


def _locate(root: nn.Module, name: str) -> Optional[tuple[str, int]]:
    """(region, level) of a layer: region is down/mid/up, level 0 = highest resolution of that path
    for down (increasing as it shrinks) and lowest resolution first for up (execution order)."""
    if _MID_BLOCK.search(name):
        return "mid", 0
    match = _DIFFUSERS_BLOCK.search(name)
    if match:
        return ("down" if match.group(1) == "down_blocks" else "up"), int(match.group(2))
    match = _LDM_BLOCK.search(name)
    if match:
        owner_name = name[: match.start(1)].rstrip(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        blocks = getattr(owner, match.group(1))
        if match.group(1) == "output_blocks":
            return "up", _block_levels(blocks, "Upsample", after=True)[int(match.group(2))]
        return "down", _block_levels(blocks, "Downsample", after=False)[int(match.group(2))]
    return None


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every cross-attention layer of ``unet``, in execution order; a CaptureError when it has none
    (an MM-DiT: its text enters through joint attention)."""
    layers = [(name, module) for name, module in unet.named_modules() if is_cross_attention(name, module)]
    if not layers:
        raise CaptureError("no cross-attention layer (attn2 with to_q/to_k) found in this model")
    return layers


def find_cross_attention_layers(unet: nn.Module, choice: str = "up_lowest") -> list[tuple[str, nn.Module]]:
    """The cross-attention layers named by ``choice`` (config.LAYER_CHOICES), in execution order.

    ``up_lowest``: the first up level that has cross-attention (the paper's 16x16 layers);
    ``up_lowest+mid``: those and the middle block; ``mid``; ``up_all``; ``down_lowest``: the
    deepest down level with cross-attention.
    """
    cross_attention = cross_attention_layers(unet)
    located = [(where, name, module) for name, module in cross_attention
               if (where := _locate(unet, name)) is not None]
    if not located:
        raise CaptureError(f"cross-attention layers in an unknown UNet layout (e.g. {cross_attention[0][0]}; "
                           "expected input/middle/output_blocks or down/mid/up_blocks)")
    up_levels = [level for (region, level), _, _ in located if region == "up"]
    down_levels = [level for (region, level), _, _ in located if region == "down"]

    def wanted(region: str, level: int) -> bool:
        if choice == "up_lowest":
            return region == "up" and level == min(up_levels)
        if choice == "up_lowest+mid":
            return region == "mid" or (region == "up" and level == min(up_levels))
        if choice == "mid":
            return region == "mid"
        if choice == "up_all":
            return region == "up"
        if choice == "down_lowest":
            return region == "down" and level == max(down_levels)
        raise ValueError(f"unknown layer choice {choice!r}")

    if choice in ("up_lowest", "up_lowest+mid", "up_all") and not up_levels:
        raise CaptureError("this model has no cross-attention in its up path")
    if choice == "down_lowest" and not down_levels:
        raise CaptureError("this model has no cross-attention in its down path")
    chosen = [(name, module) for (region, level), name, module in located if wanted(region, level)]
    if not chosen:
        raise CaptureError(f"no cross-attention layer matches layer choice {choice!r}")
    return chosen


def layer_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hidden states, context) as ldm (``x, context=``) and diffusers (``encoder_hidden_states=``)
    pass them."""
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    context = kwargs.get("context", kwargs.get("encoder_hidden_states"))
    if context is None and len(args) > 1:
        context = args[1]
    if context is not None and getattr(module, "norm_cross", None) is not None:
        context = module.norm_encoder_hidden_states(context)
    return hidden, context


def attention_probs(module: nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Head-averaged ``softmax(Q K^T * scale)`` in fp32, shape (batch, pixels, columns).

    ``to_q`` and ``to_k`` run as the layer runs them (its dtype, the host's autocast); the logits
    and softmax run in fp32 with autocast off, since a half-precision ``Q K^T`` can overflow
    (SD 2.x's reason for upcast attention) and autocast would otherwise run the matmul in half.
    """
    if hidden.ndim == 4:  # diffusers may pass (B, C, H, W) to a spatial attention
        hidden = hidden.flatten(2).transpose(1, 2)
    query = module.to_q(hidden)
    key = module.to_k(context)
    with _autocast_off(query.device.type):
        query, key = query.float(), key.float()
        batch, heads = query.shape[0], int(module.heads)
        query = query.reshape(batch, query.shape[1], heads, -1).transpose(1, 2)
        key = key.reshape(batch, key.shape[1], heads, -1).transpose(1, 2)
        scale = float(getattr(module, "scale", query.shape[-1] ** -0.5))
        probs = torch.softmax(query @ key.transpose(-1, -2) * scale, dim=-1)
    return probs.mean(dim=1)


def _autocast_off(device_type: str) -> Any:
    """Autocast disabled on ``device_type`` where torch has autocast for it; else nothing to undo."""
    if device_type in ("cuda", "cpu", "xpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def layer_hw(n_pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The layer's true (h, w): the latent downsampled by a power of two (ceil, as stride-2 convs
    with padding 1 do). Non-square latents give h != w."""
    height, width = latent_hw
    for power in range(8):
        factor = 2 ** power
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w == n_pixels:
            return h, w
    raise CaptureError(f"{n_pixels} attention pixels do not match latent {height}x{width} at any scale")


class AttentionCapture:
    """Context manager that captures head- and layer-averaged cross-attention maps.

    Hooks exist only inside the ``with`` block and every handle is removed on exit, on an
    exception and on KeyboardInterrupt. With ``stop_after_last`` the hook of the last layer to run
    raises ``StopForward`` once every chosen layer has been seen, so a grad pass skips the rest of
    the UNet (most of its cost); use ``run_truncated`` for such passes.
    """

    def __init__(self, layers: Sequence[nn.Module], latent_hw: tuple[int, int], stop_after_last: bool = False):
        if not layers:
            raise CaptureError("no layers to capture")
        self.layers = list(layers)
        self.latent_hw = tuple(latent_hw)
        self.stop_after_last = stop_after_last
        self._handles: list[Any] = []
        self._probs: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "AttentionCapture":
        try:
            for index, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def reset(self) -> None:
        self._probs.clear()

    def _hook(self, index: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, context = layer_inputs(module, args, kwargs)
            if context is None:
                return None
            self._probs[index] = attention_probs(module, hidden, context)
            if self.stop_after_last and len(self._probs) == len(self.layers):
                raise StopForward()
            return None
        return pre_hook

    @property
    def maps(self) -> torch.Tensor:
        """(batch, columns, h, w) maps of the last pass, averaged over the captured layers.

        Layers at different resolutions are resized bilinearly to the largest one's size.
        """
        if not self._probs:
            raise CaptureError("no chosen cross-attention layer ran during the pass")
        per_layer = []
        for probs in self._probs.values():
            h, w = layer_hw(probs.shape[1], self.latent_hw)
            per_layer.append(probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h, w))
        size = max((m.shape[-2:] for m in per_layer), key=lambda hw: hw[0] * hw[1])
        resized = [m if m.shape[-2:] == size else
                   F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False) for m in per_layer]
        return torch.stack(resized).mean(dim=0)


@contextlib.contextmanager
def weights_frozen(module: nn.Module) -> Iterator[None]:
    """``requires_grad`` off for every weight of ``module`` inside the block, restored on every exit.

    The grad pass needs the latent's gradient only, but the WebUI's weights require grad, and then
    autograd keeps each linear and conv layer's input for a weight gradient never taken: 18% of
    what a truncated pass saves for backward on SD 1.5's UNet at 512 px (813 -> 664 MiB in fp32,
    ``python -m benchmark.studies.grad_pass_profile --latent 64 --weights-frozen --saved-only``); time
    was unchanged within noise on CPU.
    """
    # Inference tensors (a host's weights loaded under ``torch.inference_mode``) are left alone:
    # autograd never records them, and their flag cannot be set back outside inference mode.
    thawed = [parameter for parameter in module.parameters()
              if parameter.requires_grad and not parameter.is_inference()]
    try:
        for parameter in thawed:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter in thawed:
            parameter.requires_grad_(True)


def run_truncated(capture: AttentionCapture, forward: Callable[[], Any]) -> torch.Tensor:
    """Run ``forward`` (a UNet call) inside ``capture`` until the last chosen layer, return maps."""
    capture.reset()
    try:
        forward()
    except StopForward:
        pass
    return capture.maps
