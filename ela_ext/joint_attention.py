"""MM-DiT capture: the maps ``A[k]`` of method.md read from joint attention (SD3 / SD3.5's MMDiT,
Flux's double-stream blocks), where text and image tokens attend in ONE softmax over text+image
keys instead of a separate cross-attention layer.

The map of text column ``k`` is the image queries' attention to key ``k``, taken from the
text-key part of that joint softmax and **renormalised over the text columns**, so every image
token's row sums to 1 over the prompt's columns. Renormalising the text part of one softmax is
exactly a softmax over the text logits alone, ``softmax(Q_img K_text^T * scale)``: the same
quantity SD's cross-attention gives, so localisation (the background from the start-of-text or end
column, the entity-dominance test), the objectives' thresholds and the ``text_share`` of Separate
and Enhance keep their SD meaning. Kept as the share of the joint softmax instead, every map would
also carry how much that image token attends to text at all, which varies by block, noise level
and pixel (most of an image token's attention goes to other image tokens), and a word's map
would mix "looks at the text" with "looks at this word". The image-to-image part is never
materialised: the cost is ``(batch, heads, image tokens, text tokens)`` per read block.

Host interface (host-neutral, torch only):

- ``choose_blocks(n_blocks, choice)``: the joint blocks to read, by ``ElaConfig.joint_blocks``.
- ``JointAttentionCapture(blocks)``: the host's attention hook calls
  ``capture.record(block, query, key, n_text, heads)`` inside each joint block's attention, with
  the queries and keys exactly as that attention uses them (after q/k norms and RoPE), text tokens
  FIRST in the sequence (MMDiT: ``(B, L, heads * D)`` with ``heads``; Flux: ``(B, heads, L, D)``).
  The capture ignores calls outside ``capturing(latent_hw)``, calls of blocks it was not told to
  read, and repeats of a block within one pass (SD3.5's extra image-only attention has another
  length and is skipped too). With ``stop_after_last`` it raises ``capture.StopForward`` once every
  chosen block was seen, so a grad pass skips the rest of the model (``capture.run_truncated``,
  the UNets' function, ends such a pass). ``maps`` are ``(batch, text columns, h, w)``, ``(h, w)`` the image-token grid
  (the latent over the patch size, found from the token count as for UNet layers).
- ``AnchoringSession(model, config, targets, capture=JointAttentionCapture(...))`` anchors with
  it; the host's ``forward(x)`` must run the conditional branch with the hook installed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from .capture import CaptureError, StopForward, _autocast_off, layer_hw


def choose_blocks(n_blocks: int, choice: str = "middle") -> list[int]:
    """Indices of the joint blocks to read among ``n_blocks`` (``config.JOINT_BLOCK_CHOICES``).

    ``middle``: the middle third (at least one block); ``early``: the first third; ``all``.
    The default ``middle`` is PROVISIONAL: DiT text-image attention is reported most localised in
    the middle blocks, not measured here yet (a benchmark MM-DiT comes later). A truncated pass
    then skips the last third of the joint blocks and every single-stream block.
    """
    if n_blocks <= 0:
        raise CaptureError("this model has no joint-attention block")
    if choice == "all":
        return list(range(n_blocks))
    if choice == "early":
        return list(range(max(1, n_blocks // 3)))
    if choice == "middle":
        start = n_blocks // 3
        return list(range(start, max(start + 1, (2 * n_blocks + 2) // 3)))
    raise ValueError(f"unknown joint block choice {choice!r}")


def text_attention_probs(query: torch.Tensor, key: torch.Tensor, n_text: int,
                         heads: Optional[int] = None) -> torch.Tensor:
    """Head-averaged image-to-text attention of one joint block, (batch, image tokens, text columns).

    ``query``/``key``: the joint sequence, text first, as ``(B, L, heads * D)`` (then ``heads`` is
    needed) or ``(B, heads, L, D)``. The text part of the joint softmax renormalised over the text
    columns (module doc), i.e. ``softmax(Q_img K_text^T / sqrt(D))`` in fp32 with autocast off.
    """
    if query.ndim == 3:
        if heads is None:
            raise ValueError("(B, L, heads * D) queries need the number of heads")
        query, key = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (query, key))
    if not 0 < n_text < query.shape[2]:
        raise CaptureError(f"{n_text} text tokens in a joint sequence of {query.shape[2]}")
    with _autocast_off(query.device.type):
        image_queries = query[:, :, n_text:].float()
        text_keys = key[:, :, :n_text].float()
        logits = image_queries @ text_keys.transpose(-1, -2) * image_queries.shape[-1] ** -0.5
        probs = torch.softmax(logits, dim=-1)
    return probs.mean(dim=1)


class JointAttentionCapture:
    """Collects the chosen joint blocks' maps during one pass (module doc for the host's part)."""

    StopForward = StopForward

    def __init__(self, blocks: Sequence[int], stop_after_last: bool = True):
        if not blocks:
            raise CaptureError("no joint blocks to capture")
        self.blocks = tuple(blocks)
        self.stop_after_last = stop_after_last
        self.latent_hw: Optional[tuple[int, int]] = None
        self._active = False
        self._probs: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def capturing(self, latent_hw: Sequence[int]) -> Iterator["JointAttentionCapture"]:
        """Record inside the block only; ``latent_hw``: the latent's (h, w)."""
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self._active = True
        self.reset()
        try:
            yield self
        finally:
            self._active = False

    def reset(self) -> None:
        self._probs.clear()

    def wants(self, block: int) -> bool:
        """Whether ``record`` would keep this block's attention now (lets a host skip its work)."""
        return self._active and block in self.blocks and block not in self._probs

    def record(self, block: int, query: torch.Tensor, key: torch.Tensor, n_text: int,
               heads: Optional[int] = None, n_image: Optional[int] = None) -> None:
        """Keep block ``block``'s map; ``n_image``: the image tokens, to skip other attentions."""
        if not self.wants(block):
            return
        length = query.shape[1] if query.ndim == 3 else query.shape[2]
        if n_image is not None and length != n_text + n_image:
            return
        self._probs[block] = text_attention_probs(query, key, n_text, heads)
        if self.stop_after_last and len(self._probs) == len(self.blocks):
            raise StopForward()

    @property
    def maps(self) -> torch.Tensor:
        """(batch, text columns, h, w), averaged over the captured blocks."""
        if not self._probs:
            raise CaptureError("no chosen joint-attention block ran during the pass")
        if self.latent_hw is None:
            raise CaptureError("maps read outside capturing()")
        per_block = []
        for probs in self._probs.values():
            h, w = layer_hw(probs.shape[1], self.latent_hw)
            per_block.append(probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h, w))
        return torch.stack(per_block).mean(dim=0)
