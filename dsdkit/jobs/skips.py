"""Skip bookkeeping of a job, in one object: images that cannot be used (and why), decoder warnings of images that
are still scored, how many of them are logged by name, and the report written next to a result file.

Each skip is logged once, as it happens (the CLI prints no second list): the first :data:`SHOWN_BY_NAME` at WARNING
level, then one line saying where all of them are, the rest at INFO (``dsdkit -v``). The state is plain JSON
(string keys), saved with a job's partial results so that a resumed job keeps it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..runtime.decode_warnings import collecting
from ..runtime.errors import InputError
from ..runtime.files import atomic_write_text
from ..runtime.images import ImageInput, check_image

__all__ = ["SkippedImages", "SHOWN_BY_NAME", "skipped_report_path", "SKIPPED_FORMAT"]

logger = logging.getLogger("dsdkit.jobs.match")

SKIPPED_FORMAT = "dsdkit-skipped/1"


def skipped_report_path(output: str | os.PathLike) -> Path:
    """Where the skipped-items report of a result file goes: ``results.csv`` -> ``results.skipped.json``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.skipped.json")


#: Skipped images (and, apart, usable images with decoder warnings) logged by name; past that, one line says where
#: the others are, so a folder of hundreds of bad files prints a dozen lines, not hundreds.
SHOWN_BY_NAME = 10


class SkippedImages:
    """Images skipped in a job (index -> reason) and the decoder warnings of its images (index -> notes), shared with
    the resumable state so a resumed run keeps them.

    Each skip is logged once, as it happens (the CLI prints no second list): the first :data:`SHOWN_BY_NAME` at
    WARNING level, then one line saying where all of them are, the rest at INFO (``dsdkit -v``). Likewise the
    decoder warnings of images that are still scored. ``strict`` turns the first skip into an :class:`InputError`.
    """

    def __init__(self, names: list[str], strict: bool, report: Path | None = None):
        self.names, self.strict, self.report = names, strict, report
        self.images: dict[str, str] = {}  # str(index) -> reason; str keys survive the JSON round trip of state.json
        self.warnings: dict[str, list[str]] = {}  # str(index) -> decoder warnings (runtime.decode_warnings)
        self.caption_lines: list[dict[str, str]] = []  # skipped caption-file lines, for the report
        self._logged = {"skipped": 0, "warned": 0}

    def _log(self, kind: str, message: str, *args) -> None:
        self._logged[kind] += 1
        if self._logged[kind] <= SHOWN_BY_NAME:
            logger.warning(message, *args)
            return
        if self._logged[kind] == SHOWN_BY_NAME + 1:
            where = f"in {self.report}" if self.report is not None else "in result.meta (-o writes them to a report)"
            what = "skipped images" if kind == "skipped" else "images with decoder warnings"
            logger.warning("more %s: not named here from now on (-v names them); every one is %s", what, where)
        logger.info(message, *args)

    def skip(self, index: int, error: InputError, notes: Sequence[str] = ()) -> None:
        if self.strict:
            raise InputError(f"{error} (`strict`: fix or remove it, or drop `strict` to skip it)") from None
        self.images[str(index)] = str(error)
        self.note(index, notes)
        self._log("skipped", "skipped %s", error)

    def note(self, index: int, notes: Sequence[str]) -> None:
        """Keep the decoder warnings of image ``index`` for the report; log those of a usable image once."""
        kept = self.warnings.get(str(index), [])
        new = [n for n in notes if n not in kept]
        if not new:
            return
        self.warnings[str(index)] = kept + new
        if index not in self:
            self._log("warned", "%s: decoder warning (the image is scored): %s", self.names[index], "; ".join(new))

    def screen(self, images: list[ImageInput]) -> SkippedImages:
        """Header-only check of every image file, so bad files are known (or refused) before any scoring."""
        for index, image in enumerate(images):
            if isinstance(image, (str, os.PathLike)):
                with collecting() as notes:
                    try:
                        check_image(image)
                    except InputError as exc:
                        self.skip(index, exc, notes)
                        continue
                self.note(index, notes)
        return self

    def raise_if_all_skipped(self, count: int) -> None:
        if count and len(self.images) == count:
            # Each skip was logged with its reason as it happened: the error names the first file, not its reason
            # again (a bad image's reason is said once).
            raise InputError(
                f"no usable image: all {count} were skipped, each logged with its reason (the first: "
                f"{self.records()[0]['image']}); check the images"
            )

    def __contains__(self, index: int) -> bool:
        return str(index) in self.images

    def records(self) -> list[dict]:
        return [
            {"index": int(i), "image": self.names[int(i)], "reason": why, "warnings": self.warnings.get(i, [])}
            for i, why in sorted(self.images.items(), key=lambda item: int(item[0]))
        ]

    def warning_records(self) -> list[dict]:
        """The images that were scored although their decoder raised warnings."""
        return [
            {"index": int(i), "image": self.names[int(i)], "warnings": notes}
            for i, notes in sorted(self.warnings.items(), key=lambda item: int(item[0]))
            if i not in self.images
        ]

    def note_caption_lines(self, lines: Sequence[tuple[str, str]]) -> None:
        """Blank (or otherwise skipped) caption-file lines, for the report: ``(where, why)``."""
        self.caption_lines = [{"where": where, "reason": why} for where, why in lines]

    def meta(self, truncated: dict[str, int]) -> dict[str, Any]:
        """The result's ``meta`` entries about skips (``skipped``, ``image_warnings``, ``skipped_report``)."""
        skipped = {"images": self.records(), "caption_lines": list(self.caption_lines)}
        warned = self.warning_records()
        worth_a_report = self.report is not None and (
            skipped["images"] or skipped["caption_lines"] or truncated or warned
        )
        return {
            "skipped": skipped,
            "image_warnings": warned,
            "skipped_report": self.report.name if worth_a_report else None,
        }

    def write_report(self, meta: dict[str, Any], output: str | os.PathLike) -> None:
        """Write (or remove a stale) ``<output stem>.skipped.json``: only a report with something in it exists."""
        if meta["skipped_report"] is not None:
            document = {
                "format": SKIPPED_FORMAT,
                "result": Path(output).name,
                **meta["skipped"],
                "truncated_captions": meta.get("truncated_captions", {}),
                "warnings": meta["image_warnings"],
            }
            atomic_write_text(self.report, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
            return
        # An earlier run's report next to this result would describe skips that did not happen.
        stale = skipped_report_path(output)
        try:
            stale.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("%s is an earlier run's report and could not be removed (%s)", stale, exc.strerror)
