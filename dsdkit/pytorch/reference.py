"""The reference cost: DSD computed the way the authors' code runs it, for side-by-side benchmarks.

What their pipeline does per image-caption pair: encode the caption and the empty
caption, then **for every timestep** encode the image with the VAE again, run the UNet on the doubled batch
``[x_t, x_t]`` with ``[∅, c]`` (an unconditional and a conditional half for *every pair*), with diffusers' eager
attention processor, which materialises every attention probability of every layer, and pool the scored layers.

Deliberately not a strawman: the arithmetic is the same as :class:`dsdkit.pytorch.scorer.Scorer`'s (posterior mean
rather than a random sample, the same seeded noise bank, per-pair scores rather than their batch average), so the
benchmark can check that the two agree (to ~1e-7) before it reports a ratio. Only the *cost structure* differs:
nothing is cached or shared.

For that check to say anything about the *math*, this module shares no scoring code with dsdkit: diffusers' stock
:class:`~diffusers.models.attention_processor.AttnProcessor` runs every attention layer, plain forward hooks on the
scored cross-attention modules recompute ``Q`` and ``K`` from the layer's own projections, and the token masks,
LogSumExp pooling, head weighting, noise prediction and denoising term are written out here from their definitions
(the knob table of :mod:`dsdkit.runtime.config`; the paper's Eq. 3-4 and 7). What it takes from the scorer is only
*input*: the model, the config, the scored layer names, the timestep table with its ``sqrt(ā_t)``/``sqrt(1 - ā_t)``
and the noise bank, plus dsdkit's image preprocessing and tokenizer (so both sides see the same pixels and ids).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..runtime.errors import ConfigError
from ..runtime.images import ImageInput, preprocess_image
from ..runtime.tokenizer import ROLE_BOS, ROLE_EOS, ROLE_WORD

__all__ = ["reference_scores"]


def reference_scores(
    scorer, images: Sequence[ImageInput], captions: Sequence[str], progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """``float64[N, M]`` scores of every pair, each computed from scratch the authors' way (see the module doc).

    ``scorer`` supplies the model, the scoring config, the scored layers, the timesteps and the noise bank;
    ``progress(n)`` is called with the UNet sample-evaluations of each pass (2 per pair and timestep).

    Every knob of :class:`~dsdkit.runtime.config.ScoringConfig` is honoured (both poolings, λ, token sets, layer sets
    via ``scorer.layer_names``, uniform and dynamic heads, both timestep schedules, the denoising term,
    ``uncond_in_attention``, ``normalize``). Adapters are refused: the stock processors cannot apply them.
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    if scorer.adapter is not None:
        raise ConfigError(
            "reference_scores: the reference runs diffusers' stock attention processors, which cannot apply a "
            "dsdkit adapter; benchmark the zero-shot model (no adapter)"
        )
    model, config = scorer.model, scorer.config
    _check_knobs(config)
    unet, device = model.unet, model.device
    dtype = model.precision.torch_dtype
    tokenizer = model.tokenizer
    uncond_in_attention = bool(config.uncond_in_attention)
    normalize_uncond = _knob(config, "normalize") == "uncond"
    pooled: dict[str, torch.Tensor] = {}
    keep = {"mask": None}  # the kept text positions of the batch being run, read by the hooks
    originals = dict(unet.attn_processors)
    handles = []
    scores = np.empty((len(images), len(captions)), dtype=np.float64)
    try:
        unet.set_attn_processor(AttnProcessor())  # eager: every probability of every layer is materialised
        for name in scorer.layer_names:
            hook = _pooling_hook(name, pooled, keep, config)
            handles.append(unet.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
        with torch.inference_mode():
            for i, image in enumerate(images):
                pixels = torch.from_numpy(preprocess_image(image, scorer.resolution, config.resize, index=i))[None]
                pixels = pixels.to(device, torch.float32)
                for j, caption in enumerate(captions):
                    tokens = [tokenizer.encode_empty(), tokenizer.encode(caption, where=f"caption #{j}")]
                    ids = torch.from_numpy(np.stack([t.ids for t in tokens])).to(device)
                    states = model.text_encoder(input_ids=ids).last_hidden_state.float()  # [∅, c], per pair
                    roles = np.stack([t.roles for t in tokens])
                    attended = _attended_positions(roles, model.context_tokens)
                    keep["mask"] = _kept_positions(roles, _knob(config, "tokens"), attended).to(device)
                    per_step = []
                    for k in range(len(scorer.timesteps)):
                        # VAE inside the timestep loop, as the authors' prepare_latents does.
                        z0 = model.vae.encode(pixels).latent_dist.mean * model.scaling_factor
                        signal, noise_scale, eps, t = scorer.noising(torch.tensor([k]))
                        x_t = signal.view(-1, 1, 1, 1) * z0 + noise_scale.view(-1, 1, 1, 1) * eps
                        pooled.clear()
                        # fp16/bf16 weights run under autocast (fp32 inputs and the hooks' casts follow it), as a
                        # diffusers pipeline runs a half-precision UNet.
                        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
                            prediction = unet(
                                x_t.expand(2, -1, -1, -1).to(dtype),
                                t.expand(2),
                                encoder_hidden_states=states.to(dtype),
                                encoder_attention_mask=None if attended is None else attended.to(device, dtype),
                            ).sample.float()
                        if model.prediction_type == "v_prediction":
                            # v = sqrt(ā) ε - sqrt(1 - ā) z0, so ε = sqrt(ā) v + sqrt(1 - ā) x_t.
                            prediction = signal.view(-1, 1, 1, 1) * prediction + noise_scale.view(-1, 1, 1, 1) * x_t
                        errors = (eps - prediction).flatten(1).norm(dim=1).double()  # [‖ε − ε̂(∅)‖, ‖ε − ε̂(c)‖]
                        missing = [name for name in scorer.layer_names if name not in pooled]
                        if missing:
                            raise RuntimeError(f"reference_scores: scored layers did not run: {missing}")
                        layers = torch.stack([pooled[name] for name in scorer.layer_names], dim=-1).double()
                        uncond, cond = layers[0], layers[1]  # [L] each
                        attention = 0.5 * (cond + uncond) if uncond_in_attention else cond
                        if normalize_uncond:
                            attention = attention - uncond
                        step = attention.mean() if config.attention_term else 0.0
                        if config.denoise_term:
                            step = step + errors[0] - errors[1]
                        per_step.append(float(step))
                        if progress is not None:
                            progress(2)
                    scores[i, j] = float(np.mean(per_step))
    finally:
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(originals)
    return scores


# The knob values written out below; a value added to ScoringConfig later is refused rather than silently mis-scored.
_IMPLEMENTED = {
    "pooling": ("text-lse", "image-lse"),
    "tokens": ("all", "words-eos", "words"),
    "heads": ("uniform", "dynamic"),
    "normalize": ("none", "uncond"),
}


def _knob(config, name: str) -> str:
    """A knob's value as its string (the config stores enums)."""
    value = getattr(config, name)
    return str(getattr(value, "value", value))


def _check_knobs(config) -> None:
    for knob, values in _IMPLEMENTED.items():
        value = _knob(config, knob)
        if value not in values:
            raise ConfigError(
                f"reference_scores: {knob}={value!r} is not implemented by the reference (it knows "
                f"{', '.join(values)}); benchmark with a config it implements"
            )


def _attended_positions(roles: np.ndarray, context: str):
    """bool ``[B, T]``: what a model that declares a masked cross-attention context (``dsdkit_model.json``) attends
    to, as it was trained: its word tokens (``words``; a caption without words, the empty one, keeps its whole
    context) or its word tokens and BOS (``bos-words``). ``None`` for ``all``: no mask. By role, never by id."""
    import torch

    if context == "all":
        return None
    roles = torch.from_numpy(np.asarray(roles, dtype=np.int64))
    words = roles == ROLE_WORD
    if context == "bos-words":
        return words | (roles == ROLE_BOS)
    return torch.where(words.any(dim=-1, keepdim=True), words, torch.ones_like(words))


def _kept_positions(roles: np.ndarray, tokens: str, attended=None):
    """bool ``[B, T]``: the text positions a token set keeps, decided by each position's role (never by id, since
    SD2 pads with ``"!"``). Under a masked context (``attended``) the model is scored over its word tokens, and a
    caption without words over what it attends to."""
    import torch

    roles = torch.from_numpy(np.asarray(roles, dtype=np.int64))
    if attended is not None:
        words = roles == ROLE_WORD
        return torch.where(words.any(dim=-1, keepdim=True), words, attended)
    if tokens == "all":
        return torch.ones(roles.shape, dtype=torch.bool)
    if tokens == "words-eos":
        return (roles == ROLE_WORD) | (roles == ROLE_EOS)
    return roles == ROLE_WORD  # "words"


def _pooling_hook(name: str, pooled: dict, keep: dict, config):
    """A forward hook (with kwargs) for the cross-attention module ``name``: recomputes its scaled logits from the
    inputs it was called with and stores the pooled layer score per batch element in ``pooled[name]``."""
    import torch

    pooling, heads_mode, lam = _knob(config, "pooling"), _knob(config, "heads"), float(config.lse_lambda)

    def hook(attn, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        if context is None:
            raise RuntimeError(f"reference_scores: {name} is not a cross-attention layer")
        # The stock processor's input handling, so Q is the query it attended with.
        if attn.spatial_norm is not None:
            hidden = attn.spatial_norm(hidden, kwargs.get("temb"))
        if hidden.ndim == 4:
            hidden = hidden.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key = attn.to_q(hidden), attn.to_k(context)
        with torch.autocast(device_type=query.device.type, enabled=False):  # logits and pooling in fp32
            query, key = _split_heads(query.float(), attn.heads), _split_heads(key.float(), attn.heads)
            logits = query @ key.transpose(-1, -2) * attn.scale  # [B, H, n, T]
            bias = kwargs.get("attention_mask")  # a masked context: diffusers' additive bias, [B, 1, T]
            if bias is not None:
                logits = logits + bias.float().view(logits.shape[0], 1, 1, logits.shape[-1])
            mask = keep["mask"]
            if pooling == "text-lse":
                per_head = _text_lse(logits, mask, lam)
            else:  # "image-lse"
                per_head = _image_lse(torch.softmax(logits, dim=-1), mask, lam)
            if heads_mode == "uniform":
                score = per_head.mean(dim=-1)
            else:  # "dynamic"
                score = (_eq7_head_weights(torch.softmax(logits, dim=-1), mask, lam) * per_head).sum(dim=-1)
        pooled[name] = score

    return hook


def _split_heads(x, heads: int):
    """``[B, S, H*d]`` -> ``[B, H, S, d]``."""
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).permute(0, 2, 1, 3)


def _logsumexp(x, dim: int):
    """``log Σ exp x`` along ``dim``, shifted by the maximum so that no exp overflows; ``-inf`` entries add 0."""
    import torch

    top = x.amax(dim=dim, keepdim=True)
    # A slice with no finite entry (all positions masked) has sum 0: keep the shift finite so exp gives 0, not NaN.
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return (top + torch.log(torch.exp(x - top).sum(dim=dim, keepdim=True))).squeeze(dim)


def _text_lse(logits, mask, lam: float):
    """The authors' pooling: per head and image token, ``(1/λ) log Σ_{kept j} exp(λ L_ij)``; mean over image
    tokens. ``logits [B, H, n, T]``, ``mask`` bool ``[B, T]`` -> ``[B, H]``."""
    dropped = ~mask[:, None, None, :]
    return (_logsumexp((lam * logits).masked_fill(dropped, float("-inf")), dim=-1) / lam).mean(dim=-1)


def _image_lse(probs, mask, lam: float):
    """The paper's pooling (Eq. 3-4): per head and text token, ``S_j = (1/λ) log Σ_i exp(λ P_ij)`` over all image
    tokens; mean of ``S_j`` over the kept text tokens. ``probs [B, H, n, T]`` -> ``[B, H]``."""
    per_token = _logsumexp(lam * probs, dim=2) / lam  # [B, H, T]
    kept = mask[:, None, :].to(per_token.dtype)
    return (per_token * kept).sum(dim=-1) / kept.sum(dim=-1)


def _eq7_head_weights(probs, mask, lam: float):
    """Paper Eq. 7 as written, by autograd rather than a closed form: ``Attr_h = P_h ⊙ ∂f/∂P_h`` with
    ``f = mean_h f_h`` (image-lse ``f_h``); ``w_h = Σ_ij Attr_h / Σ_h' Σ_ij Attr_h'``. ``[B, H]``."""
    import torch

    # The UNet runs under inference mode, whose tensors autograd cannot use: work on ordinary copies.
    with torch.inference_mode(False), torch.enable_grad():
        leaf = probs.clone().requires_grad_(True)
        f = _image_lse(leaf, mask.clone(), lam).mean(dim=-1)  # [B]; pairs are independent, so grad of the sum
        (grad,) = torch.autograd.grad(f.sum(), leaf)
        attribution = (leaf * grad).sum(dim=(2, 3)).detach()  # [B, H]
    return attribution / attribution.sum(dim=-1, keepdim=True)
