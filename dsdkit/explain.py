"""``dsdkit explain``: per-token cross-attention heat maps of one image-caption pair, from the PyTorch scorer.

The maps are the attention probabilities ``P = softmax_j(QKᵀ/√d)`` that the score pools: the same UNet passes
(the scorer's :class:`~dsdkit.forward.ScoringForward`, the same noise bank and timesteps), recorded by the same
per-call record that computes the layer scores. Per word token: the probability of that
token for every image position, averaged over heads, upsampled to the finest scored layer's grid, averaged over the
scored layers and the timesteps.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtime.files import atomic_write_bytes
from .runtime.images import ImageInput, preprocess_image
from .runtime.tokenizer import ROLE_WORD

__all__ = ["Explanation", "explain", "render_heat_maps", "PANEL", "LABEL"]

PANEL, LABEL, COLUMNS = 256, 24, 4


@dataclass
class Explanation:
    """Heat maps of one pair.

    Attributes:
        tokens: the caption's word tokens (BPE pieces), one per map.
        maps: ``float32[len(tokens), g, g]`` attention probability per image position (mean over heads, layers,
            timesteps).
        layer_scores: ``float64[K, L]`` the attention term per timestep and layer from the same passes.
        timesteps: the timesteps used.
        pixels: ``float32[3, R, R]`` the preprocessed image in [-1, 1] the maps refer to.
    """

    tokens: list[str]
    maps: np.ndarray
    layer_scores: np.ndarray
    timesteps: list[int]
    pixels: np.ndarray


def explain(scorer, image: ImageInput, caption: str) -> Explanation:
    """Run the scorer's conditional passes for one pair and keep the attention maps of its scored layers."""
    import torch
    import torch.nn.functional as F

    model, config = scorer.model, scorer.config
    encoding = scorer.encode_images([image])[0]
    text = scorer.encode_texts([caption])[0]
    grid = int(math.sqrt(max(encoding.latent.shape[-1] * encoding.latent.shape[-2], 1)))
    accumulated, layer_scores = None, []
    with torch.inference_mode():
        for k in range(len(scorer.timesteps)):
            steps = torch.tensor([k])
            signal, noise_scale, timesteps = scorer.noising(steps)
            layers, _, call = scorer.forward.trace(
                encoding.latent[None],
                signal,
                noise_scale,
                scorer.noise[steps.to(model.device)],
                timesteps,
                text.states[None],
                text.mask[None],
                keep_maps=True,
            )
            layer_scores.append(layers[0].double().cpu().numpy())
            per_layer = []
            for index in range(len(scorer.layer_names)):
                probs = call.maps[index][0]  # [n, T], head mean of what the pooling consumed
                side = int(round(math.sqrt(probs.shape[0])))
                maps = probs.T.reshape(-1, 1, side, side).float()
                per_layer.append(F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)[:, 0])
            mean = torch.stack(per_layer).mean(0)  # [T, g, g]
            accumulated = mean if accumulated is None else accumulated + mean
    maps = (accumulated / len(scorer.timesteps)).cpu().numpy()
    words = np.flatnonzero(text.tokens.roles == ROLE_WORD)
    names = model.tokenizer.decode_tokens(text.tokens)  # the word tokens, in order
    pixels = preprocess_image(image, scorer.resolution, config.resize)
    return Explanation(
        tokens=names,
        maps=maps[words].astype(np.float32),
        layer_scores=np.stack(layer_scores),
        timesteps=list(scorer.timesteps),
        pixels=pixels,
    )


def _colour(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue-to-yellow map of values in [0, 1] -> uint8 RGB (no plotting library needed)."""
    anchors = np.array(
        [[48, 18, 59], [40, 120, 220], [30, 200, 140], [190, 220, 40], [250, 240, 30]], dtype=np.float64
    )
    position = np.clip(values, 0, 1) * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    frac = (position - low)[..., None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def render_heat_maps(explanation: Explanation, path: str | os.PathLike, caption: str | None = None) -> Path:
    """One panel per word token (the map over the image, labelled with the token), written atomically as PNG."""
    from PIL import Image, ImageDraw

    count = len(explanation.tokens)
    columns = min(COLUMNS, count)
    rows = math.ceil(count / columns)
    base = ((explanation.pixels.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    base_image = Image.fromarray(base).resize((PANEL, PANEL), Image.Resampling.BICUBIC)
    sheet = Image.new("RGB", (columns * PANEL, rows * (PANEL + LABEL)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (token, heat) in enumerate(zip(explanation.tokens, explanation.maps, strict=True)):
        span = float(heat.max() - heat.min())
        normalised = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
        overlay = Image.fromarray(_colour(normalised)).resize((PANEL, PANEL), Image.Resampling.BILINEAR)
        panel = Image.blend(base_image, overlay, 0.55)
        x, y = (index % columns) * PANEL, (index // columns) * (PANEL + LABEL)
        sheet.paste(panel, (x, y + LABEL))
        draw.text((x + 6, y + 5), f"{index + 1}. {token}", fill=(0, 0, 0))
    buffer = io.BytesIO()
    info = None
    if caption is not None:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("caption", caption)
    sheet.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
