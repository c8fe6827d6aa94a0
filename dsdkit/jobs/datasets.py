"""Datasets for training and evaluation: generic JSONL and the public benchmark formats.

Every reader returns a :class:`Dataset` of :class:`Example` s. An example is a small score matrix to compute
(its images x its captions) and what is correct in it:

- ``image-to-text``: one image, K candidate captions, ``positive`` indexes the captions (SugarCrepe, RefCOCOg);
- ``text-to-image``: one caption, K candidate images, ``positive`` indexes the images (ComVG);
- ``group``: 2 images x 2 captions, caption i belongs to image i (Winoground);
- ``pair``: one image, one caption, ``label`` 1 or 0 (generic labelled pairs).

Formats (``--format``; ``auto`` guesses from the file):

- ``jsonl``: one object per line, one of ``{"image", "caption", "label"}``, ``{"image", "captions", "positive"}``,
  ``{"caption", "images", "positive"}`` or a 2x2 group ``{"images": [a, b], "captions": [for a, for b]}``
  (scored as Winoground), optionally with ``"split"``, ``"id"`` and ``"subset"`` (a benchmark's own grouping,
  reported apart by ``dsdkit eval``; ``dsdkit demo-data`` writes the demo world's benchmark this way).
- ``comvg``: the ComVG CSV ``id,sentence,pos_triplet,neg_triplet,pos_image_id,neg_image_id,neg_value``; images
  ``<root>/<image_id>.jpg``; splits = ``neg_value`` (subject / object / verb).
- ``sugarcrepe``: a SugarCrepe JSON file ``{"<i>": {"filename", "caption", "negative_caption"}}`` or a folder of
  them; the subset is the file name (``add_att``, ``replace_rel``, ...); images ``<root>/<filename>``.
- ``winoground``: ``examples.jsonl`` (``id, caption_0, caption_1, image_0, image_1, collapsed_tag``); images
  ``<root>/<image_k>.png`` (or ``.jpg``); splits = ``collapsed_tag``.
- ``refcocog``: ``refs(google).p`` read with a restricted unpickler (plain containers only, never code); every
  sentence becomes one image against itself and 9 sentences of other referents (seeded), as the authors do;
  images ``<root>/COCO_train2014_<image_id:012d>.jpg``; splits = the refs' own train/val/test.

- ``vqa``: the authors' ``vqa_text_test.csv`` (``sentence, pos_image_id, neg_sentence_1 ... neg_sentence_9``): one
  image against its question+answer sentence and 9 with other answers; images
  ``<root>/COCO_val2014_<pos_image_id:012d>.jpg``.

Image paths are confined to the image root: a row pointing outside it is a bad row. Bad rows are skipped and
reported with their line numbers; missing images are reported all at once, with counts.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pickle
import pickletools
import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..runtime.decode_warnings import collecting
from ..runtime.errors import ConfigError, InputError
from ..runtime.images import load_image
from ..runtime.schemas import RefcocogRef, SchemaError, refcocog_ref

__all__ = [
    "items_to_examples",
    "TaskKind",
    "Example",
    "Dataset",
    "DATASET_FORMATS",
    "load_dataset",
    "few_shot",
    "restricted_unpickle",
]

logger = logging.getLogger(__name__)

DATASET_FORMATS = ("auto", "jsonl", "comvg", "sugarcrepe", "winoground", "refcocog", "vqa")


class TaskKind(str, Enum):
    image_to_text = "image-to-text"
    text_to_image = "text-to-image"
    group = "group"
    pair = "pair"


@dataclass
class Example:
    """One scored unit: ``images`` x ``texts`` and what is correct in it (see the module docstring)."""

    kind: TaskKind
    images: list[Path]
    texts: list[str]
    positive: int | None = None
    label: int | None = None
    split: str | None = None
    id: str = ""
    subset: str | None = None  # a benchmark's own grouping (e.g. the demo world's "binding"), reported apart

    @property
    def num_candidates(self) -> int:
        if self.kind is TaskKind.image_to_text:
            return len(self.texts)
        if self.kind is TaskKind.text_to_image:
            return len(self.images)
        return 1

    def candidate_pairs(self) -> list[tuple[int, int]]:
        """(image index, text index) of every pair this example needs, in candidate order."""
        if self.kind is TaskKind.image_to_text:
            return [(0, j) for j in range(len(self.texts))]
        if self.kind is TaskKind.text_to_image:
            return [(i, 0) for i in range(len(self.images))]
        return [(i, j) for i in range(len(self.images)) for j in range(len(self.texts))]


@dataclass
class Dataset:
    """Examples of one benchmark file, and what was skipped while reading it."""

    format: str
    source: Path
    image_root: Path
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def splits(self) -> list[str]:
        return sorted({e.split for e in self.examples if e.split is not None})

    def select(self, split: str | None) -> list[Example]:
        if split is None:
            return list(self.examples)
        chosen = [e for e in self.examples if e.split == split]
        if not chosen:
            available = ", ".join(self.splits()) or "none"
            raise ConfigError(f"{self.source}: no examples in split {split!r} (splits: {available})")
        return chosen


class _Rows:
    """Collects the examples and the skipped rows of one reader."""

    def __init__(self, source: Path, root: Path):
        self.source = source
        self.root = root.resolve()
        self.examples: list[Example] = []
        self.skipped: list[tuple[str, str]] = []

    def image(self, value: Any) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise _BadRow(f"image path must be a non-empty string, got {value!r}")
        path = Path(value.strip())
        try:
            resolved = (path if path.is_absolute() else self.root / path).resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13), an unreadable dir
            raise _BadRow(f"image path {value!r} cannot be resolved ({exc}); fix or remove the link") from None
        if not resolved.is_relative_to(self.root):
            raise _BadRow(f"image path {value!r} escapes the image root {self.root}")
        return resolved

    def text(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _BadRow(f"caption must be a non-empty string, got {value!r}")
        return value.strip()

    def add(self, where: str, build) -> None:
        try:
            self.examples.append(build())
        except _BadRow as exc:
            self.skipped.append((where, str(exc)))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            self.skipped.append((where, f"malformed row ({type(exc).__name__}: {exc})"))

    def finish(self, fmt: str) -> Dataset:
        if self.skipped:
            shown = "; ".join(f"{w}: {why}" for w, why in self.skipped[:3])
            logger.warning("%s: skipped %d bad row(s): %s", self.source, len(self.skipped), shown)
        if not self.examples:
            raise InputError(
                f"{self.source}: no usable {fmt} rows ({len(self.skipped)} bad); check `fmt` and the file"
            )
        return Dataset(fmt, self.source, self.root, self.examples, self.skipped)


class _BadRow(Exception):
    pass


def _positive(value: Any, count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise _BadRow(f"positive must be an index in [0, {count}), got {value!r}")
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such dataset file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def _json_lines(path: Path, rows: _Rows, make) -> None:
    """Call ``make(row, line_number)`` for every JSON object line; unparsable lines become bad rows."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue

        def build(line=line, number=number):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _BadRow(f"not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise _BadRow("each line must be a JSON object")
            return make(row, number)

        rows.add(f"{path.name} line {number}", build)


def read_jsonl(path: Path, root: Path) -> Dataset:
    rows = _Rows(path, root)

    def make(row: dict, number: int) -> Example:
        split, ident = row.get("split"), str(row.get("id", number))
        subset = row.get("subset")
        if subset is not None and (not isinstance(subset, str) or not subset.strip()):
            raise _BadRow(f"subset must be a non-empty string, got {subset!r}")
        if "images" in row and "captions" in row:
            images = [rows.image(i) for i in row["images"]]
            captions = [rows.text(c) for c in row["captions"]]
            if len(images) != 2 or len(captions) != 2:
                raise _BadRow(f"a group needs 2 images and 2 captions, got {len(images)} and {len(captions)}")
            return Example(TaskKind.group, images, captions, split=split, id=ident, subset=subset)
        if "captions" in row:
            captions = [rows.text(c) for c in row["captions"]]
            return Example(
                TaskKind.image_to_text,
                [rows.image(row["image"])],
                captions,
                positive=_positive(row.get("positive", 0), len(captions)),
                split=split,
                id=ident,
                subset=subset,
            )
        if "images" in row:
            images = [rows.image(i) for i in row["images"]]
            return Example(
                TaskKind.text_to_image,
                images,
                [rows.text(row["caption"])],
                positive=_positive(row.get("positive", 0), len(images)),
                split=split,
                id=ident,
                subset=subset,
            )
        label = row.get("label")
        if label not in (0, 1, True, False):
            raise _BadRow(f'a pair needs "label" 0 or 1, got {label!r}')
        return Example(
            TaskKind.pair,
            [rows.image(row["image"])],
            [rows.text(row["caption"])],
            label=int(label),
            split=split,
            id=ident,
            subset=subset,
        )

    _json_lines(path, rows, make)
    return rows.finish("jsonl")


def read_comvg(path: Path, root: Path) -> Dataset:
    rows = _Rows(path, root)
    reader = csv.DictReader(_read_text(path).splitlines())
    required = {"sentence", "pos_image_id", "neg_image_id", "neg_value"}
    if reader.fieldnames is None or not required <= set(reader.fieldnames):
        raise InputError(f"{path}: not a ComVG CSV (needs columns {', '.join(sorted(required))})")
    for number, row in enumerate(reader, start=2):
        where = f"{path.name} line {number}"

        def build(row=row, number=number):
            images = [rows.image(f"{int(row[c])}.jpg") for c in ("pos_image_id", "neg_image_id")]
            split = (row["neg_value"] or "").strip()
            if not split:
                raise _BadRow("empty neg_value (subject/object/verb)")
            return Example(
                TaskKind.text_to_image,
                images,
                [rows.text(row["sentence"])],
                positive=0,
                split=split,
                id=str(row.get("id") or number),
            )

        rows.add(where, build)
    return rows.finish("comvg")


def read_sugarcrepe(path: Path, root: Path) -> Dataset:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no SugarCrepe .json files in this folder")
    rows = _Rows(path, root)
    for file in files:
        try:
            document = json.loads(_read_text(file))
        except json.JSONDecodeError as exc:
            raise InputError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(document, dict):
            raise InputError(f"{file}: not a SugarCrepe file (expected an object of examples)")
        for key, entry in document.items():
            where = f"{file.name} entry {key}"

            def build(entry=entry, key=key, file=file):
                texts = [rows.text(entry["caption"]), rows.text(entry["negative_caption"])]
                return Example(
                    TaskKind.image_to_text,
                    [rows.image(entry["filename"])],
                    texts,
                    positive=0,
                    split=file.stem,
                    id=f"{file.stem}/{key}",
                )

            rows.add(where, build)
    return rows.finish("sugarcrepe")


def read_winoground(path: Path, root: Path) -> Dataset:
    rows = _Rows(path, root)

    def make(row: dict, number: int) -> Example:
        ident = row["id"]
        images = []
        for k in (0, 1):
            stem = row.get(f"image_{k}") or f"ex_{ident}_img_{k}"
            candidates = [stem] if Path(stem).suffix else [f"{stem}.png", f"{stem}.jpg"]
            found = next((c for c in candidates if (rows.root / c).exists()), candidates[0])
            images.append(rows.image(found))
        texts = [rows.text(row["caption_0"]), rows.text(row["caption_1"])]
        return Example(TaskKind.group, images, texts, split=row.get("collapsed_tag"), id=str(ident))

    _json_lines(path, rows, make)
    return rows.finish("winoground")


class _Refused(pickle.UnpicklingError):
    """A pickle that references code (a class or function): refused, whatever it is."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds plain containers and scalars only; any class or function reference is refused (no code runs)."""

    def find_class(self, module, name):
        raise _Refused(f"refused to load {module}.{name}: only plain data is allowed")


#: The largest pickle dsdkit reads (RefCOCOg's ``refs(google).p`` is about 50 MB); the whole file is held in memory.
MAX_PICKLE_BYTES = 1 << 30
# Opcodes that name code or outside objects; plain data never needs them.
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2"}
_CODE_OPCODES |= {"EXT4", "PERSID", "BINPERSID"}


def _scan_pickle(data: bytes) -> None:
    """Walk the opcodes of ``data`` before unpickling it: every length an opcode declares must fit in the bytes that
    remain, and no opcode may name code. The C unpickler allocates a declared ``BINBYTES8`` / ``BYTEARRAY8`` length
    before reading it, so a 30-byte file declaring a 2^40-byte string would ask for a terabyte; here the stdlib's
    opcode walker reads from memory and finds it short without allocating. Raises ``_Refused`` or ``ValueError``."""
    for opcode, _, position in pickletools.genops(io.BytesIO(data)):
        if opcode.name in _CODE_OPCODES:
            raise _Refused(f"opcode {opcode.name} at byte {position} references code; only plain data is allowed")


def restricted_unpickle(path: Path) -> Any:
    """Read a pickle that holds only dicts, lists, strings and numbers (e.g. RefCOCOg's ``refs(google).p``).

    The file is read whole (at most :data:`MAX_PICKLE_BYTES`), its opcodes checked (:func:`_scan_pickle`), and only
    then unpickled from memory with a restricted unpickler that builds no class and calls no function.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PICKLE_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_PICKLE_BYTES:
        raise InputError(f"{path}: larger than {MAX_PICKLE_BYTES >> 20} MB; not a RefCOCOg refs file")
    try:
        _scan_pickle(data)
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as exc:
        raise InputError(f"{path}: refused ({exc}); dsdkit never executes code from pickles") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"{path}: not a readable pickle ({reason}); the file is damaged") from None
    except (OverflowError, RecursionError, MemoryError) as exc:  # absurd values in a short file
        raise InputError(f"{path}: not a readable pickle ({type(exc).__name__}); the file is damaged") from None


def read_refcocog(path: Path, root: Path, negatives: int = 9, seed: int = 0) -> Dataset:
    refs = restricted_unpickle(path)
    if not isinstance(refs, list):
        raise InputError(
            f"{path}: expected a list of referring expressions (refs(google).p), got {type(refs).__name__}"
        )
    rows = _Rows(path, root)
    checked: dict[int, RefcocogRef] = {}
    for index, ref in enumerate(refs):
        try:
            checked[index] = refcocog_ref(ref)
        except SchemaError as exc:
            rows.skipped.append((f"{path.name} ref #{index}", f"malformed ref ({exc})"))
    pool: list[tuple[int, str]] = [  # (ref index, sentence) for drawing negatives
        (index, sentence.strip()) for index, ref in checked.items() for sentence in ref.sentences if sentence.strip()
    ]
    rng = random.Random(seed)
    for index, ref in checked.items():
        where = f"{path.name} ref #{index}"

        def build_all(ref=ref, index=index):
            image = rows.image(f"COCO_train2014_{ref.image_id:012d}.jpg")
            out = []
            for s, sentence in enumerate(ref.sentences):
                positive = rows.text(sentence)
                others = []
                # Rejection sampling with a bounded number of draws: a small file may not hold 9 distinct negatives.
                for _ in range(50 * negatives):
                    if len(others) == negatives:
                        break
                    other_ref, text = pool[rng.randrange(len(pool))]
                    if other_ref != index and text not in others and text != positive:
                        others.append(text)
                out.append(
                    Example(
                        TaskKind.image_to_text,
                        [image],
                        [positive, *others],
                        positive=0,
                        split=ref.split,
                        id=f"{index if ref.ref_id is None else ref.ref_id}/{s}",
                    )
                )
            return out

        try:
            rows.examples.extend(build_all())
        except _BadRow as exc:
            rows.skipped.append((where, str(exc)))
    return rows.finish("refcocog")


def read_vqa(path: Path, root: Path) -> Dataset:
    rows = _Rows(path, root)
    reader = csv.DictReader(_read_text(path).splitlines())
    if reader.fieldnames is None or not {"sentence", "pos_image_id", "neg_sentence_1"} <= set(reader.fieldnames):
        raise InputError(f"{path}: not the authors' VQA CSV (needs sentence, pos_image_id, neg_sentence_1..9)")
    negatives = sorted(
        (c for c in reader.fieldnames if c.startswith("neg_sentence_")), key=lambda c: int(c.rsplit("_", 1)[1])
    )
    for number, row in enumerate(reader, start=2):
        where = f"{path.name} line {number}"

        def build(row=row, number=number):
            image = rows.image(f"COCO_val2014_{int(row['pos_image_id']):012d}.jpg")
            texts = [rows.text(row["sentence"])] + [rows.text(row[c]) for c in negatives]
            return Example(TaskKind.image_to_text, [image], texts, positive=0, id=str(number))

        rows.add(where, build)
    return rows.finish("vqa")


def _guess_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir() or name.endswith(".json"):
        return "sugarcrepe"
    if name.endswith(".p") or name.endswith(".pkl"):
        return "refcocog"
    if name.endswith(".csv"):
        header = _read_text(path).split("\n", 1)[0]
        return "vqa" if "neg_sentence_1" in header else "comvg"
    if name.endswith(".jsonl"):
        first = next((line for line in _read_text(path).splitlines() if line.strip()), "")
        try:
            keys = set(json.loads(first)) if first else set()
        except (json.JSONDecodeError, TypeError):
            keys = set()
        return "winoground" if {"caption_0", "caption_1"} <= keys else "jsonl"
    raise ConfigError(
        f"{path}: cannot tell the dataset format from the name; pass `fmt` ({', '.join(DATASET_FORMATS[1:])})"
    )


def load_dataset(
    path: str | os.PathLike,
    fmt: str = "auto",
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    seed: int = 0,
) -> Dataset:
    """Read a dataset file.

    Args:
        path: the annotation file (or a SugarCrepe folder).
        fmt: one of :data:`DATASET_FORMATS`.
        image_root: folder the image paths are relative to (and confined to). Defaults to the file's folder.
        check_images: report every missing image at once (as an :class:`InputError`).
        seed: seed of the random negatives some formats draw (RefCOCOg).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such dataset file or folder")
    if fmt not in DATASET_FORMATS:
        raise ConfigError(f"unknown dataset format {fmt!r}; choose one of {', '.join(DATASET_FORMATS)}")
    if fmt == "auto":
        fmt = _guess_format(path)
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    if not root.is_dir():
        raise InputError(f"image root {root} is not a folder; pass `image_root`")
    reader = {
        "jsonl": read_jsonl,
        "comvg": read_comvg,
        "sugarcrepe": read_sugarcrepe,
        "winoground": read_winoground,
        "refcocog": lambda p, r: read_refcocog(p, r, seed=seed),
        "vqa": read_vqa,
    }[fmt]
    dataset = reader(path, root)
    if check_images:
        images = sorted({image for example in dataset.examples for image in example.images})
        # Absent files mean a wrong image root or an incomplete download: refused at once. Rows were resolved,
        # so a link that points nowhere counts as absent here; one that loops was already a bad row.
        missing = [image for image in images if not image.is_file()]
        if missing:
            shown = ", ".join(str(m.relative_to(dataset.image_root)) for m in missing[:5])
            raise InputError(
                f"{len(missing)} of {len(images)} images referenced by {path} are missing under {dataset.image_root} "
                f"(e.g. {shown}); check `image_root` or download the images"
            )
        _drop_unusable_images(dataset, images)
    logger.info(
        "%s: %d %s examples%s",
        path,
        len(dataset.examples),
        fmt,
        f" in splits {', '.join(dataset.splits())}" if dataset.splits() else "",
    )
    return dataset


def _drop_unusable_images(dataset: Dataset, images: list[Path]) -> None:
    """Decode every image once, up front; examples that need an unusable one (corrupt, truncated, too large) move to
    ``dataset.skipped`` with the reason, so a bad file costs one example, not the run.

    The warnings a decoder raises go with the file (``runtime.decode_warnings``; its hook keeps each thread's
    file apart): into the reason of a skipped example, and one log line for the usable images that raised some."""

    def decode(image: Path) -> tuple[str | None, list[str]]:
        with collecting() as notes:
            try:
                load_image(image)  # Pillow decodes outside the GIL: threads overlap the files
            except InputError as exc:
                return str(exc), notes
        return None, notes

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        outcomes = dict(zip(images, pool.map(decode, images), strict=True))
    bad = {
        image: why + (f" (decoder warnings: {'; '.join(notes)})" if notes else "")
        for image, (why, notes) in outcomes.items()
        if why is not None
    }
    warned = {image: notes for image, (why, notes) in outcomes.items() if why is None and notes}
    if warned:
        first, notes = next(iter(warned.items()))
        logger.warning(
            "%s: %d usable image(s) raised decoder warnings and are kept (e.g. %s: %s)",
            dataset.source,
            len(warned),
            first,
            "; ".join(notes),
        )
    if not bad:
        return
    kept = []
    for example in dataset.examples:
        reason = next((bad[image] for image in example.images if image in bad), None)
        if reason is None:
            kept.append(example)
        else:
            dataset.skipped.append((f"example {example.id}", reason))
    logger.warning(
        "%s: skipped %d example(s) with unusable images: %s",
        dataset.source,
        len(dataset.examples) - len(kept),
        "; ".join(list(bad.values())[:3]),
    )
    if not kept:
        raise InputError(
            f"{dataset.source}: no usable examples: every one needs an unusable image "
            f"(first: {next(iter(bad.values()))}); check the images"
        )
    dataset.examples = kept


def few_shot(
    examples: list[Example],
    shots: int | None = None,
    fraction: float | None = None,
    first: bool = False,
    seed: int = 0,
) -> list[Example]:
    """A seeded random subset of ``shots`` examples or a ``fraction`` of them (``first``: the first rows, as the
    authors' "5%" splits do). With neither, all examples."""
    if shots is not None and fraction is not None:
        raise ConfigError("give either `shots` or `fraction`, not both", field="shots")
    count = len(examples)
    if shots is not None:
        if shots < 1:
            raise ConfigError(f"`shots` must be >= 1, got {shots}", field="shots")
        count = min(shots, len(examples))
    elif fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"`fraction` must be in (0, 1], got {fraction}", field="fraction")
        count = max(1, int(round(fraction * len(examples))))
    if first:
        return list(examples[:count])
    order = random.Random(seed).sample(range(len(examples)), count)
    return [examples[i] for i in sorted(order)]


def items_to_examples(items: Iterable, size: int | None = None) -> list:
    """World benchmark items (:class:`dsdkit.world.scenes.Item`) as dataset examples holding rendered PIL images
    (the demo world's benchmark as a dataset)."""
    from .. import world

    size = size or world.RESOLUTION
    examples = []
    for number, item in enumerate(items):
        images = [world.render(scene, size) for scene in item.scenes]
        if item.positive is None:
            examples.append(
                Example(TaskKind.group, images, list(item.captions), subset=item.subset, id=f"{item.subset}-{number}")
            )
        else:
            examples.append(
                Example(
                    TaskKind.image_to_text,
                    images,
                    list(item.captions),
                    positive=item.positive,
                    subset=item.subset,
                    id=f"{item.subset}-{number}",
                )
            )
    return examples
