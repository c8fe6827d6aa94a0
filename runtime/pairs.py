"""Reading a pair list: the (image, caption) pairs that ``dsdkit match --pairs FILE`` scores, and no others.

A pair list turns a match job from the full N x M matrix into a shortlist: rerunning a retriever's top candidates
(CLIP or another) through the diffusion matcher, or scoring a t2v_metrics-style list of image/text records. Pairs
refer to the job's images and captions, so one file works whether an image is named by its index, by its path as
the match job lists it, by its path relative to the images folder, or by its file name alone when that is unique.

Formats, by suffix:

- ``.csv``: a header row with ``image`` (a name) or ``image_index`` (0-based), and ``caption`` (the text) or
  ``caption_index`` (0-based); other columns (a retriever's ``clip_score``) are ignored.
- ``.jsonl``: one object per line with the same keys; in ``image`` / ``caption`` an integer is an index too.
- ``.json``: a list of such objects, or of t2v_metrics records ``{"images": [...], "texts": [...]}``, each meaning
  every listed image with every listed text.

Every problem is an :class:`~dsdkit.runtime.errors.InputError` whose one-line message names the file and the line
(``.json``: the item, counted from 1) and says what to do. Duplicate pairs are dropped (a pair is scored once
however often it is listed) and counted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["PAIR_SUFFIXES", "PairList", "read_pairs"]

logger = logging.getLogger(__name__)

#: The pair list formats, by file suffix.
PAIR_SUFFIXES = (".csv", ".jsonl", ".json")

_ACCEPTED = "image or image_index, and caption or caption_index"
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "1_000" and other scripts' digits


@dataclass
class PairList:
    """The pairs of a pair list, resolved to indices into the job's images and captions.

    Attributes:
        pairs: ``(image index, caption index)``, in file order, each pair once.
        source: the file they were read from (for messages and result metadata).
        duplicates: how many listed pairs were dropped because they were listed before.
    """

    pairs: list[tuple[int, int]]
    source: str
    duplicates: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def candidates_per_image(self, num_images: int) -> list[list[int]]:
        """The caption indices listed for each of ``num_images`` images, in file order (empty for an image that
        no pair names), so a job can rank each image's shortlist."""
        return self._group(num_images, 0, "image")

    def candidates_per_caption(self, num_captions: int) -> list[list[int]]:
        """The image indices listed for each of ``num_captions`` captions, in file order."""
        return self._group(num_captions, 1, "caption")

    def _group(self, count: int, key: int, what: str) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in range(count)]
        for pair in self.pairs:
            if pair[key] >= count:
                # The pairs were resolved against a job with more items: the caller passed another job's count.
                raise ValueError(f"{self.source}: pair {pair} names {what} {pair[key]}, but only {count} were given")
            groups[pair[key]].append(pair[1 - key])
        return groups


def read_pairs(path: str | os.PathLike, image_names: Sequence[str], captions: Sequence[str]) -> PairList:
    """Read the pair list ``path`` of a job whose images are ``image_names`` and whose captions are ``captions``.

    Args:
        path: a ``.csv``, ``.jsonl`` or ``.json`` pair list (UTF-8; a BOM is fine).
        image_names: the job's images as the match job names them (paths as listed). An image is referred to by
            its index, by that exact name, by its path relative to the images folder (a normalised path suffix of
            the name) or by its file name alone; a reference that fits several images is an error naming two.
            An image listed twice in the job (the same path) is referred to by its first occurrence.
        captions: the job's caption texts. A caption is referred to by its index or by its exact text (surrounding
            whitespace stripped); a text that occurs twice is its first occurrence.

    Raises:
        InputError: the file is missing, unreadable, not UTF-8, of another format, malformed, refers to an image
            or caption the job does not have, or lists no pair.
    """
    path = Path(path)
    source = str(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{source}: no such file; check the pair list's path")
    suffix = path.suffix.lower()
    if suffix not in PAIR_SUFFIXES:
        raise InputError(
            f"{source}: unknown pair list format {suffix or '(no suffix)'!r}; write it as .csv (a header row with "
            f"{_ACCEPTED}), .jsonl (one object per line) or .json"
        )
    text = _read_text(path)
    resolver = _Resolver(source, image_names, captions)
    if suffix == ".csv":
        listed = _read_csv(source, text, resolver)
    elif suffix == ".jsonl":
        listed = _read_jsonl(source, text, resolver)
    else:
        listed = _read_json(source, text, resolver)

    pairs: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for pair in listed:
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    if not pairs:
        raise InputError(f"{source}: no pairs found; list at least one (image, caption) pair ({_ACCEPTED})")
    duplicates = len(listed) - len(pairs)
    if duplicates:
        logger.info("%s: dropped %d duplicate pair(s); each pair is scored once", source, duplicates)
    logger.info(
        "%s: %d pair(s) of %d image(s) and %d caption(s)",
        source,
        len(pairs),
        len({i for i, _ in pairs}),
        len({c for _, c in pairs}),
    )
    return PairList(pairs, source, duplicates)


# -- reading the file --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # a dangling link
        raise InputError(f"{path}: no such file; check the pair list's path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a pair list file (.csv, .jsonl or .json)") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied; make the file readable") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}); check the file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path} line {line}: not valid UTF-8; save the pair list as UTF-8") from None


def _read_csv(source: str, text: str, resolver: _Resolver) -> list[tuple[int, int]]:
    # newline="" keeps a quoted caption's line break inside its field; skipinitialspace reads `a.png, "x, y"`.
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    pairs: list[tuple[int, int]] = []
    header: dict[str, int] | None = None
    image_column = caption_column = ""
    while True:
        start = reader.line_num + 1  # a quoted field may span lines: name the line the row starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InputError(f"{source} line {start}: not valid CSV ({exc}); check its quotes") from None
        if not any(cell.strip() for cell in row):
            continue  # a blank line, or a spreadsheet's empty row
        where = f"{source} line {start}"
        if header is None:
            header = {}
            for column, cell in enumerate(row):
                header.setdefault(cell.strip().lower(), column)
            image_column = _pick_column(header, "image", row, where)
            caption_column = _pick_column(header, "caption", row, where)
            continue
        image = resolver.image(_cell(row, header, image_column, where), image_column, where)
        caption = resolver.caption(_cell(row, header, caption_column, where), caption_column, where)
        pairs.append((image, caption))
    if header is None:
        raise InputError(f"{source}: the file is empty; a .csv pair list starts with a header row ({_ACCEPTED})")
    return pairs


def _pick_column(header: dict[str, int], kind: str, row: list[str], where: str) -> str:
    """The one column of ``header`` that names the ``kind`` of each pair: ``kind`` or ``kind_index``."""
    present = [name for name in (kind, f"{kind}_index") if name in header]
    if len(present) == 2:
        raise InputError(f"{where}: the header has both {kind} and {kind}_index columns; keep one of them")
    if not present:
        found = ", ".join(_quote(cell) for cell in row)
        raise InputError(
            f"{where}: the header row has no {kind} or {kind}_index column (found {found}); a .csv pair list needs "
            f"a header row with {_ACCEPTED}, separated by commas"
        )
    return present[0]


def _cell(row: list[str], header: dict[str, int], column: str, where: str) -> str:
    index = header[column]
    if index >= len(row) or not row[index].strip():
        raise InputError(f"{where}: the {column} cell is empty; give every row a value in the {column} column")
    return row[index]


def _read_jsonl(source: str, text: str, resolver: _Resolver) -> list[tuple[int, int]]:
    pairs = []
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"
            ) from None
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected a JSON object with {_ACCEPTED}, got {_json_type(item)}")
        pairs.append(_json_pair(item, where, resolver))
    return pairs


def _read_json(source: str, text: str, resolver: _Resolver) -> list[tuple[int, int]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = (
            "; it holds more than one JSON value: a file of one object per line is a .jsonl file"
            if exc.msg == "Extra data"
            else "; fix the file or write it with a JSON library"
        )
        where = f"{source} line {exc.lineno}"
        raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}){hint}") from None
    if not isinstance(items, list):
        raise InputError(
            f"{source}: expected a JSON list of pair objects ({_ACCEPTED}) or of {{images, texts}} records, got "
            f"{_json_type(items)}"
        )
    pairs = []
    for number, item in enumerate(items, start=1):
        where = f"{source} item {number}"
        if not isinstance(item, dict):
            raise InputError(
                f"{where}: expected a JSON object (a pair, or an {{images, texts}} record), got {_json_type(item)}"
            )
        if "images" in item or "texts" in item:
            pairs.extend(_json_record(item, where, resolver))
        else:
            pairs.append(_json_pair(item, where, resolver))
    return pairs


def _json_pair(item: dict[str, Any], where: str, resolver: _Resolver) -> tuple[int, int]:
    return _json_reference(item, "image", where, resolver), _json_reference(item, "caption", where, resolver)


def _json_reference(item: dict[str, Any], kind: str, where: str, resolver: _Resolver) -> int:
    """The index that an object's ``kind`` (a name or an index) or ``kind_index`` (an index) refers to."""
    index_key = f"{kind}_index"
    if kind in item and index_key in item:
        raise InputError(f"{where}: has both {kind} and {index_key}; keep one of them")
    if index_key in item:
        value = item[index_key]
        if not _is_int(value):
            raise InputError(f"{where}: {index_key} must be an integer (0-based), got {_json_type(value)}")
        return resolver.image_index(value, where) if kind == "image" else resolver.caption_index(value, where)
    if kind not in item:
        keys = ", ".join(_quote(key) for key in item) or "none"
        raise InputError(f"{where}: has no {kind} or {index_key} key (keys: {keys}); each pair needs {_ACCEPTED}")
    return _name_or_index(item[kind], kind, kind, where, resolver)


def _json_record(item: dict[str, Any], where: str, resolver: _Resolver) -> list[tuple[int, int]]:
    """A t2v_metrics record: every listed image with every listed text, image by image."""
    if any(key in item for key in ("image", "image_index", "caption", "caption_index")):
        raise InputError(f"{where}: mixes an {{images, texts}} record with pair keys; write one form per item")
    resolved = {}
    for key, kind in (("images", "image"), ("texts", "caption")):
        if key not in item:
            raise InputError(f"{where}: an {{images, texts}} record needs both lists; {key} is missing")
        values = item[key]
        if not isinstance(values, list):
            values = [values]  # a lone name or text
        if not values:
            raise InputError(f"{where}: {key} is empty; list at least one")
        resolved[key] = [
            _name_or_index(value, kind, key, f"{where}, {key}[{n}]", resolver) for n, value in enumerate(values)
        ]
    return [(image, caption) for image in resolved["images"] for caption in resolved["texts"]]


def _name_or_index(value: Any, kind: str, key: str, where: str, resolver: _Resolver) -> int:
    if _is_int(value):
        return resolver.image_index(value, where) if kind == "image" else resolver.caption_index(value, where)
    if isinstance(value, str):
        return resolver.image_name(value, where) if kind == "image" else resolver.caption_text(value, where)
    what = "an image name or index" if kind == "image" else "a caption text or index"
    raise InputError(f"{where}: {key} must be {what}, got {_json_type(value)}")


# -- resolving references ----------------------------------------------------------------------------------------


class _Resolver:
    """Turns the references of a pair list into indices, with one-line errors naming where each came from.

    Lookups are by dictionary (a shortlist of 100 000 pairs must not scan the job's names for every row).
    """

    def __init__(self, source: str, image_names: Sequence[str], captions: Sequence[str]):
        self.source = source
        self.image_names = [str(name) for name in image_names]
        self.num_captions = len(captions)
        self.exact: dict[str, int] = {}
        self.absolute: dict[str, int] = {}
        self.by_suffix: dict[tuple[str, ...], list[int]] = {}
        for index, name in enumerate(self.image_names):
            self.exact.setdefault(name, index)
            self.absolute.setdefault(os.path.abspath(name), index)
            parts = _parts(name)
            for start in range(len(parts)):
                self.by_suffix.setdefault(parts[start:], []).append(index)
        self.texts: dict[str, int] = {}
        self.loose: dict[str, int] = {}  # case and spacing folded, for the hint of a near miss only
        for index, caption in enumerate(captions):
            self.texts.setdefault(caption.strip(), index)
            self.loose.setdefault(_fold(caption), index)
        self.names_memo: dict[str, int] = {}

    # CSV cells: the column says whether the cell is a reference by name or by index.
    def image(self, cell: str, column: str, where: str) -> int:
        if column == "image_index":
            return self.image_index(_parse_index(cell, column, where), where)
        return self.image_name(cell, where)

    def caption(self, cell: str, column: str, where: str) -> int:
        if column == "caption_index":
            return self.caption_index(_parse_index(cell, column, where), where)
        return self.caption_text(cell, where)

    def image_index(self, index: int, where: str) -> int:
        return _in_range(index, len(self.image_names), "image", where)

    def caption_index(self, index: int, where: str) -> int:
        return _in_range(index, self.num_captions, "caption", where)

    def image_name(self, name: str, where: str) -> int:
        if name in self.names_memo:
            return self.names_memo[name]
        index = self._find_image(name, where)
        self.names_memo[name] = index
        return index

    def _find_image(self, name: str, where: str) -> int:
        for candidate in (name, name.strip()):
            if candidate in self.exact:
                return self.exact[candidate]
        name = name.strip()
        if not name:
            raise InputError(f"{where}: the image name is empty; name an image of the job or give its index")
        matches = self.by_suffix.get(_parts(name), [])
        if not matches:
            absolute = self.absolute.get(os.path.abspath(name))
            if absolute is not None:
                return absolute
            count = len(self.image_names)
            hint = " (a number: indices go in an image_index column or key)" if _INTEGER.fullmatch(name) else ""
            example = f", as listed (e.g. {_quote(self.image_names[0])})" if self.image_names else ""
            raise InputError(
                f"{where}: image {_quote(name)} is not one of the job's {count} images{hint}; refer to it by its "
                f"index (0 to {count - 1}) or by its path{example}"
            )
        distinct: dict[tuple[str, ...], int] = {}
        for index in matches:  # the same path listed twice in the job is one image: its first occurrence
            distinct.setdefault(_parts(self.image_names[index]), index)
        if len(distinct) > 1:
            first, second = (self.image_names[i] for i in list(distinct.values())[:2])
            raise InputError(
                f"{where}: image {_quote(name)} fits {len(distinct)} of the job's images ({_quote(first)} and "
                f"{_quote(second)}); write more of its path, or use its index"
            )
        return matches[0]

    def caption_text(self, text: str, where: str) -> int:
        stripped = text.strip()
        index = self.texts.get(stripped)
        if index is not None:
            return index
        if not stripped:
            raise InputError(f"{where}: the caption text is empty; copy a caption of the captions file or its index")
        near = self.loose.get(_fold(stripped))
        hint = f" (caption {near} differs only in case or spacing)" if near is not None else ""
        raise InputError(
            f"{where}: caption {_quote(stripped)} is not one of the job's {self.num_captions} captions{hint}; copy "
            "its text exactly as a line of the captions file, or use its index"
        )


def _parse_index(cell: str, column: str, where: str) -> int:
    cell = cell.strip()
    if not _INTEGER.fullmatch(cell):
        raise InputError(f"{where}: {column} {_quote(cell)} is not an integer; write a 0-based index")
    return int(cell)


def _in_range(index: int, count: int, kind: str, where: str) -> int:
    if 0 <= index < count:
        return index
    if count == 0:
        raise InputError(f"{where}: {kind} index {index} is out of range: the job has no {kind}s")
    raise InputError(
        f"{where}: {kind} index {index} is out of range: the job has {count} {kind}s, so use 0 to {count - 1}"
    )


def _parts(name: str) -> tuple[str, ...]:
    """A path's normalised components (``./a//b`` is ``a/b``; a leading ``""`` marks an absolute path), so a
    reference matches a name by whole components at its end, never by a part of a file name."""
    normal = posixpath.normpath(name.replace("\\", "/"))
    parts = normal.split("/")
    if normal.startswith("/"):
        parts = ["", *(part for part in parts if part)]
    return tuple(part for part in parts if part != ".") or (normal,)


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the index 1


def _quote(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message: shortened to about ``limit`` characters, line breaks escaped (one line)."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_quote(value)}"
    return "a list" if isinstance(value, list) else "an object"
