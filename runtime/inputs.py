"""Reading the inputs of a matching job: an image folder or list, and a captions file (one caption per line)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

__all__ = ["IMAGE_SUFFIXES", "list_images", "read_captions", "CaptionList"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def list_images(source: str | os.PathLike) -> list[Path]:
    """The images of a job, in a stable order.

    Args:
        source: a folder (its image files, by suffix, sorted by name; subfolders are not entered) or a text file
            with one image path per line (relative paths are taken from the list file's folder; blank lines and
            lines starting with ``#`` are ignored).
    """
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        if not images:
            raise InputError(
                f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); point to a folder of "
                "images or to a text file listing image paths"
            )
        return images
    if not source.exists():
        raise InputError(f"{source}: no such folder or image list")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [source]
    lines = _read_lines(source)
    images = []
    for _, line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line)
        images.append(path if path.is_absolute() else source.parent / path)
    if not images:
        raise InputError(f"{source}: the image list is empty; write one image path per line")
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
