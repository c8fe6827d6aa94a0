"""The reference cost: DSD computed the way the authors' code runs it, for side-by-side benchmarks.

What their pipeline does per image-caption pair (``reference-dsd.md`` §1.6): encode the caption and the empty
caption, then **for every timestep** encode the image with the VAE again, run the UNet on the doubled batch
``[x_t, x_t]`` with ``[∅, c]`` (an unconditional and a conditional half for *every pair*), with diffusers' eager
attention processor, which materialises every attention probability of every layer, and pool the scored layers.

Deliberately not a strawman: the arithmetic is the same as :class:`dsdkit.scorer.Scorer`'s (posterior mean rather
than a random sample, the same seeded noise bank, per-pair scores rather than their batch average), so with
``uncond_in_attention=True`` (the authors' mixing of the unconditional rows, their B3) the two agree to ~1e-6; the
benchmark checks that before it reports a ratio. Only the *cost structure* differs: nothing is cached or shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .runtime.images import ImageInput, preprocess_image

__all__ = ["reference_scores"]


def reference_scores(
    scorer, images: Sequence[ImageInput], captions: Sequence[str], progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """``float64[N, M]`` scores of every pair, each computed from scratch the authors' way (see the module doc).

    ``scorer`` supplies the model, the scoring config, the timesteps and the noise bank; ``progress(n)`` is called
    with the UNet sample-evaluations of each pass (2 per pair and timestep).
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from .attention import Recorder, scoring_processors
    from .scorer import unet_pass

    model, config = scorer.model, scorer.config
    device = model.device
    tokenizer = model.tokenizer
    recorder = Recorder(scorer.layer_names, config)
    originals = dict(model.unet.attn_processors)
    scores = np.empty((len(images), len(captions)), dtype=np.float64)
    model.unet.set_attn_processor(AttnProcessor())  # eager: every probability of every layer is materialised
    try:
        with torch.inference_mode(), scoring_processors(model.unet, recorder, scorer.adapter):
            for i, image in enumerate(images):
                pixels = torch.from_numpy(preprocess_image(image, scorer.resolution, config.resize, index=i))[None]
                for j, caption in enumerate(captions):
                    tokens = [tokenizer.encode_empty(), tokenizer.encode(caption, where=f"caption #{j}")]
                    ids = torch.from_numpy(np.stack([t.ids for t in tokens])).to(device)
                    states = model.text_encoder(input_ids=ids).last_hidden_state.float()  # [∅, c], per pair
                    masks = torch.stack([scorer_mask(scorer, t) for t in tokens]).to(device)
                    per_step = []
                    for k in range(len(scorer.timesteps)):
                        # VAE inside the timestep loop, as the authors' prepare_latents does.
                        z0 = model.vae.encode(pixels.to(device)).latent_dist.mean * model.scaling_factor
                        steps = torch.tensor([k, k])
                        signal, noise_scale, timesteps = scorer.noising(steps)
                        layers, errors = unet_pass(
                            model,
                            recorder,
                            z0.expand(2, -1, -1, -1),
                            signal,
                            noise_scale,
                            scorer.noise[steps.to(device)],
                            timesteps,
                            states,
                            masks,
                            scorer.adapter,
                        )
                        layers, errors = layers.double(), errors.double()
                        attention = 0.5 * (layers[0] + layers[1]) if config.uncond_in_attention else layers[1]
                        if config.normalize.value == "uncond":
                            attention = attention - layers[0]
                        step = attention.mean()
                        if config.denoise_term:
                            step = step + errors[0] - errors[1]
                        per_step.append(float(step))
                        if progress is not None:
                            progress(2)
                    scores[i, j] = float(np.mean(per_step))
    finally:
        model.unet.set_attn_processor(originals)
    return scores


def scorer_mask(scorer, tokens):
    """The scoring config's kept-token mask for one tokenized caption (float32 [T])."""
    import torch

    from .pooling import token_mask

    return token_mask(torch.from_numpy(tokens.roles.astype(np.int64)), scorer.config.tokens)
