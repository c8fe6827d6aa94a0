"""``dsdkit explain``: per-token cross-attention heat maps of one image-caption pair, from the PyTorch scorer.

The maps are the attention probabilities ``P = softmax_j(QKᵀ/√d)`` that the score pools: the same UNet passes
(the scorer's :class:`~dsdkit.pytorch.forward.ScoringForward`, the same noise bank and timesteps), recorded by the same
per-call record that computes the layer scores. Per word token: the probability of that
token for every image position, averaged over heads, upsampled to the finest scored layer's grid, averaged over the
scored layers and the timesteps.

The maps live on the latent grid of the square model input. The sheet draws them back over the image at its own
aspect ratio: stretched over the whole image where the model input was squashed, over the central crop where it was
cropped (what was cropped away is dimmed and gets no colour). The maps are drawn over a grey copy of the image (so the
colour scale reads over any picture); the image itself, in colour, is the sheet's first panel, beside them, so the
objects' own colours show.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.files import atomic_write_bytes
from ..runtime.images import ImageInput, ResizeMode, as_pil, center_crop_box, preprocess_image
from ..runtime.tokenizer import ROLE_WORD

__all__ = [
    "Explanation",
    "SheetLayout",
    "explain",
    "layout_heat_maps",
    "maps_on_image",
    "scale_labels",
    "render_heat_maps",
    "PANEL",
    "LABEL",
]

#: Panel long side and token-label height (pixels), panels per row.
PANEL, LABEL, COLUMNS = 256, 24, 4
MARGIN, GAP, MIN_WIDTH = 12, 8, 440
TITLE_FONT, TEXT_FONT, LINE = 16, 13, 20
MAX_TITLE_LINES = 2
BAR_HEIGHT, BAR_WIDTH = 14, 400
#: The drawn image is kept at most this large (long side): panels are smaller, and photos can be huge.
MAX_SHOWN = 1024
#: Opacity of the colour at the top of the scale; it falls with the value (as its square root), so positions the
#: token does not attend to show the grey image itself.
ALPHA = 0.8

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right and bottom exclusive


@dataclass
class Explanation:
    """Heat maps of one pair.

    Attributes:
        tokens: the caption's word tokens (BPE pieces), one per map.
        maps: ``float32[len(tokens), g, g]`` attention probability per image position (mean over heads, layers,
            timesteps), on the latent grid of the square model input.
        layer_scores: ``float64[K, L]`` the (conditional) attention term per timestep and layer from the same passes.
        timesteps: the timesteps used.
        pixels: ``float32[3, R, R]`` the preprocessed image in [-1, 1] the maps refer to.
        score: the pair's DSD score (what :meth:`~dsdkit.runtime.engine.Engine.score` gives it), from the same
            passes plus the unconditional ones where the config needs them.
        caption: the caption explained.
        image: ``uint8[H, W, 3]`` the image as given (upright RGB, at most :data:`MAX_SHOWN` pixels on its long
            side): what the sheet draws. ``None``: the sheet draws ``pixels``.
        region: the part of ``image`` the model saw, as fractions ``(left, top, right, bottom)``: all of it when
            squashed, the central square when center-cropped.
    """

    tokens: list[str]
    maps: np.ndarray
    layer_scores: np.ndarray
    timesteps: list[int]
    pixels: np.ndarray
    score: float | None = None
    caption: str | None = None
    image: np.ndarray | None = None
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def model_region(
    width: int, height: int, resolution: int, resize: ResizeMode | str
) -> tuple[float, float, float, float]:
    """The part of a ``width`` x ``height`` image that :func:`~dsdkit.runtime.images.preprocess_image` keeps, as
    fractions ``(left, top, right, bottom)`` (its own crop box)."""
    if ResizeMode(resize) is ResizeMode.squash:
        return (0.0, 0.0, 1.0, 1.0)
    new_w, new_h, left, top = center_crop_box(width, height, resolution)
    return (left / new_w, top / new_h, (left + resolution) / new_w, (top + resolution) / new_h)


def explain(
    scorer, image: ImageInput, caption: str, progress: Callable[[int, int], Callable[[int], None]] | None = None
) -> Explanation:
    """Run the scorer's passes for one pair and keep the attention maps of its scored layers.

    ``progress(total, done) -> advance`` makes a reporter for the job's ``total`` UNet passes (one conditional per
    timestep, plus one unconditional per timestep where the config needs it); ``advance(1)`` follows each pass.
    """
    import torch
    import torch.nn.functional as F

    model, config = scorer.model, scorer.config
    # Decoded once: the model input and the picture the sheet draws come from the same pixels.
    picture = as_pil(image)
    pixels = preprocess_image(picture, scorer.resolution, config.resize)
    encoding = scorer.encode_pixels([pixels])[0]
    text = scorer.encode_texts([caption])[0]
    unconditional = config.needs_unconditional_pass
    count = len(scorer.timesteps)
    advance = progress(count * (2 if unconditional else 1), 0) if progress is not None else None
    grid = int(math.sqrt(max(encoding.latent.shape[-1] * encoding.latent.shape[-2], 1)))
    accumulated = None
    layer_scores, errors, uncond_layers, uncond_errors = [], [], [], []
    with torch.inference_mode():
        for k in range(count):
            steps = torch.tensor([k])
            noising = scorer.noising(steps)
            layers, error, call = scorer.forward.trace(
                encoding.latent[None], noising, text.states[None], text.mask[None], keep_maps=True
            )
            layer_scores.append(layers[0].double().cpu().numpy())
            errors.append(float(error[0]))
            per_layer = []
            for index in range(len(scorer.layer_names)):
                probs = call.maps[index][0]  # [n, T], head mean of what the pooling consumed
                side = int(round(math.sqrt(probs.shape[0])))
                maps = probs.T.reshape(-1, 1, side, side).float()
                per_layer.append(F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)[:, 0])
            mean = torch.stack(per_layer).mean(0)  # [T, g, g]
            accumulated = mean if accumulated is None else accumulated + mean
            if advance is not None:
                advance(1)
            if unconditional:
                # The empty caption's terms, as the engine's unconditional pass computes them, for the score.
                empty = scorer.empty_caption
                layers, error, _ = scorer.forward.trace(
                    encoding.latent[None], noising, empty.states[None], empty.mask[None]
                )
                uncond_layers.append(layers[0].double().cpu().numpy())
                uncond_errors.append(float(error[0]))
                if advance is not None:
                    advance(1)
    per_step, _, _ = scorer.forward.combine(
        np.stack(layer_scores)[None],
        np.array(errors)[None],
        np.stack(uncond_layers)[None] if unconditional else None,
        np.array(uncond_errors)[None] if unconditional else None,
    )
    maps = (accumulated / count).cpu().numpy()
    words = np.flatnonzero(text.tokens.roles == ROLE_WORD)
    names = model.tokenizer.decode_tokens(text.tokens)  # the word tokens, in order
    shown = picture.copy()
    shown.thumbnail((MAX_SHOWN, MAX_SHOWN))  # keeps the aspect ratio
    return Explanation(
        tokens=names,
        maps=maps[words].astype(np.float32),
        layer_scores=np.stack(layer_scores),
        timesteps=list(scorer.timesteps),
        pixels=pixels,
        score=float(per_step[0].mean()),
        caption=caption,
        image=np.asarray(shown.convert("RGB")),
        region=model_region(*picture.size, scorer.resolution, config.resize),
    )


# -- the sheet -------------------------------------------------------------------------------------------------------


def _colour(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue-to-yellow map of values in [0, 1] -> float RGB 0..255 (no plotting library)."""
    anchors = np.array(
        [[48, 18, 59], [40, 120, 220], [30, 200, 140], [190, 220, 40], [250, 240, 30]], dtype=np.float64
    )
    position = np.clip(values, 0, 1) * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    frac = (position - low)[..., None]
    return anchors[low] * (1 - frac) + anchors[low + 1] * frac


def _overlay(grey: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The colour of ``values`` in [0, 1] (NaN: none) over ``grey`` ``[..., 3]``, opaque as ``ALPHA·√value``."""
    seen = np.isfinite(values)
    v = np.where(seen, np.clip(values, 0, 1), 0.0)
    alpha = (ALPHA * np.sqrt(v))[..., None]
    out = grey * (1 - alpha) + _colour(v) * alpha
    # What the model did not see (cropped away) stays grey, dimmed.
    out = np.where(seen[..., None], out, grey * 0.55)
    return out.clip(0, 255).astype(np.uint8)


def _grey_base(rgb: np.ndarray) -> np.ndarray:
    """A greyscale copy of ``uint8[H, W, 3]`` compressed to mid tones, so the colours read over any image (a
    saturated red or a black image alike): float ``[H, W, 3]``."""
    luminance = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    grey = 48.0 + luminance * (160.0 / 255.0)
    return np.repeat(grey[..., None], 3, axis=-1)


def _shown_image(explanation: Explanation) -> np.ndarray:
    if explanation.image is not None:
        return np.asarray(explanation.image, dtype=np.uint8)[..., :3]
    return ((explanation.pixels.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def panel_size(width: int, height: int) -> tuple[int, int]:
    """A panel's ``(width, height)``: the image's aspect ratio with its long side :data:`PANEL`."""
    if width >= height:
        return PANEL, max(1, round(PANEL * height / width))
    return max(1, round(PANEL * width / height)), PANEL


def maps_on_image(explanation: Explanation, width: int, height: int) -> np.ndarray:
    """``float32[tokens, height, width]``: the maps over the image drawn at ``width`` x ``height``, placed on the
    :attr:`~Explanation.region` the model saw (bilinear); NaN outside it."""
    from PIL import Image

    left, top, right, bottom = explanation.region
    x0, y0 = min(round(left * width), width - 1), min(round(top * height), height - 1)
    x1, y1 = min(width, max(x0 + 1, round(right * width))), min(height, max(y0 + 1, round(bottom * height)))
    out = np.full((len(explanation.maps), height, width), np.nan, dtype=np.float32)
    for index, heat in enumerate(explanation.maps):
        resized = Image.fromarray(np.asarray(heat, dtype=np.float32)).resize(
            (x1 - x0, y1 - y0), Image.Resampling.BILINEAR
        )
        out[index, y0:y1, x0:x1] = np.asarray(resized)
    return out


@functools.cache
def _fonts():
    """(title font, text font): Pillow's bundled scalable font where it has one (Pillow >= 10.1 with FreeType),
    else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=TITLE_FONT), ImageFont.load_default(size=TEXT_FONT)
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
        return font, font


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with the ellipsis (bisected: captions can be long)
    while low < high:
        middle = (low + high + 1) // 2
        if draw.textlength(text[:middle].rstrip() + "...", font=font) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "..."


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    """``text`` word-wrapped to ``width`` pixels, at most ``lines`` lines (the last ellipsised if cut)."""
    words, out, current = text.split(), [], ""
    for position, word in enumerate(words):
        trial = f"{current} {word}".strip()
        if not current or draw.textlength(trial, font=font) <= width:
            current = trial
            continue
        out.append(current)
        current = word
        if len(out) == lines - 1:
            current = " ".join(words[position:])
            break
    out.append(current)
    return [_fit(draw, line, font, width) for line in out[:lines]]


@dataclass
class SheetLayout:
    """Where everything goes on the heat-map sheet (pixel boxes ``(left, top, right, bottom)``)."""

    size: tuple[int, int]  # the PNG's (width, height)
    title: Box  # the title band: caption lines, then the score line
    title_lines: list[str]
    panels: list[Box]  # each token's image
    labels: list[Box]  # each token's label strip above its image
    image: Box  # the image itself, in colour: the first cell of the grid, before the tokens' panels
    image_label: Box  # its label strip
    colour_bar: Box  # the gradient itself
    scale: tuple[float, float] | None  # the map values at the colour bar's ends (None: per-token scales)
    panel_size: tuple[int, int] = (PANEL, PANEL)
    legend: list[str] = field(default_factory=list)  # the colour bar's description (wrapped), above it
    ends: tuple[str, str] = ("", "")  # the labels under the colour bar's two ends


def scale_labels(low: float, high: float) -> tuple[str, str]:
    """The two ends of a colour scale as text in one precision: the same number of decimals for both, enough for
    three significant digits of the larger magnitude (``0.012`` and ``0.0613`` read ``0.0120`` and ``0.0613``)."""
    largest = max(abs(low), abs(high))
    if not math.isfinite(largest) or largest == 0:
        return f"{low:g}", f"{high:g}"
    decimals = min(8, max(0, 2 - math.floor(math.log10(largest))))
    return f"{low:.{decimals}f}", f"{high:.{decimals}f}"


def layout_heat_maps(explanation: Explanation, caption: str | None = None, scale: str = "shared") -> SheetLayout:
    """The sheet's geometry (see :func:`render_heat_maps`)."""
    from PIL import Image, ImageDraw

    if scale not in ("shared", "token"):
        raise ValueError(f"scale must be 'shared' or 'token', got {scale!r}")
    caption = caption if caption is not None else explanation.caption
    shown = _shown_image(explanation)
    pw, ph = panel_size(shown.shape[1], shown.shape[0])
    count = len(explanation.tokens)
    cells = count + 1  # the image in colour first, then one panel per token
    columns = max(1, min(COLUMNS, cells))
    rows = max(1, math.ceil(cells / columns))
    grid_width = columns * pw + (columns - 1) * GAP
    width = max(grid_width + 2 * MARGIN, MIN_WIDTH)
    title_font, text_font = _fonts()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(draw, f'"{caption}"', title_font, width - 2 * MARGIN, MAX_TITLE_LINES) if caption else []
    steps, layers = len(explanation.timesteps), explanation.layer_scores.shape[-1]
    details = f"{steps} timestep{'s' if steps != 1 else ''}, {layers} scored layer{'s' if layers != 1 else ''}"
    if explanation.score is not None:
        details = f"score {explanation.score:.4f}   |   {details}"
    lines.append(_fit(draw, details, text_font, width - 2 * MARGIN))
    title_bottom = MARGIN + LINE * len(lines) + GAP
    panels, labels = [], []
    for cell in range(cells):
        x = MARGIN + (cell % columns) * (pw + GAP)
        y = title_bottom + (cell // columns) * (LABEL + ph + GAP)
        labels.append((x, y, x + pw, y + LABEL))
        panels.append((x, y + LABEL, x + pw, y + LABEL + ph))
    (image_label, *labels), (image_box, *panels) = labels, panels
    values = None
    if scale == "shared" and count:
        values = (float(np.min(explanation.maps)), float(np.max(explanation.maps)))
    what = "colour: attention probability per image position (mean over heads, layers, timesteps), "
    if values is not None:
        legend, ends = what + "one scale for all tokens", scale_labels(*values)
    else:
        legend, ends = what + "each token's own range (in its label)", ("token min", "token max")
    legend_lines = _wrap(draw, legend, text_font, width - 2 * MARGIN, 2)
    grid_bottom = title_bottom + rows * (LABEL + ph + GAP)
    bar_top = grid_bottom + LINE * len(legend_lines)
    bar = (MARGIN, bar_top, MARGIN + min(BAR_WIDTH, width - 2 * MARGIN), bar_top + BAR_HEIGHT)
    height = bar[3] + LINE + MARGIN
    return SheetLayout(
        size=(width, height),
        title=(0, 0, width, title_bottom),
        title_lines=lines,
        panels=panels,
        labels=labels,
        image=image_box,
        image_label=image_label,
        colour_bar=bar,
        scale=values,
        panel_size=(pw, ph),
        legend=legend_lines,
        ends=ends,
    )


def render_heat_maps(
    explanation: Explanation, path: str | os.PathLike, caption: str | None = None, scale: str = "shared"
) -> Path:
    """Write the heat-map sheet as PNG (atomically): a title band (the caption, wrapped and ellipsised, and the
    score), the image itself in colour, one panel per word token beside it (its label, then its map over a greyscale
    copy of the image at the image's aspect ratio), and a colour bar labelled with the values at its ends (both in
    one precision, :func:`scale_labels`).

    ``scale``: ``shared`` colours every token on one scale (the maps' min to max: tokens compare), ``token``
    stretches each token's own range (patterns of weak tokens show). Positions at the bottom of the scale show the
    grey image alone. See :func:`layout_heat_maps` for the geometry.
    """
    from PIL import Image, ImageDraw, PngImagePlugin

    caption = caption if caption is not None else explanation.caption
    layout = layout_heat_maps(explanation, caption, scale)
    title_font, text_font = _fonts()
    sheet = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, line in enumerate(layout.title_lines):
        last = row == len(layout.title_lines) - 1
        draw.text(
            (MARGIN, MARGIN + row * LINE),
            line,
            fill=(70, 70, 70) if last else (0, 0, 0),
            font=text_font if last else title_font,
        )
    pw, ph = layout.panel_size
    shown = Image.fromarray(_shown_image(explanation)).resize((pw, ph), Image.Resampling.BICUBIC)
    grey = _grey_base(np.asarray(shown))
    sheet.paste(shown, layout.image[:2])  # the objects' own colours, beside the maps
    left, top, right, _ = layout.image_label
    draw.text((left + 2, top + 5), _fit(draw, "image", text_font, right - left - 4), fill=(0, 0, 0), font=text_font)
    heat = maps_on_image(explanation, pw, ph)
    for index, token in enumerate(explanation.tokens):
        values = heat[index]
        if layout.scale is not None:
            low, high = layout.scale
        else:
            low, high = float(explanation.maps[index].min()), float(explanation.maps[index].max())
        span = high - low
        normalised = (values - low) / span if span > 0 else np.where(np.isfinite(values), 0.0, np.nan)
        sheet.paste(Image.fromarray(_overlay(grey, normalised)), layout.panels[index][:2])
        left, top, right, _ = layout.labels[index]
        label = f"{index + 1}. {token}"
        if layout.scale is None:
            label += "  ({}-{})".format(*scale_labels(low, high))
        draw.text((left + 2, top + 5), _fit(draw, label, text_font, right - left - 4), fill=(0, 0, 0), font=text_font)
    left, top, right, bottom = layout.colour_bar
    for row, line in enumerate(layout.legend):
        draw.text((left, top - LINE * (len(layout.legend) - row) + 1), line, fill=(0, 0, 0), font=text_font)
    # The bar shows what each value looks like over a mid-grey pixel: exactly what the panels draw.
    ramp = np.linspace(0.0, 1.0, right - left)[None, :].repeat(bottom - top, axis=0)
    sheet.paste(Image.fromarray(_overlay(np.full((*ramp.shape, 3), 128.0), ramp)), (left, top))
    draw.rectangle((left - 1, top - 1, right, bottom), outline=(90, 90, 90))
    draw.text((left, bottom + 3), layout.ends[0], fill=(0, 0, 0), font=text_font)
    high_label = layout.ends[1]
    draw.text(
        (right - draw.textlength(high_label, font=text_font), bottom + 3), high_label, fill=(0, 0, 0), font=text_font
    )
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    if caption is not None:
        info.add_text("caption", caption)
    if explanation.score is not None:
        info.add_text("score", repr(explanation.score))
    sheet.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
