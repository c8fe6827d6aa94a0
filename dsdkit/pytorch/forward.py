"""The scoring forward: the one place where a UNet batch becomes DSD terms.

:class:`ScoringForward` owns every part of it: the attention processors and their installation, the per-call
recording of each scored layer's pooled attention, the noising, the UNet pass, the noise error, and the
combination of terms (:meth:`ScoringForward.combine`). The Scorer, the trainer, ``explain``, ``bench``, the export
graphs and ``torch.compile`` (:mod:`dsdkit.pytorch.acceleration`) all call it; nothing else builds a recorder or
installs a processor.

Why it is safe to share: the processors (:class:`DSDAttnProcessor`) are installed on a UNet once and keep no state.
Everything a call needs (which layers it scores, the token mask, the adapter and its image condition) and everything
it records travels in a :class:`ForwardCall` made for that call and handed to the processors through diffusers'
``cross_attention_kwargs``. Two threads (or two scorers with other configs or adapters) can run the same UNet at the
same time, and a UNet called without a ``ForwardCall`` is diffusers' default SDPA attention. Installing is the one
step that changes the UNet; it is done once, under a lock (:func:`install_processors`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ..runtime.config import ScoringConfig
from ..runtime.errors import ModelError
from ..runtime.scoring import combine_terms
from .attention import select_layers
from .pooling import pool_layer

__all__ = ["ScoringForward", "ForwardCall", "DSDAttnProcessor", "Noising", "install_processors", "context_mask"]

#: The ``cross_attention_kwargs`` key the per-call state travels under.
CALL_KEYWORD = "dsd_call"

# Installing is check-then-replace: without the lock, threads building scorers on one fresh UNet at once would each
# see the default processors and each replace them. One lock for every UNet is enough: it is taken once per forward
# built, for a walk over the attention layers.
_INSTALL_LOCK = threading.Lock()


@dataclass
class ForwardCall:
    """The state of one UNet forward: what it scores and what it recorded. Made per call, never stored on the UNet.

    Attributes:
        layer_index: scored attn2 module name -> its position in the layer axis.
        adapted: attention modules the adapter adds deltas to.
        config: the pooling definition (pooling, λ, heads).
        mask: ``float32[B, T]`` kept text positions.
        adapter: the adapter, or ``None``.
        condition: a conditioned adapter's per-sample condition ``[B, r]``.
        keep_maps: also keep each scored layer's head-mean probabilities ``[B, n, T]`` (heat maps).
    """

    layer_index: dict[str, int]
    adapted: frozenset[str]
    config: ScoringConfig
    mask: torch.Tensor
    adapter: Any = None
    condition: torch.Tensor | None = None
    keep_maps: bool = False
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    head_weights: dict[int, torch.Tensor] = field(default_factory=dict)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, index: int, logits: torch.Tensor, probs: torch.Tensor) -> None:
        score, _, weights = pool_layer(logits, probs, self.mask, self.config)
        self.scores[index] = score
        self.head_weights[index] = weights
        if self.keep_maps:
            self.maps[index] = probs.mean(dim=1)

    def layer_scores(self) -> torch.Tensor:
        """``float32[B, L]`` in layer order."""
        missing = [name for name, i in self.layer_index.items() if i not in self.scores]
        if missing:
            raise ModelError(
                f"scored layers did not run: {missing}; another attention processor replaced dsdkit's on this UNet"
            )
        return torch.stack([self.scores[i] for i in range(len(self.layer_index))], dim=-1)

    def project(self, name: str, layer, projection: str, inputs: torch.Tensor) -> torch.Tensor:
        """``layer(inputs)`` plus the adapter's delta for ``<name>.to_<projection>``, if it has one."""
        out = layer(inputs)
        if self.adapter is not None and name in self.adapted:
            delta = self.adapter.delta(name, projection, inputs, self.condition)
            if delta is not None:
                out = out + delta
        return out


class _PlainCall:
    """The projections of a UNet call outside a scoring forward (no adapter): each layer as it is."""

    @staticmethod
    def project(name: str, layer, projection: str, inputs: torch.Tensor) -> torch.Tensor:
        return layer(inputs)


_PLAIN = _PlainCall()


class DSDAttnProcessor:
    """The attention processor dsdkit installs on every attention layer, once; it keeps no state.

    Without a :class:`ForwardCall`, or on a layer the call neither scores nor adapts, it is diffusers'
    :class:`AttnProcessor2_0`. On a scored cross-attention layer it computes ``P = softmax(QKᵀ·scale)`` explicitly
    with the logits and softmax in fp32 (so fp16/bf16 UNets score in fp32, the "fp32 islands" of the export), uses
    ``P`` for the layer's output exactly as the default would, and records the pooled score. On an adapted layer it
    adds the adapter's deltas to the projections.
    """

    def __init__(self, name: str):
        self.name = name
        self.default = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        dsd_call: ForwardCall | None = None,
        **kwargs,
    ):
        index = None if dsd_call is None else dsd_call.layer_index.get(self.name)
        plain = dsd_call is None or (index is None and self.name not in dsd_call.adapted)
        if plain and attention_mask is None:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        # A masked context (a model that attends to its word tokens) takes the path below on every layer: diffusers'
        # own processor repeats the mask per head and reshapes it, which torch.export cannot follow under a dynamic
        # batch; broadcasting the bias is the same attention and exports.
        call = _PLAIN if dsd_call is None else dsd_call
        residual = hidden_states
        (query, key, value), shape = self._prepare(call, attn, hidden_states, encoder_hidden_states, temb)
        if index is not None:
            if encoder_hidden_states is None:
                raise ModelError(f"{self.name} is scored but is not a cross-attention (attn2) layer")
            # The fp32 island; with autocast off already there is nothing to switch (entering it would only cost
            # the exporters a traced context per layer).
            island = (
                torch.autocast(device_type=query.device.type, enabled=False)
                if torch.is_autocast_enabled(query.device.type)
                else contextlib.nullcontext()
            )
            with island:
                logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
                if attention_mask is not None:  # a masked context: diffusers' additive bias [B, 1, T]
                    logits = logits + attention_mask.float().view(logits.shape[0], 1, 1, logits.shape[-1])
                probs = torch.softmax(logits, dim=-1)
                dsd_call.record(index, logits, probs)
            hidden_states = torch.matmul(probs.to(value.dtype), value)
        else:
            if attention_mask is not None and attention_mask.ndim == 3 and attention_mask.shape[1] == 1:
                # diffusers' additive bias of an encoder attention mask, [B, 1, T]: one row for every head and query
                attention_mask = attention_mask.view(attention_mask.shape[0], 1, 1, attention_mask.shape[-1])
            elif attention_mask is not None:
                batch, length = value.shape[0], value.shape[2]
                attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
                attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            hidden_states = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            ).to(query.dtype)
        return self._finish(call, attn, hidden_states, residual, shape)

    def _prepare(self, call: ForwardCall, attn, hidden_states, encoder_hidden_states, temb):
        """The input handling of diffusers' AttnProcessor2_0, step for step, with the adapter's deltas."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = None
        if hidden_states.ndim == 4:
            shape = hidden_states.shape
            hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = call.project(self.name, attn.to_q, "q", hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = call.project(self.name, attn.to_k, "k", encoder_hidden_states)
        value = call.project(self.name, attn.to_v, "v", encoder_hidden_states)
        batch = hidden_states.shape[0]
        head_dim = key.shape[-1] // attn.heads
        heads = [t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)]
        return heads, shape

    def _finish(self, call: ForwardCall, attn, hidden_states, residual, shape):
        batch, heads, _, head_dim = hidden_states.shape
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        hidden_states = call.project(self.name, attn.to_out[0], "out", hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_processors(unet) -> set[str]:
    """Put a :class:`DSDAttnProcessor` on every attention layer of ``unet`` (once; a no-op when they are there, also
    when several threads install at the same time).

    Returns the attention modules' names."""
    with _INSTALL_LOCK:
        current = unet.attn_processors
        if not all(isinstance(p, DSDAttnProcessor) for p in current.values()):
            unet.set_attn_processor({name: DSDAttnProcessor(name.removesuffix(".processor")) for name in current})
    return {name.removesuffix(".processor") for name in current}


class Noising(NamedTuple):
    """How each sample of a UNet batch is noised: ``x_t = signal · z0 + noise_scale · noise`` at ``timesteps``.

    Attributes:
        signal, noise_scale: ``sqrt(ā_t)`` and ``sqrt(1 - ā_t)``, ``float32[B]``.
        noise: ``ε``, ``float32[B, C, h, w]`` (the scorer's fixed noise bank at each sample's timestep index).
        timesteps: ``t``, ``int64[B]``.
    """

    signal: torch.Tensor
    noise_scale: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def context_mask(masks: torch.Tensor, context_tokens: str) -> torch.Tensor | None:
    """What the cross-attention attends to, ``[B, T]`` (``None``: everything), from the pooled positions ``masks``.

    A model that declares a masked context (``runtime.tokenizer.CONTEXTS``) is scored over its word tokens (or its
    whole fallback context, for a caption without words: ``context_pool_mask``), and attends to exactly those under
    ``words``, and to those and BOS under ``bos-words``. Computed here, inside the forward, so the exported scorer
    graph and ``explain`` attend exactly as the PyTorch scorer does from the same ``token_mask`` input."""
    if context_tokens == "all":
        return None
    if context_tokens == "bos-words":
        bos = torch.zeros_like(masks)
        bos[:, 0] = 1.0
        return torch.maximum(masks, bos)
    return masks


class ScoringForward:
    """The scoring forward of one (model, scoring config, adapter): one UNet batch -> per-layer attention terms and
    the noise error. Differentiable (the trainer calls it with gradients on) and traceable (the exporter traces it).

    Args:
        model: the frozen SD2 model.
        config: the scoring config; the forward uses its layer set and pooling definition, :meth:`combine` its
            switches.
        adapter: optional adapter (:mod:`dsdkit.pytorch.adapters`).
        layer_names: the scored layers (default: the config's layer set on this UNet).
    """

    def __init__(self, model, config: ScoringConfig, adapter=None, layer_names: Sequence[str] | None = None):
        self.model = model
        self.config = config
        self.adapter = adapter
        self.layer_names = list(layer_names or select_layers(model.unet, config.layers))
        modules = install_processors(model.unet)
        unknown = [name for name in self.layer_names if name not in modules]
        if unknown:
            raise ModelError(f"the UNet has no attention layer(s) {unknown}")
        self._layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self._adapted = frozenset(adapter.layer_names) if adapter is not None else frozenset()

    def with_adapter(self, adapter) -> ScoringForward:
        return ScoringForward(self.model, self.config, adapter, self.layer_names)

    def __call__(
        self, latents, noising: Noising, states, masks, condition=None, autocast: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch.

        Args:
            latents: ``z0`` ``float32[B, C, h, w]``.
            noising: how each sample is noised (:class:`Noising`).
            states, masks: text states ``[B, T, D]`` and kept-token masks ``[B, T]``.
            condition: a conditioned adapter's per-sample condition; default: ``adapter.condition(latents)``.
            autocast: run fp16/bf16 models under autocast (off when exporting: the weights are already half).

        Returns:
            ``(layer_scores float32[B, L], ‖ε − ε̂(x_t, c)‖₂ float32[B])``.
        """
        layers, errors, _ = self.trace(latents, noising, states, masks, condition, autocast=autocast)
        return layers, errors

    def trace(
        self, latents, noising: Noising, states, masks, condition=None, autocast: bool = True, keep_maps: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardCall]:
        """:meth:`__call__`, also returning the :class:`ForwardCall` (per-layer head weights and, with
        ``keep_maps``, the head-mean attention maps: what ``dsdkit explain`` draws)."""
        if self.adapter is not None and self.adapter.conditioned and condition is None:
            condition = self.adapter.condition(latents)
        call = ForwardCall(
            self._layer_index, self._adapted, self.config, masks, self.adapter, condition, keep_maps=keep_maps
        )
        signal, noise_scale = noising.signal.view(-1, 1, 1, 1), noising.noise_scale.view(-1, 1, 1, 1)
        noise, timesteps = noising.noise, noising.timesteps
        noisy = signal * latents + noise_scale * noise
        model = self.model
        dtype = model.precision.torch_dtype
        # fp16/bf16: weights are stored in that precision and autocast runs the remaining fp32 ops (an adapter's fp32
        # factors, say) in it too; the processors switch autocast off for their fp32 logits and pooling.
        enabled = autocast and dtype != torch.float32
        precision = (
            torch.autocast(device_type=model.device.type, dtype=dtype, enabled=enabled)
            if enabled or torch.is_autocast_enabled(model.device.type)
            else contextlib.nullcontext()
        )
        with precision:
            output = model.unet(
                noisy.to(dtype),
                timesteps,
                encoder_hidden_states=states.to(dtype),
                encoder_attention_mask=context_mask(masks, model.context_tokens),
                cross_attention_kwargs={CALL_KEYWORD: call},
            ).sample.float()
        if model.prediction_type == "v_prediction":
            output = signal * output + noise_scale * noisy  # ε = sqrt(ā) v + sqrt(1 - ā) x_t
        error = (noise - output).flatten(1).norm(dim=1)
        return call.layer_scores(), error, call

    def combine(self, layers, errors, uncond_layers=None, uncond_errors=None):
        """Per-timestep scores from the terms (:func:`dsdkit.runtime.scoring.combine_terms` with this config)."""
        return combine_terms(self.config, layers, errors, uncond_layers, uncond_errors)
