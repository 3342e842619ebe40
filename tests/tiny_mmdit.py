"""A tiny joint-attention (MM-DiT) denoiser for the host-free tests: real torch modules, real
gradients, the interfaces of ComfyUI's MMDiT and Flux double blocks where the engine meets them.

Like theirs: the latent is cut into 2x2 patches (row-major image tokens); each block projects the
text and the image tokens to queries, keys and values separately, concatenates them TEXT FIRST
and runs ONE attention over the joint sequence, calling ``attention(block, q, k, v, heads)`` with
``(B, L, heads * D)`` tensors (MMDiT's layout) where a host hooks in; the output is a velocity
(flow matching). ComfyUI's own classes cannot be imported in CI.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def plain_attention(block: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    heads: int) -> torch.Tensor:
    batch, length, width = query.shape
    q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)


class JointBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.text_qkv, self.image_qkv = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, 3 * hidden)
        self.text_out, self.image_out = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.image_mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, text: torch.Tensor, image: torch.Tensor, index: int, attention: Attention):
        text_q, text_k, text_v = self.text_qkv(text).chunk(3, dim=-1)
        image_q, image_k, image_v = self.image_qkv(image).chunk(3, dim=-1)
        joint = attention(index, torch.cat([text_q, image_q], 1), torch.cat([text_k, image_k], 1),
                          torch.cat([text_v, image_v], 1), self.heads)
        n_text = text.shape[1]
        text = text + self.text_out(joint[:, :n_text])
        image = image + self.image_out(joint[:, n_text:])
        return text, image + self.image_mlp(image)


class TinyMMDiT(nn.Module):
    """``forward(x, sigma, context, attention=None)``: x (B, C, H, W), sigma (B,), context (B, T, D)."""

    def __init__(self, channels: int = 4, hidden: int = 64, heads: int = 2, depth: int = 3, context_dim: int = 32,
                 patch: int = 2, seed: int = 0):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.patch, self.channels = patch, channels
        self.image_in = nn.Linear(channels * patch * patch, hidden)
        self.text_in = nn.Linear(context_dim, hidden)
        self.sigma_in = nn.Linear(1, hidden)
        self.position = nn.Parameter(torch.randn(1, 256, hidden) * 0.5)
        self.joint_blocks = nn.ModuleList(JointBlock(hidden, heads) for _ in range(depth))
        self.final = nn.Linear(hidden, channels * patch * patch)
        torch.random.set_rng_state(generator_state)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                attention: Optional[Attention] = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        p = self.patch
        tokens = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(batch, (height // p) * (width // p), channels * p * p)
        image = self.image_in(tokens) + self.position[:, :tokens.shape[1]] + self.sigma_in(sigma.reshape(-1, 1, 1))
        text = self.text_in(context)
        for index, block in enumerate(self.joint_blocks):
            text, image = block(text, image, index, attention or plain_attention)
        out = self.final(image).reshape(batch, height // p, width // p, channels, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)
