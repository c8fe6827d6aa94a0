"""A small synthetic matching task for trying training offline: coloured shapes vs. captions naming the colour.

Each image is one large shape (circle, square or triangle) of one of four colours at a random place on a light
background; each example asks which of ``"a red shape"``, ``"a green shape"``, ``"a blue shape"``,
``"a yellow shape"`` fits (chance: 25%). A random-weight model cannot solve it zero-shot; adapters can learn it in a
few hundred CPU steps on the tiny model. ``dsdkit tiny-data DIR`` writes it in the generic JSONL format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["COLOURS", "SHAPES", "colour_shape_image", "write_colour_shapes"]

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def colour_shape_image(colour: str, shape: str, rng: np.random.Generator, size: int = 128):
    """One image: a shape covering 55-95% of the side, at a random position."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    side = int(rng.integers(int(0.55 * size), int(0.95 * size)))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
    box = (x, y, x + side, y + side)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + side // 2, y), (x + side, y + side), (x, y + side)], fill=fill)
    return image


def write_colour_shapes(folder: str | os.PathLike, train: int = 256, test: int = 100, seed: int = 0) -> Path:
    """Write ``images/`` and ``data.jsonl`` (splits ``train`` and ``test``) to ``folder``; returns the JSONL path.

    Every file is written atomically and ``data.jsonl`` last, so an interrupted run or a full disk (an
    ``OutputError``) never leaves a dataset file that lists missing or half-written images.
    """
    import io

    from .errors import ConfigError
    from .runtime.files import atomic_write_bytes, atomic_write_text, output_error

    if train < 1 or test < 0:
        raise ConfigError("tiny-data needs at least one training example")
    folder = Path(folder)
    try:
        (folder / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder / "images", exc) from None
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    captions = [f"a {colour} shape" for colour in names]
    lines = []
    for split, count in (("train", train), ("test", test)):
        for index in range(count):
            colour = names[int(rng.integers(len(names)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            relative = f"images/{split}_{index:04d}_{colour}_{shape}.png"
            buffer = io.BytesIO()
            colour_shape_image(colour, shape, rng).save(buffer, format="PNG")
            atomic_write_bytes(folder / relative, buffer.getvalue())
            record = {"image": relative, "captions": captions, "positive": names.index(colour), "split": split}
            lines.append(json.dumps(record))
    path = folder / "data.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
