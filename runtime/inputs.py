"""Reading the inputs of a matching job: an image folder or list, and a captions file (one caption per line)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

__all__ = ["IMAGE_SUFFIXES", "image_suffixes", "list_images", "read_captions", "CaptionList"]

logger = logging.getLogger(__name__)

#: The common image suffixes (named in messages); a folder is read by all of :func:`image_suffixes`.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: Formats Pillow can identify but never decode (it says so in the plugin): a video in a folder is not an image.
_IDENTIFY_ONLY = frozenset({"MPEG"})


@functools.cache
def image_suffixes() -> frozenset[str]:
    """The suffixes a folder's image files are found by: :data:`IMAGE_SUFFIXES` and every suffix Pillow registers
    for a format it can decode here (TGA, PPM, DDS, JPEG 2000, EPS...), so a folder holds what an image list can.

    Left out: formats Pillow only identifies, and its stub plugins (HDF5, BUFR, GRIB, WMF off Windows) until an
    application registers a handler, as a data file next to the images is not one to report as skipped.
    """
    from PIL import Image, ImageFile

    Image.init()
    readable = set()
    for suffix, fmt in Image.registered_extensions().items():
        if fmt == "MPO":  # registered for saving only; the JPEG plugin reads it
            readable.add(suffix)
        if fmt not in Image.OPEN or fmt in _IDENTIFY_ONLY:
            continue
        factory = Image.OPEN[fmt][0]
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            if getattr(sys.modules.get(factory.__module__), "_handler", None) is None:
                continue
        readable.add(suffix.lower())
    return IMAGE_SUFFIXES | readable


def list_images(source: str | os.PathLike) -> list[Path]:
    """The images of a job, in a stable order.

    Args:
        source: a folder (its image files, by suffix: :func:`image_suffixes`; sorted by name; subfolders are not
            entered) or a text file with one image path per line (relative paths are taken from the list file's
            folder; blank lines and lines starting with ``#`` are ignored).
    """
    source = Path(source)
    if source.is_dir():
        suffixes = image_suffixes()
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in suffixes and not p.is_dir())
        if not images:
            raise InputError(
                f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))} and "
                f"{len(suffixes - IMAGE_SUFFIXES)} more suffixes Pillow reads); point to a folder of images or to "
                "a text file listing image paths"
            )
        return images
    if not source.exists():
        raise InputError(f"{source}: no such folder or image list")
    if source.suffix.lower() in image_suffixes():
        return [source]
    lines = _read_lines(source)
    images, relative = [], []
    for _, line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        if not path.is_absolute():
            relative.append(path)
        images.append(path if path.is_absolute() else source.parent / path)
    if not images:
        raise InputError(f"{source}: the image list is empty; write one image path per line")
    if relative and not any(os.path.lexists(image) for image in images):
        # Nothing resolves: most likely the paths were written relative to another folder than the list's.
        from_here = sum(os.path.lexists(path) for path in relative)
        hint = f" ({from_here} of them exist relative to the current folder instead)" if from_here else ""
        raise InputError(
            f"{source}: none of its {len(images)} image paths exists; relative paths are taken from the list "
            f"file's folder {source.parent}{hint}, so write them relative to it or as absolute paths"
        )
    return images


@dataclass
class CaptionList:
    """Captions read from a file, with the line each came from and the lines that were skipped."""

    captions: list[str]
    line_numbers: list[int]
    skipped: list[tuple[int, str]] = field(default_factory=list)


def read_captions(path: str | os.PathLike) -> CaptionList:
    """One caption per line. A UTF-8 BOM and CRLF line ends are accepted; blank lines are skipped and reported.

    Raises:
        InputError: the file is missing, not UTF-8 (the message names the line), or holds no caption.
    """
    path = Path(path)
    captions, numbers, skipped = [], [], []
    for number, line in _read_lines(path):
        text = line.strip()
        if not text:
            skipped.append((number, "blank line"))
            continue
        captions.append(text)
        numbers.append(number)
    if skipped:
        logger.warning(
            "%s: skipped %d blank line(s): %s", path, len(skipped), ", ".join(str(n) for n, _ in skipped[:10])
        )
    if not captions:
        raise InputError(f"{path}: no captions found; write one caption per line")
    return CaptionList(captions, numbers, skipped)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a text file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied; make the file readable") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path} line {number}: not valid UTF-8 (byte {exc.start + 1} of the line); save the file as UTF-8"
            ) from None
    return lines
