"""The inputs of a job, resolved once: image paths (or in-memory images) with the names results use, captions with
where each came from (for messages), and what identifies an input file in a resume fingerprint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..runtime.images import ImageInput, describe
from ..runtime.inputs import list_images, read_captions

__all__ = ["JobInputs", "gather_inputs", "identify_image"]


@dataclass
class JobInputs:
    """The inputs of a match job, resolved.

    Attributes:
        images: paths / PIL images / arrays, in job order.
        names: each image's name in messages and result files.
        captions: the captions, in job order (blank lines dropped).
        where: each caption's origin for messages (``"captions.txt line 3"``).
        skipped_lines: ``(where, why)`` of caption-file lines that were skipped (blank lines).
    """

    images: list[ImageInput]
    names: list[str]
    captions: list[str]
    where: list[str]
    skipped_lines: list[tuple[str, str]] = field(default_factory=list)


def gather_inputs(
    images: str | os.PathLike | Sequence[ImageInput], captions: str | os.PathLike | Sequence[str]
) -> JobInputs:
    """Resolve a folder / image-list file and a captions file (or in-memory lists)."""
    if isinstance(images, (str, os.PathLike)):
        image_list: list[ImageInput] = list(list_images(images))
    else:
        image_list = list(images)
    names = [describe(image, i) for i, image in enumerate(image_list)]
    if isinstance(captions, (str, os.PathLike)):
        read = read_captions(captions)
        return JobInputs(
            image_list,
            names,
            read.captions,
            [f"{captions} line {n}" for n in read.line_numbers],
            [(f"{captions} line {n}", why) for n, why in read.skipped],
        )
    caption_list = list(captions)
    return JobInputs(image_list, names, caption_list, [f"caption #{i}" for i in range(len(caption_list))])


def identify_image(image: ImageInput, name: str) -> str:
    """What a resumed job compares: a file's path, size and modification time, or an in-memory image's name."""
    if isinstance(image, (str, os.PathLike)):
        try:
            stat = os.stat(image)
            return f"{name}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            return name
    return name
