"""Edits of a diffusers UNet's or SD3 transformer's attention while it samples: what the methods
built on Stable Diffusion do to its attention, applied to any benchmark model
(``benchmark.commands.fidelity``).

``EditedAttention`` (a UNet's cross- and self-attention) and ``EditedJointAttention`` (an SD3
block's joint attention) are attention processors that compute ``softmax(Q K^T * scale)``
explicitly and pass the scores (before the softmax) and the probabilities (after it) through a list
of ``AttentionEdit``s, then renormalise each row over all its keys (an edit may take probability
away); with no edit active each is the layer's own attention. ``editable_layers`` names where they
go, ``edited`` puts them there. Four edits:

* ``StripConfinement``: each entity's columns (its word and its attributes) get no attention
  outside the entity's strip, and each pixel's row is renormalised: forced maps, the most a change
  to ``to_k`` could ever achieve (Separate-and-Enhance trains ``to_k``).
* ``DenseModulation``: DenseDiffusion's pre-softmax modulation (Kim et al. 2023, Eq. 5-7).
* ``MapRecorder`` / ``MapReplay``: Prompt-to-Prompt's map injection (Hertz et al. 2022): the
  probabilities recorded in one sampling replace those of another.

Every edit acts on the conditional rows only (the first ``rows`` images of the guided batch, as
``ela_ext.diffusers_adapter.sample`` and ``sample_flow`` order it) and only while ``active``, which
the sampling loop's ``on_step`` sets with the step and the time. A layout is one vertical strip per
entity (entity i of n: the i-th strip); a map's side comes from its pixel count (an MM-DiT's: its
image tokens), so any square latent and any UNet layout work.

On a joint block the edits see what a UNet layer gives them (``EditedJointAttention``): the image
queries' text keys as cross-attention, their image keys as self-attention, each a distribution over
its own keys; the text queries are never edited.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ela_ext.capture import is_cross_attention
from ela_ext.tokens import EntityColumns, ResolvedEntity

ROW_FLOOR = 1e-12  # the least sum a row is divided by: a row (or part) with nothing left stays zero, not NaN


def strip_masks(count: int, side: int) -> torch.Tensor:
    """(count, side * side): entity i's vertical strip of a side x side map, flattened row-major."""
    xs = (torch.arange(side) + 0.5) / side
    strips = torch.stack([((xs >= i / count) & (xs < (i + 1) / count)).float() for i in range(count)])
    return strips[:, None, :].expand(count, side, side).reshape(count, side * side)


def map_side(pixels: int) -> int:
    side = int(round(pixels ** 0.5))
    if side * side != pixels:
        raise ValueError(f"an attention map of {pixels} pixels is not square")
    return side


def entity_columns(entity: ResolvedEntity) -> list[int]:
    """The entity word's columns and those of the attributes bound to it."""
    return list(entity.columns) + [column for attribute in entity.attributes for column in attribute.columns]


class AttentionEdit:
    """Changes nothing; subclasses override ``scores`` and/or ``probs``. ``rows``: conditional
    images at the head of the batch. ``at_step`` is called by the sampling loop before each step."""

    def __init__(self, rows: int):
        self.rows = rows
        self.active = False
        self.step = 0
        self.time = 1.0  # t / T of the step: 1 is pure noise

    def at_step(self, step: int, time: float, active: bool) -> None:
        self.step, self.time, self.active = step, time, active

    def scores(self, layer: str, scores: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        return scores

    def probs(self, layer: str, probs: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        return probs


class StripConfinement(AttentionEdit):
    """Forced cross-attention maps: entity i's columns keep their probability inside strip i and
    lose it outside; the processor renormalises each row over all its keys, so the other keys take
    the rest (a UNet's cross-attention row: the other columns; a joint row: the other text columns
    and the image keys alike, each in proportion to what it had)."""

    def __init__(self, targets: Sequence[EntityColumns]):
        super().__init__(len(targets))
        self.targets = list(targets)

    def probs(self, layer: str, probs: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        if not (cross and self.active):
            return probs
        probs = probs.clone()
        side = map_side(probs.shape[1])
        for row, target in enumerate(self.targets):
            strips = strip_masks(len(target.entities), side).to(probs)
            for strip, entity in zip(strips, target.entities):
                probs[row * heads:(row + 1) * heads, :, entity_columns(entity)] *= strip[None, :, None]
        return probs


class DenseModulation(AttentionEdit):
    """DenseDiffusion's attention modulation (Kim et al. 2023, Eq. 5-7, with the official code's
    defaults): for a query-key pair in the same segment the score rises by
    ``w * lambda_t * (1 - area) * (max - s)``, for a pair in different segments it falls by
    ``w * lambda_t * (1 - area) * (s - min)``, where ``max``/``min`` are the query row's score
    range, ``area`` the share of the map the query's segment covers (small segments are pushed
    harder) and ``lambda_t = (t / T)^5`` (strong while the layout forms, gone by mid-sampling).
    Cross-attention (``w = 1.0``): the pairs are (pixel, an entity's column), in the same segment
    when the pixel lies in that entity's strip; other columns are left alone (the official code also
    lowers every column outside a segment everywhere, start-of-text included: here only the entity
    columns are steered, as in part a). Self-attention (``w = 0.3``): pixel pairs in the same strip.
    On a joint block: the image rows' text keys as cross-attention, their image keys as
    self-attention, ``max``/``min`` over the keys of the part modulated (text or image).
    """

    def __init__(self, targets: Sequence[EntityColumns], cross_weight: float = 1.0, self_weight: float = 0.3,
                 time_power: float = 5.0):
        super().__init__(len(targets))
        self.targets = list(targets)
        self.cross_weight, self.self_weight, self.time_power = cross_weight, self_weight, time_power

    def segments(self, target: EntityColumns, side: int, keys: int, cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(same, named), each (pixels, keys) bool: pairs in the same segment, and pairs modulated."""
        strips = strip_masks(len(target.entities), side).bool()
        if not cross:
            same = (strips[:, :, None] & strips[:, None, :]).any(0)
            return same, torch.ones_like(same)
        same = torch.zeros(side * side, keys, dtype=torch.bool)
        named = torch.zeros_like(same)
        for strip, entity in zip(strips, target.entities):
            columns = entity_columns(entity)
            same[:, columns] |= strip[:, None]
            named[:, columns] = True
        return same, named

    def scores(self, layer: str, scores: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        if not self.active:
            return scores
        strength = (self.cross_weight if cross else self.self_weight) * self.time ** self.time_power
        scores = scores.clone()
        side = map_side(scores.shape[1])
        for row, target in enumerate(self.targets):
            same, named = (m.to(scores.device) for m in self.segments(target, side, scores.shape[2], cross))
            strips = strip_masks(len(target.entities), side).to(scores)
            area = (strips * strips.sum(1, keepdim=True)).sum(0) / (side * side)  # per pixel: its strip's share
            size = (1 - area)[:, None]
            block = scores[row * heads:(row + 1) * heads]
            high, low = block.max(-1, keepdim=True).values, block.min(-1, keepdim=True).values
            raised = block + strength * size * (high - block)
            lowered = block - strength * size * (block - low)
            modulated = torch.where(same, raised, lowered)
            scores[row * heads:(row + 1) * heads] = torch.where(named, modulated, block)
        return scores


class MapRecorder(AttentionEdit):
    """Keeps the conditional rows' cross-attention probabilities of every layer at every active
    step, keyed by (step, layer). On a joint block: the image rows' text part renormalised over the
    text columns, the maps ``ela_ext.joint_attention`` reads (per head)."""

    def __init__(self, rows: int):
        super().__init__(rows)
        self.maps: dict[tuple[int, str], torch.Tensor] = {}

    def probs(self, layer: str, probs: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        if cross and self.active:
            self.maps[(self.step, layer)] = probs[:self.rows * heads].detach().clone()
        return probs


class MapReplay(AttentionEdit):
    """Replaces the conditional rows' cross-attention probabilities with recorded ones (Prompt-to-
    Prompt's injection) at every active step and layer that has a record. On a joint block the
    recorded text distribution takes each image row's own text mass: only where the row's text
    attention goes changes, not how much of it there is; its image part is untouched."""

    def __init__(self, maps: dict[tuple[int, str], torch.Tensor], rows: int):
        super().__init__(rows)
        self.maps = maps

    def probs(self, layer: str, probs: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        recorded = self.maps.get((self.step, layer)) if cross and self.active else None
        if recorded is None:
            return probs
        probs = probs.clone()
        probs[:self.rows * heads] = recorded.to(probs)
        return probs


class EditedAttention:
    """A diffusers attention processor: the layer's own attention, computed explicitly in fp32 so
    the scores and probabilities can pass through ``edits`` in order."""

    def __init__(self, layer: str, edits: Sequence[AttentionEdit]):
        self.layer, self.edits = layer, list(edits)

    def probs(self, scores: torch.Tensor, heads: int, cross: bool) -> torch.Tensor:
        """The softmax of ``scores`` (batch * heads, queries, keys) with the edits, each row
        renormalised over its keys after them."""
        for edit in self.edits:
            scores = edit.scores(self.layer, scores, heads, cross)
        probs = scores.softmax(-1)
        for edit in self.edits:
            probs = edit.probs(self.layer, probs, heads, cross)
        return probs / probs.sum(-1, keepdim=True).clamp_min(ROW_FLOOR)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor]
                 = None, attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        """diffusers' ``AttnProcessor`` step by step (spatial and group norms, 4-d inputs, the
        residual), with ``probs`` for its softmax."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        cross = encoder_hidden_states is not None
        context = hidden_states if not cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        scores = query.float() @ key.float().transpose(-1, -2) * attn.scale
        if attention_mask is not None:
            scores = scores + attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0]).float()
        probs = self.probs(scores, attn.heads, cross)
        out = attn.batch_to_head_dim(torch.bmm(probs.to(value.dtype), value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class EditedJointAttention:
    """A diffusers joint-attention processor (SD3 / SD3.5's ``JointAttnProcessor2_0``: one softmax
    over image and text keys for image and text queries, image tokens first) computed explicitly in
    fp32 so its image rows can pass through ``edits`` (``probs``)."""

    def __init__(self, layer: str, edits: Sequence[AttentionEdit]):
        self.layer, self.edits = layer, list(edits)

    def probs(self, scores: torch.Tensor, image_tokens: int, heads: int) -> torch.Tensor:
        """The joint softmax of ``scores`` (batch * heads, queries, keys; image tokens first in both)
        with the edits on the image queries' rows: their text keys are the cross-attention
        (``cross=True``), their image keys the self-attention (``cross=False``).

        Scores: each part as it is. Probabilities: each part renormalised over its own keys (a
        distribution, as a UNet layer's row is; the text part is the map ``ela_ext.joint_attention``
        reads); the edited parts go back in at the row's own text and image masses and the row is
        renormalised over all keys. So a replaced text part keeps the row's text mass, and
        probability an edit takes away goes to every key of the row in proportion. The text
        queries' rows are the plain softmax."""
        image, text = slice(0, image_tokens), slice(image_tokens, None)
        parts = {True: text, False: image}
        scores = scores.clone()
        for edit in self.edits:
            for cross, keys in parts.items():
                scores[:, image, keys] = edit.scores(self.layer, scores[:, image, keys], heads, cross)
        probs = scores.softmax(-1)
        masses = {cross: probs[:, image, keys].sum(-1, keepdim=True) for cross, keys in parts.items()}
        shares = {cross: probs[:, image, keys] / masses[cross].clamp_min(ROW_FLOOR) for cross, keys in parts.items()}
        for edit in self.edits:
            for cross in shares:
                shares[cross] = edit.probs(self.layer, shares[cross], heads, cross)
        rows = torch.cat([shares[False] * masses[False], shares[True] * masses[True]], -1)
        return torch.cat([rows / rows.sum(-1, keepdim=True).clamp_min(ROW_FLOOR), probs[:, text]], 1)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``JointAttnProcessor2_0`` step by step (the text's added projections, the q/k
        norms, ``to_add_out`` but in the context-pre-only last block; it ignores the other arguments
        too), with ``probs`` for its softmax."""
        batch, image_tokens = hidden_states.shape[:2]

        def heads_apart(tensor: torch.Tensor) -> torch.Tensor:  # (B, L, heads * D) -> (B, heads, L, D)
            return tensor.view(batch, -1, attn.heads, tensor.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads_apart(project(hidden_states)) for project in (attn.to_q, attn.to_k, attn.to_v))
        text_query, text_key, text_value = (heads_apart(project(encoder_hidden_states))
                                            for project in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query, key, value = (torch.cat(pair, 2) for pair in ((query, text_query), (key, text_key), (value, text_value)))
        scores = query.float() @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5  # SDPA's scale
        probs = self.probs(scores.flatten(0, 1), image_tokens, attn.heads).view(scores.shape)
        out = (probs.to(value.dtype) @ value).transpose(1, 2).flatten(2)
        image_out, text_out = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](image_out)), text_out


def attention_layers(unet: nn.Module, cross: bool) -> list[tuple[str, nn.Module]]:
    """The UNet's cross-attention layers (``cross``) or its self-attention ones, in module order."""
    return [(name, module) for name, module in unet.named_modules()
            if hasattr(module, "set_processor") and hasattr(module, "to_q")
            and is_cross_attention(name, module) == cross]


def editable_layers(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """Where the edits act: a UNet's cross- and self-attention layers, or an SD3 transformer's joint
    attention (each block's ``attn``; SD3.5's ``attn2`` attends among image tokens only)."""
    if hasattr(denoiser, "transformer_blocks"):
        return [(f"transformer_blocks.{index}.attn", block.attn)
                for index, block in enumerate(denoiser.transformer_blocks)]
    return attention_layers(denoiser, cross=True) + attention_layers(denoiser, cross=False)


@contextmanager
def edited(layers: Sequence[tuple[str, nn.Module]], edits: Sequence[AttentionEdit]) -> Iterator[None]:
    """``layers`` run ``EditedAttention`` (``EditedJointAttention`` where the text has queries of
    its own: joint attention) with ``edits`` inside the block; their own processors are back on
    every exit."""
    saved = [module.processor for _, module in layers]
    try:
        for name, module in layers:
            joint = getattr(module, "add_q_proj", None) is not None
            module.set_processor((EditedJointAttention if joint else EditedAttention)(name, edits))
        yield
    finally:
        for (_, module), processor in zip(layers, saved):
            module.set_processor(processor)
