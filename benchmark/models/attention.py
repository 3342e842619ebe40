"""Cross-attention maps of the layers ELA anchors on, while a model trains or samples.

Used by the gate (``localization.py``, no gradients) and by training's grounding loss (gradients
into ``to_q``/``to_k``). The layers and the maps are the engine's own (``ela_ext.capture``: the
lowest-resolution up-block with cross-attention, ``softmax(Q K^T * scale)`` in fp32, heads
averaged), so the model is trained and gated on exactly what ELA reads. Unlike the engine's
``AttentionCapture``, which lives for one grad pass, this recorder stays on for a whole training
run or sampling loop and records only while ``armed``.
"""

from __future__ import annotations

import torch

from ela_ext.capture import layer_inputs, attention_probs, find_cross_attention_layers


def anchor_layers(unet) -> list[torch.nn.Module]:
    """The engine's default layers: the lowest-resolution up-block with cross-attention."""
    return [module for _, module in find_cross_attention_layers(unet)]


class AttentionRecorder:
    """Forward pre-hooks that record head-averaged cross-attention probabilities while ``armed``."""

    def __init__(self, layers):
        self.armed, self.maps = False, []
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in layers]

    def _hook(self, module, args, kwargs):
        if self.armed:
            hidden, context = layer_inputs(module, args, kwargs)
            self.maps.append(attention_probs(module, hidden, context))  # (B, HW, 77)

    def take(self) -> torch.Tensor:
        """Mean over recorded layers, (B, HW, 77); clears the record."""
        out = torch.stack(self.maps).mean(0)
        self.maps = []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
