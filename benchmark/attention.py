"""Cross-attention probabilities of the layers ELA anchors on, recomputed by forward pre-hooks.

Used both by the gate (``localization.py``, no gradients) and by training's grounding loss (with
gradients into ``to_q``/``to_k``): softmax(to_q(x) to_k(context)^T * scale) per head in fp32,
averaged over heads and over the recorded layers.
"""

from __future__ import annotations

import torch


def anchor_layers(unet) -> list[torch.nn.Module]:
    """attn2 modules of the first up-block (execution order = lowest resolution) that has any: the
    engine's "lowest-resolution up-block with cross-attention"."""
    for block in unet.up_blocks:
        layers = [m for n, m in block.named_modules() if n.endswith("attn2")]
        if layers:
            return layers
    raise ValueError("no up-block with cross-attention")


class AttentionRecorder:
    """Forward pre-hooks that record head-averaged cross-attention probabilities while ``armed``."""

    def __init__(self, layers):
        self.armed, self.maps = False, []
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in layers]

    def _hook(self, module, args, kwargs):
        if not self.armed:
            return
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        q, k = module.to_q(x).float(), module.to_k(ctx).float()
        b, n, _ = q.shape
        q = q.view(b, n, module.heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], module.heads, -1).transpose(1, 2)
        self.maps.append((q @ k.transpose(-1, -2) * module.scale).softmax(-1).mean(1))  # (B, HW, 77)

    def take(self) -> torch.Tensor:
        """Mean over recorded layers, (B, HW, 77); clears the record."""
        out = torch.stack(self.maps).mean(0)
        self.maps = []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
