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

__all__ = [
    "cross_attention_layers",
    "select_layers",
    "Recorder",
    "ScoringAttnProcessor",
    "build_scoring_processors",
    "installed",
    "scoring_processors",
]


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
        raise ModelError(
            "the UNet has no cross-attention layers; DSD needs an SD2-architecture (text-conditioned) UNet"
        )
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


class _AdaptedProjections:
    """Shared by the processors: the attention's own projections plus an adapter's deltas, if any."""

    def __init__(self, name: str, adapter=None):
        self.name = name
        self.adapter = adapter

    def project(self, layer, projection: str, inputs: torch.Tensor) -> torch.Tensor:
        out = layer(inputs)
        if self.adapter is not None:
            delta = self.adapter.delta(self.name, projection, inputs)
            if delta is not None:
                out = out + delta
        return out

    def prepare(self, attn, hidden_states, encoder_hidden_states, temb):
        """The input handling of diffusers' AttnProcessor2_0, step for step."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = None
        if hidden_states.ndim == 4:
            shape = hidden_states.shape
            hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self.project(attn.to_q, "q", hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self.project(attn.to_k, "k", encoder_hidden_states)
        value = self.project(attn.to_v, "v", encoder_hidden_states)
        batch = hidden_states.shape[0]
        head_dim = key.shape[-1] // attn.heads
        heads = [t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)]
        return heads, shape

    def finish(self, attn, hidden_states, residual, shape):
        batch, heads, _, head_dim = hidden_states.shape
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        hidden_states = self.project(attn.to_out[0], "out", hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ScoringAttnProcessor(_AdaptedProjections):
    """Explicit cross-attention that records its scaled logits and probabilities.

    Numerically the layer's output is the default attention's (``softmax(QKᵀ·scale) V``), with the logits and
    softmax in fp32 so fp16/bf16 UNets score in fp32 ("fp32 islands"). An adapter's deltas, if given, are added
    to the projections.
    """

    def __init__(self, index: int, recorder: Recorder, name: str = "", adapter=None):
        super().__init__(name, adapter)
        self.index = index
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError("ScoringAttnProcessor is for cross-attention (attn2) layers only")
        residual = hidden_states
        (query, key, value), shape = self.prepare(attn, hidden_states, encoder_hidden_states, temb)
        with torch.autocast(device_type=query.device.type, enabled=False):  # the fp32 island
            logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
            probs = torch.softmax(logits, dim=-1)
            self.recorder.record(self.index, logits, probs)
        hidden_states = torch.matmul(probs.to(value.dtype), value)
        return self.finish(attn, hidden_states, residual, shape)


class AdaptedAttnProcessor(_AdaptedProjections):
    """diffusers' SDPA attention with an adapter's deltas on the projections (LoRA on unscored layers)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        (query, key, value), shape = self.prepare(attn, hidden_states, encoder_hidden_states, temb)
        if attention_mask is not None:
            batch, length = value.shape[0], value.shape[2]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        hidden_states = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        ).to(query.dtype)
        return self.finish(attn, hidden_states, residual, shape)


def build_scoring_processors(unet, recorder: Recorder, adapter=None) -> dict:
    """The processor of every attention layer of ``unet``: scoring processors on ``recorder.layer_names``, the
    adapter's processors on the other layers it touches, the current ones elsewhere (for :func:`installed`)."""
    current = dict(unet.attn_processors)
    wanted = {f"{name}.processor": i for i, name in enumerate(recorder.layer_names)}
    unknown = set(wanted) - set(current)
    if unknown:
        raise ModelError(f"the UNet has no attention layer(s) {sorted(unknown)}")
    adapted = {f"{name}.processor" for name in (adapter.layer_names if adapter is not None else [])}
    processors = {}
    for name, processor in current.items():
        module = name.removesuffix(".processor")
        if name in wanted:
            processors[name] = ScoringAttnProcessor(wanted[name], recorder, module, adapter)
        elif name in adapted:
            processors[name] = AdaptedAttnProcessor(module, adapter)
        else:
            processors[name] = processor
    return processors


@contextlib.contextmanager
def installed(unet, processors: dict) -> Iterator[None]:
    """Install ``processors`` (from :func:`build_scoring_processors`) for the duration of the block, then restore
    the originals. Installing the same processor objects again keeps a compiled UNet's guards valid."""
    originals = dict(unet.attn_processors)
    unet.set_attn_processor(dict(processors))  # diffusers pops the entries of the dict it is given
    try:
        yield
    finally:
        unet.set_attn_processor(originals)


@contextlib.contextmanager
def scoring_processors(unet, recorder: Recorder, adapter=None) -> Iterator[Recorder]:
    """Install scoring processors on ``recorder.layer_names`` (and the adapter's processors on the other layers it
    touches) for the duration of the block, then restore the originals."""
    with installed(unet, build_scoring_processors(unet, recorder, adapter)):
        yield recorder
