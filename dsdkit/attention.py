"""Cross-attention capture through diffusers attention processors (no fork, no patched diffusers source).

:func:`scoring_processors` installs a :class:`ScoringAttnProcessor` on the selected cross-attention (attn2)
layers of a UNet and leaves every other attention (attn1, unscored attn2) on its default (SDPA) processor. The
scoring processor computes the attention explicitly, ``P = softmax(QKᵀ/√d)`` with the logits in fp32, uses ``P``
for the layer's output exactly as the default processor would, and hands ``(L, P)`` to the :class:`Recorder`, which
pools them to one number per pair and layer. Whole maps are kept only on request (heat maps).

Layers are selected structurally, from the UNet's own block structure, so any SD2-architecture model works with
every layer set, including small test models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .config import LayerSet, ScoringConfig
from .errors import ModelError
from .pooling import pool_layer

__all__ = ["cross_attention_layers", "select_layers", "Recorder", "ScoringAttnProcessor", "scoring_processors"]


def _attn2_names(block, prefix: str) -> list[list[str]]:
    """Per attention of ``block``, the attn2 module names of its transformer blocks (in forward order)."""
    out = []
    for a, attention in enumerate(getattr(block, "attentions", None) or []):
        names = []
        for t, transformer_block in enumerate(getattr(attention, "transformer_blocks", [])):
            if getattr(transformer_block, "attn2", None) is not None:
                names.append(f"{prefix}.attentions.{a}.transformer_blocks.{t}.attn2")
        if names:
            out.append(names)
    return out


def cross_attention_layers(unet) -> dict[str, list[list[list[str]]]]:
    """attn2 names grouped by path ("down", "mid", "up") -> block -> attention -> transformer block."""
    down = [_attn2_names(b, f"down_blocks.{i}") for i, b in enumerate(unet.down_blocks)]
    mid = [_attn2_names(unet.mid_block, "mid_block")] if unet.mid_block is not None else []
    up = [_attn2_names(b, f"up_blocks.{i}") for i, b in enumerate(unet.up_blocks)]
    return {"down": down, "mid": mid, "up": up}


def select_layers(unet, layers: LayerSet) -> list[str]:
    """The scored attn2 layers, in forward order.

    ``last``: the last down block with cross-attention, the mid block and the last up block with cross-attention;
    in each, every attention's last transformer block (6 layers on SD2: down_blocks.2 x2, mid x1, up_blocks.3 x3).
    ``all``: every cross-attention layer (16 on SD2).
    """
    groups = cross_attention_layers(unet)
    selected: list[str] = []
    for path in ("down", "mid", "up"):
        blocks = [b for b in groups[path] if b]
        if not blocks:
            continue
        if layers is LayerSet.all:
            selected += [name for block in blocks for attention in block for name in attention]
        else:
            selected += [attention[-1] for attention in blocks[-1]]
    if not selected:
        raise ModelError("the UNet has no cross-attention layers; DSD needs an SD2-architecture (text-conditioned) UNet")
    return selected


@dataclass
class Recorder:
    """Collects per-layer pooled scores during one UNet forward.

    Set :attr:`mask` (``float32[B, T]`` kept text positions) before the forward; read :meth:`layer_scores` after.
    """

    layer_names: list[str]
    config: ScoringConfig
    keep_maps: bool = False
    mask: torch.Tensor | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    head_weights: dict[int, torch.Tensor] = field(default_factory=dict)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)

    def reset(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.scores.clear()
        self.head_weights.clear()
        self.maps.clear()

    def record(self, index: int, logits: torch.Tensor, probs: torch.Tensor) -> None:
        if self.mask is None:
            raise RuntimeError("Recorder.reset(mask) must be called before the UNet forward")
        score, _, weights = pool_layer(logits, probs, self.mask, self.config)
        self.scores[index] = score
        self.head_weights[index] = weights
        if self.keep_maps:
            self.maps[index] = probs.mean(dim=1)  # [B, n, T], head mean

    def layer_scores(self) -> torch.Tensor:
        """``float32[B, n_layers]`` in :attr:`layer_names` order."""
        missing = [self.layer_names[i] for i in range(len(self.layer_names)) if i not in self.scores]
        if missing:
            raise RuntimeError(f"scored layers did not run: {missing}")
        return torch.stack([self.scores[i] for i in range(len(self.layer_names))], dim=-1)


class ScoringAttnProcessor:
    """Explicit cross-attention that records its scaled logits and probabilities.

    Numerically the layer's output is the default attention's (``softmax(QKᵀ·scale) V``), with the logits and
    softmax in fp32 so fp16/bf16 UNets score in fp32 ("fp32 islands").
    """

    def __init__(self, index: int, recorder: Recorder):
        self.index = index
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            raise RuntimeError("ScoringAttnProcessor is for cross-attention (attn2) layers only")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, n, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, T, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        probs = torch.softmax(logits, dim=-1)
        self.recorder.record(self.index, logits, probs)

        hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def scoring_processors(unet, recorder: Recorder) -> Iterator[Recorder]:
    """Install scoring processors on ``recorder.layer_names`` for the duration of the block, then restore."""
    originals = dict(unet.attn_processors)
    wanted = {f"{name}.processor": i for i, name in enumerate(recorder.layer_names)}
    unknown = set(wanted) - set(originals)
    if unknown:
        raise ModelError(f"the UNet has no attention layer(s) {sorted(unknown)}")
    processors = {
        name: ScoringAttnProcessor(wanted[name], recorder) if name in wanted else processor
        for name, processor in originals.items()
    }
    unet.set_attn_processor(processors)
    try:
        yield recorder
    finally:
        unet.set_attn_processor(originals)
