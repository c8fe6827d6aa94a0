"""Shared fixtures: seeded random-weight SD2-architecture models built once per session, generated images."""

from __future__ import annotations

import os

# Tests never touch the network: hub lookups must fail fast and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    """`gpu` and `trt` tests skip with a reason where the hardware or library is absent."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (`import tensorrt` fails on this machine)"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dsdkit.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from dsdkit.models import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="fp32")


def make_shape_image(color: str, shape: str, size: tuple[int, int] = (96, 80), seed: int = 0):
    """A coloured shape on a lightly textured background (a deterministic function of its arguments)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    background = (235 + rng.integers(0, 20, (size[1], size[0], 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(w // 2, h // 4), (3 * w // 4, 3 * h // 4), (w // 4, 3 * h // 4)], fill=color)
    return image


@pytest.fixture(scope="session")
def shape_images():
    specs = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    return [make_shape_image(c, s, seed=i) for i, (c, s) in enumerate(specs)]


@pytest.fixture(scope="session")
def image_factory():
    return make_shape_image
