"""Image loading and preprocessing, without torch.

One implementation for every backend: the PyTorch scorer and the ONNX/TensorRT runtime feed the VAE the exact
same float32 pixels.

Policy (the scoring contract of docs/scoring.md, "How a score is computed"):
- EXIF orientation is applied, so a photo is scored the way it is displayed.
- Transparent pixels are composited on white; palette, grayscale, CMYK and 16-bit images become 8-bit RGB.
- ``squash`` (default, as the authors' code) resizes to ``resolution x resolution`` ignoring the aspect ratio;
  ``center-crop`` resizes the short side to ``resolution`` and crops the centre.
- Bicubic resampling (the authors' PIL default), then ``x / 127.5 - 1`` to [-1, 1], channels first.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import struct
from enum import Enum
from pathlib import Path
from typing import Union

import numpy as np

from .decode_warnings import decoding, note
from .errors import InputError

__all__ = [
    "ResizeMode",
    "ImageInput",
    "MAX_IMAGE_PIXELS",
    "check_image",
    "load_image",
    "decode_opened",
    "pillow_guard",
    "to_rgb",
    "preprocess_image",
    "center_crop_box",
    "describe",
]


class ResizeMode(str, Enum):
    squash = "squash"
    center_crop = "center-crop"


ImageInput = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: F821


def describe(image: ImageInput, index: int | None = None) -> str:
    """A short name for an image in messages and result files."""
    if isinstance(image, (str, os.PathLike)):
        return _printable(str(image))
    prefix = f"image #{index}" if index is not None else "image"
    return f"{prefix} ({type(image).__name__})"


#: Largest image dsdkit decodes (width x height). Larger files are refused from their header, before any pixel
#: is decoded, so a crafted or huge file cannot exhaust memory (a 100 MP RGB image needs ~300 MB once decoded).
MAX_IMAGE_PIXELS = 100_000_000


def _printable(name: str) -> str:
    """``name`` as is, or escaped when it holds line breaks or bytes that are not UTF-8 (a Linux file name can), so
    messages stay one line and result files stay valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return ascii(name)
    return name if name.isprintable() else ascii(name)


#: What Pillow's plugins raise on malformed headers, chunks and pixel data (and ``OSError`` from the decoders).
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, ZeroDivisionError)


def _type_name(exc: BaseException) -> str:
    """``ValueError``, ``UnidentifiedImageError``, but ``struct.error`` (a bare ``error`` says nothing)."""
    kind = type(exc)
    if kind.__module__ == "builtins" or kind.__module__.startswith("PIL"):
        return kind.__name__
    return f"{kind.__module__}.{kind.__name__}"


def _decode_error(name: str, exc: Exception, opening: bool) -> InputError:
    """The one-line :class:`InputError` of a file whose Pillow call raised ``exc``.

    ``opening``: raised while opening the file, where an ``OSError`` subclass is about the path (a missing file, a
    folder, a link loop). Later, a decoder that raises one means something else (EPS raises ``FileNotFoundError``
    for a missing Ghostscript), so it is reported as what it is.
    """
    from PIL import Image, UnidentifiedImageError

    detail = _printable(" ".join(str(exc).split())[:200])
    kind = f"{_type_name(exc)}: {detail}" if detail else _type_name(exc)
    if opening and isinstance(exc, OSError):
        if isinstance(exc, FileNotFoundError):
            return InputError(f"{name}: no such image file (or a broken link)")
        if isinstance(exc, IsADirectoryError):
            return InputError(f"{name}: is a folder, not an image")
        if isinstance(exc, PermissionError):
            return InputError(f"{name}: permission denied; make the file readable")
        if isinstance(exc, UnidentifiedImageError):
            return InputError(f"{name}: not a readable image: unknown or corrupt format (UnidentifiedImageError)")
        if exc.errno == errno.ELOOP:
            return InputError(f"{name}: symbolic link loop; fix or remove the link")
        if exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EACCES, errno.ENXIO, errno.ENODEV):
            return InputError(f"{name}: cannot be opened ({exc.strerror}); check the path")
    if isinstance(exc, Image.DecompressionBombError):
        return InputError(f"{name}: image too large to decode safely ({kind})")
    if isinstance(exc, MemoryError):
        return InputError(f"{name}: not enough memory to decode it ({kind}); downscale the image")
    if type(exc) in _CORRUPT or (isinstance(exc, _CORRUPT) and not isinstance(exc, OSError)):
        return InputError(f"{name}: image is truncated or corrupt; it cannot be decoded ({kind})")
    return InputError(f"{name}: cannot be decoded ({kind})")


@contextlib.contextmanager
def pillow_guard(name: str, opening: bool = False):
    """Around Pillow calls on one input (and nothing else): whatever Pillow raises is that file's problem.

    Image files come in any format Pillow knows, and its plugins raise far more than ``OSError``
    (``NotImplementedError`` for an unsupported DDS texture, ``TypeError``, ``RuntimeError``...), so every
    ``Exception`` becomes the file's one-line :class:`InputError`, naming it and the exception type. That includes
    ``MemoryError``: Pillow raises it when an allocation sized by the file's header fails, and the memory is
    released as the exception unwinds; a process that is really out of memory fails next in dsdkit's own code,
    where nothing turns it into a skip. ``KeyboardInterrupt`` and ``SystemExit`` are not ``Exception`` and pass.
    dsdkit's own code stays outside these blocks, so an exception raised there remains what it is: a bug. The
    warnings raised in the block are the file's notes (:mod:`.decode_warnings`).
    """
    with decoding(name):
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - see above: anything a decoder raises is the file's problem
            raise _decode_error(name, exc, opening) from exc


@contextlib.contextmanager
def _opened(path: Path):
    """An image file's header opened by Pillow and checked against :data:`MAX_IMAGE_PIXELS`: ``(name, image)``.

    Only the Pillow calls are guarded (:func:`pillow_guard`); the body of the ``with`` statement is not.
    """
    from PIL import Image

    # Messages stay one line whatever the file is called (a newline is legal in a Linux file name).
    name = _printable(str(path))
    if "\x00" in str(path):
        raise InputError(f"{name}: a file name cannot contain a NUL byte; check the image list")
    try:
        empty = path.is_file() and path.stat().st_size == 0
    except OSError as exc:
        raise _decode_error(name, exc, opening=True) from None
    if empty:
        raise InputError(f"{name}: empty file (0 bytes); remove it or replace it with the image")
    with pillow_guard(name, opening=True):
        opened = Image.open(path)
        width, height = opened.size
    try:
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(
                f"{name}: {width}x{height} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit "
                "(decompression-bomb guard); downscale the image"
            )
        if width < 1 or height < 1:
            raise InputError(f"{name}: image has no pixels ({width}x{height})")
        yield name, opened
    finally:
        with pillow_guard(name):
            opened.close()


def check_image(path: str | os.PathLike) -> None:
    """Cheap screen of an image file from its header alone (no pixel decoded): exists, readable, a known format,
    within :data:`MAX_IMAGE_PIXELS`. A truncated file passes; :func:`load_image` catches it when decoding.

    Raises:
        InputError: one line naming the file, what is wrong and what to do.
    """
    with _opened(Path(path)):
        pass


def load_image(path: str | os.PathLike) -> PIL.Image.Image:  # noqa: F821
    """Open an image file fully (decoding every byte now, so a truncated file fails here) as 8-bit RGB.

    Animated GIF/PNG/WebP and multi-page TIFF files are scored by their first frame.

    Raises:
        InputError: one line naming the file and what is wrong (see :func:`check_image`), or a truncated file, or
            anything else Pillow raised while reading or converting it (the message names the exception type).
    """
    with _opened(Path(path)) as (name, opened):
        return decode_opened(opened, name)


def decode_opened(opened, name: str) -> PIL.Image.Image:  # noqa: F821
    """An image Pillow has opened (header read) decoded fully as 8-bit RGB, upright by its EXIF orientation, alpha
    on white: the one decoding path of files on disk and of uploads to a server (``name`` names it in errors)."""
    guard = functools.partial(pillow_guard, name)
    with guard():
        opened.load()
        upright = _exif_upright(opened)
    return to_rgb(upright, guard)


def _exif_upright(image):
    """A copy of ``image`` turned upright by its EXIF orientation tag (a broken EXIF block is ignored and noted)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - a damaged EXIF block must not make good pixels unreadable
        note(f"EXIF orientation ignored: the EXIF block is damaged ({_type_name(exc)})")
        return image.copy()


def to_rgb(image: PIL.Image.Image, decoding=contextlib.nullcontext) -> PIL.Image.Image:  # noqa: F821
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white.

    ``decoding``: a context manager entered around each Pillow call on ``image`` itself (a lazy plugin decodes, or
    fails, only then); :func:`load_image` passes the guard that makes such a failure the file's
    :class:`InputError`. Calls on the images made here from ``image``'s pixels are dsdkit's own.
    """
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        with decoding():
            array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        with decoding():
            array = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(array)
        # The range spans [0, 1] and every finite value; NaN is 0, +-inf the range's ends (never part of it, so
        # one inf pixel cannot flatten the image or overflow the arithmetic).
        lo = min(0.0, float(array[finite].min())) if finite.any() else 0.0
        hi = max(1.0, float(array[finite].max())) if finite.any() else 1.0
        array = np.clip(np.where(np.isnan(array), 0.0, array), lo, hi)
        scaled = (array - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    with decoding():
        if image.mode == "P":
            image = image.convert("RGBA")
        if image.mode == "La":  # premultiplied; Pillow converts it to LA only
            image = image.convert("LA")
        if image.mode not in ("RGBA", "LA", "PA", "RGBa"):
            return image.convert("RGB")
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _array_to_pil(array: np.ndarray, name: str):
    from PIL import Image

    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise InputError(
            f"{name}: arrays of dtype {array.dtype} are not images; pass uint8 (0-255), uint16 or float (0-1) pixels"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255  # a mask: True is white
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise InputError(f"{name}: empty array")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{name}: array contains NaN or inf")
        if array.min() < 0.0 or array.max() > 1.0:
            raise InputError(
                f"{name}: float arrays must hold values in [0, 1], got [{array.min():g}, {array.max():g}]"
            )
        array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise InputError(f"{name}: integer arrays must hold values in [0, 255]")
        array = array.astype(np.uint8)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def as_pil(image: ImageInput, index: int | None = None):
    """Accept a path, a PIL image or a numpy array and return an 8-bit RGB PIL image."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        guard = functools.partial(pillow_guard, describe(image, index))
        with guard():  # a lazily opened image decodes here, so a truncated file fails here
            image.load()
        return to_rgb(image, guard)
    if isinstance(image, np.ndarray):
        return to_rgb(_array_to_pil(image, describe(image, index)))
    raise InputError(f"{describe(image, index)}: expected a file path, a PIL image or a numpy array")


def center_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """``center-crop`` geometry: the size ``(new_w, new_h)`` the image is resized to (short side ``resolution``) and
    the ``(left, top)`` corner of the ``resolution``-square kept; one definition for the pixels and the heat maps."""
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return new_w, new_h, (new_w - resolution) // 2, (new_h - resolution) // 2


def preprocess_image(
    image: ImageInput, resolution: int, resize: ResizeMode | str = ResizeMode.squash, index: int | None = None
) -> np.ndarray:
    """Return ``float32[3, resolution, resolution]`` pixels in [-1, 1], ready for the VAE encoder."""
    from PIL import Image

    resize = ResizeMode(resize)
    pil = as_pil(image, index)
    width, height = pil.size
    if width < 1 or height < 1:
        raise InputError(f"{describe(image, index)}: image has no pixels ({width}x{height})")
    if resize is ResizeMode.squash:
        pil = pil.resize((resolution, resolution), Image.Resampling.BICUBIC)
    else:
        new_w, new_h, left, top = center_crop_box(width, height, resolution)
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
        pil = pil.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(pil, dtype=np.float32)
    pixels = pixels / 127.5 - 1.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
