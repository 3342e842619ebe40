"""MM-DiT models in the WebUIs (SD3 in AUTOMATIC1111; SD3 / SD3.5 and Flux in Forge): which family
the loaded model is, and where its joint attention can be read.

These models have no cross-attention module: text and image tokens are joined into one sequence
and attend together (text first), inside functions, not modules (measured in both hosts with the
probes of the shared ``webui-mmdit`` recipes):

- A1111 SD3 (``modules.models.sd3.mmdit``): ``JointBlock.forward`` calls the module-level
  ``block_mixing(context, x, context_block, x_block, c)``, which concatenates the text and image
  q/k/v along the sequence and calls the module-level ``attention(q, k, v, heads)`` (imported
  from ``other_impls``: wrapping it there does nothing). q/k are (batch, length, heads * dim).
- Forge SD3 / SD3.5 (``backend.nn.mmditx``): the same two functions; SD3.5 Medium's blocks with
  ``x_block_self_attn`` call ``attention`` a second time on the image tokens alone.
- Forge Flux (``backend.nn.flux``): ``DoubleStreamBlock`` and ``SingleStreamBlock`` call the
  module-level ``attention(q, k, v, pe)`` with (batch, heads, length, dim) q/k, text first, and
  apply the rotary embedding inside it; the text length is the conditioning's.

``JointAttentionTap`` replaces those module globals for the span of a ``with`` block (a grad pass)
and hands every joint call to a callback as ``JointCall``: per-head queries and keys, the rotary
embedding applied, and where the text columns are. Outside the block the host's functions are
its own again (``patched_functions`` lets the debug route check that). ``feeding`` connects a tap
to the engine's ``joint_attention.JointAttentionCapture``, which picks the blocks, computes the
image-to-text maps and ends the pass after its last block.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ela_ext.joint_attention import JointAttentionCapture, choose_blocks

# (module of the diffusion model's class, class name) -> (family, host module with the functions)
_DIT_CLASSES = {
    ("modules.models.sd3.mmdit", "MMDiT"): ("sd3", "modules.models.sd3.mmdit"),
    ("backend.nn.mmditx", "MMDiTX"): ("sd3", "backend.nn.mmditx"),
    ("backend.nn.flux", "IntegratedFluxTransformer2DModel"): ("flux", "backend.nn.flux"),
}
FAMILY_NAMES = {"sd3": "SD3 / SD3.5 (MM-DiT)", "flux": "Flux (MM-DiT)"}


def dit_family(diffusion_model: nn.Module) -> Optional[str]:
    """"sd3" or "flux" for a diffusion model whose joint attention this module can read, else None
    (a UNet, or a DiT family of the host that is not wired here)."""
    found = _DIT_CLASSES.get((type(diffusion_model).__module__, type(diffusion_model).__name__))
    return found[0] if found else None


def _host_module(diffusion_model: nn.Module):
    return importlib.import_module(_DIT_CLASSES[(type(diffusion_model).__module__, type(diffusion_model).__name__)][1])


def model_family(sd_model) -> Optional[str]:
    """``dit_family`` of a WebUI model (A1111's ``sd_model.model``, Forge's patcher)."""
    forge_objects = getattr(sd_model, "forge_objects", None)
    owner = forge_objects.unet.model if forge_objects is not None else getattr(sd_model, "model", None)
    diffusion_model = getattr(owner, "diffusion_model", None)
    return dit_family(diffusion_model) if diffusion_model is not None else None


def joint_block_count(diffusion_model: nn.Module) -> int:
    """The blocks the engine chooses among (``joint_attention.choose_blocks``): SD3's joint blocks,
    Flux's double-stream blocks (its single-stream blocks attend over text and image too, and are
    numbered after them by the tap, but the engine reads double blocks only)."""
    if dit_family(diffusion_model) == "flux":
        return len(diffusion_model.double_blocks)
    return len(diffusion_model.joint_blocks)


def registers(diffusion_model: nn.Module) -> int:
    """Learned tokens SD3's MMDiT puts before the text (0 in released models)."""
    return int(getattr(diffusion_model, "register_length", 0) or 0)


def joint_capture(diffusion_model: nn.Module, config) -> JointAttentionCapture:
    """The engine's capture of the blocks ``config.joint_blocks`` names."""
    return JointAttentionCapture(choose_blocks(joint_block_count(diffusion_model), config.joint_blocks))


def feeding(diffusion_model: nn.Module, capture: JointAttentionCapture) -> "JointAttentionTap":
    """The tap that hands each joint call the capture wants to it (``capture.record``: the text
    columns first, then the image tokens; it stops the pass after its last block)."""
    def record(call: JointCall) -> None:
        n_image = call.query.shape[2] - call.image_start
        capture.record(call.block, call.query, call.key, call.image_start, n_image=n_image)
    return JointAttentionTap(diffusion_model, record, wants=capture.wants)


@dataclass
class JointCall:
    """One joint attention call of one forward pass.

    ``query`` / ``key``: (batch, heads, length, head_dim) as the host attends with them (Flux's
    rotary embedding applied), the sequence being ``[text columns | image tokens]`` with the text
    columns at ``text_start:text_start + text_length`` (SD3 puts ``register_length`` learned tokens
    before the text; 0 in released models) and the image tokens from ``image_start`` on, row-major
    over the patch grid ``image_hw``.
    """

    block: int
    query: torch.Tensor
    key: torch.Tensor
    text_start: int
    text_length: int
    image_start: int
    image_hw: tuple[int, int]


def patch_grid(latent_hw: tuple[int, int], patch: int = 2) -> tuple[int, int]:
    """The image token grid of a latent: both families patchify by 2 (Flux pads odd sizes)."""
    return (latent_hw[0] + patch - 1) // patch, (latent_hw[1] + patch - 1) // patch


def _split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = tensor.shape
    return tensor.view(batch, length, heads, width // heads).transpose(1, 2)


class JointAttentionTap:
    """Inside the ``with`` block, every joint attention call of ``diffusion_model`` goes to
    ``on_call(JointCall)`` before the host's own attention runs (an exception from ``on_call``,
    such as the engine's early stop, propagates out of the forward). The host's module globals are
    restored on every exit."""

    def __init__(self, diffusion_model: nn.Module, on_call: Callable[[JointCall], None],
                 wants: Callable[[int], bool] = lambda block: True):
        family = dit_family(diffusion_model)
        if family is None:
            raise ValueError(f"{type(diffusion_model).__name__} is not an MM-DiT this host glue knows")
        self.family = family
        self.model = diffusion_model
        self.on_call = on_call
        self.wants = wants
        self.module = _host_module(diffusion_model)
        self._saved: dict[str, Callable] = {}
        self._block = 0
        self._text_length: Optional[int] = None
        self._image_length: Optional[int] = None
        self._image_hw: Optional[tuple[int, int]] = None
        self._hook = None

    def __enter__(self) -> "JointAttentionTap":
        try:
            self._hook = self.model.register_forward_pre_hook(self._forward_starts, with_kwargs=True)
            if self.family == "flux":
                self._replace("attention", self._flux_attention)
            else:
                self._replace("block_mixing", self._block_mixing)
                self._replace("attention", self._sd3_attention)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for name, original in self._saved.items():
            setattr(self.module, name, original)
        self._saved.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _replace(self, name: str, replacement: Callable) -> None:
        self._saved[name] = getattr(self.module, name)
        setattr(self.module, name, replacement)

    def _forward_starts(self, _module, args, kwargs) -> None:
        """Each forward counts its blocks from 0; Flux's text length is its context's."""
        self._block = 0
        latent = args[0] if args else kwargs["x"]
        self._image_hw = patch_grid(tuple(latent.shape[-2:]))
        if self.family == "flux":
            context = kwargs.get("context", args[2] if len(args) > 2 else None)
            self._text_length = int(context.shape[1])

    def _emit(self, query: Callable[[], tuple[torch.Tensor, torch.Tensor]], text_start: int, text_length: int) -> None:
        """Block ``self._block``'s call to ``on_call`` if wanted; ``query()`` gives its per-head
        queries and keys (made only then: Flux's rotary embedding is a copy of both)."""
        block = self._block
        self._block += 1
        if self.wants(block):
            queries, keys = query()
            self.on_call(JointCall(block, queries, keys, text_start, text_length,
                                   queries.shape[2] - self._image_tokens(), self._image_hw))

    def _image_tokens(self) -> int:
        return self._image_hw[0] * self._image_hw[1]

    # SD3 / SD3.5: block_mixing tells the context length, attention gets the joined q/k/v.
    def _block_mixing(self, context, x, context_block, x_block, c):
        self._text_length = int(context.shape[1])
        self._image_length = int(x.shape[1])
        try:
            return self._saved["block_mixing"](context, x, context_block, x_block, c)
        finally:
            self._text_length = self._image_length = None

    def _sd3_attention(self, q, k, v, heads, mask=None):
        context_length, image_length = self._text_length, self._image_length
        # The joint call only: SD3.5's image self-attention (``attn2``) has image tokens alone.
        if context_length is not None and q.shape[1] == context_length + image_length:
            self._text_length = None  # one joint call per block
            start = registers(self.model)
            self._emit(lambda: (_split_heads(q, heads), _split_heads(k, heads)), start, context_length - start)
        return self._saved["attention"](q, k, v, heads, mask)

    # Flux: (batch, heads, length, dim), rotary embedding applied inside attention.
    def _flux_attention(self, q, k, v, pe):
        if self._text_length is not None and q.shape[2] == self._text_length + self._image_tokens():
            self._emit(lambda: self.module.apply_rope(q, k, pe), 0, self._text_length)
        return self._saved["attention"](q, k, v, pe)


def patched_functions(diffusion_model: nn.Module) -> dict[str, int]:
    """``{"<module>.<function>": 1 if not the host's own}``: 0 everywhere outside a grad pass."""
    if dit_family(diffusion_model) is None:
        return {}
    module = _host_module(diffusion_model)
    names = ("attention",) if dit_family(diffusion_model) == "flux" else ("block_mixing", "attention")
    return {f"{module.__name__}.{name}": int(getattr(getattr(module, name), "__self__", None) is not None
                                             and isinstance(getattr(module, name).__self__, JointAttentionTap))
            for name in names}
