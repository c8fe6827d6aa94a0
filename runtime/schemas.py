"""The schemas of the files dsdkit reads, one validating function per format, in one place.

A reader parses its file (JSON, a safetensors header, a restricted pickle) and hands the document to its function
here before it uses any field, so that a wrong type, a missing key, an out-of-range id, a non-numeric count or an
absurd size gives the format's one-line error (and documented exit code) instead of a ``KeyError`` or a
``TypeError`` deep inside dsdkit, which the CLI could only report as "a dsdkit bug".

| format                         | function                 | error (exit code)                                  |
|--------------------------------|--------------------------|----------------------------------------------------|
| bundle ``manifest.json``       | :func:`bundle_manifest`  | :class:`~.errors.BundleError` (7)                  |
| resume ``state.json``          | :func:`resume_state`     | :class:`SchemaError` (the caller discards the state) |
| job ``job.json``               | :func:`job_manifest`     | :class:`~.errors.JobError` (11)                    |
| shard ``part-*.done.json``     | :func:`done_marker`      | :class:`~.errors.JobError` (11)                    |
| adapter header (safetensors)   | :func:`adapter_header`   | :class:`~.errors.ModelError` (4)                   |
| RefCOCOg ``refs(*).p`` records | :func:`refcocog_ref`     | :class:`SchemaError` (the reader skips the record)   |

The checks are small combinators (:func:`integer`, :func:`text`, :func:`record`, ...): each takes the value and where
it sits in the document (``graphs.scorer.file``) and raises :class:`SchemaError` naming both. Unknown keys are
allowed where a newer dsdkit may add fields, refused where they would change a score (the scoring section).
Torch-free and dependency-free, as the rest of the runtime.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .config import HeadWeighting, LayerSet, Normalization, Pooling, ResizeMode, TimestepTable, TokenSet
from .errors import BundleError, JobError, ModelError

__all__ = [
    "SchemaError",
    "Check",
    "integer",
    "number",
    "boolean",
    "text",
    "choice",
    "hex_digest",
    "relative_path",
    "optional",
    "list_of",
    "dict_of",
    "record",
    "all_of",
    "one_of",
    "anything",
    "scoring_section",
    "bundle_manifest",
    "ResumeState",
    "resume_state",
    "job_manifest",
    "done_marker",
    "adapter_header",
    "RefcocogRef",
    "refcocog_ref",
]


class SchemaError(ValueError):
    """A value that does not fit its format: ``where`` (a dotted path in the document) and ``problem``."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


#: ``check(value, where)`` raises :class:`SchemaError` when ``value`` does not fit.
Check = Callable[[Any, str], None]

# Long enough for every real value, short enough that a message quoting it stays one readable line.
_SHOWN = 60


def _show(value: Any) -> str:
    """A short quote of a bad value (a container is described, not printed: it may be huge)."""
    if isinstance(value, (dict, list)):
        return f"({len(value)} entries)"
    text = repr(value[: _SHOWN + 1] if isinstance(value, str) else value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _join(where: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


# -- combinators -----------------------------------------------------------------------------------------------------


def anything(value: Any, where: str) -> None:
    """Any JSON value (fields dsdkit only copies, never interprets)."""


def integer(low: int | None = None, high: int | None = None) -> Check:
    """An integer (not a boolean, not a float with an integral value) in ``[low, high]``."""

    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(where, f"expected an integer, got {_kind(value)} {_show(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise SchemaError(where, f"{_show(value)} is outside {bounds}")

    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Check:
    """A finite number (int or float, not a boolean) in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(where, f"expected a number, got {_kind(value)} {_show(value)}")
        if not math.isfinite(value):
            raise SchemaError(where, f"expected a finite number, got {value}")
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            raise SchemaError(where, f"{_show(value)} is out of range")

    return check


def boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise SchemaError(where, f"expected true or false, got {_kind(value)} {_show(value)}")


def text(nonempty: bool = False, max_length: int | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise SchemaError(where, f"expected a string, got {_kind(value)} {_show(value)}")
        if nonempty and not value.strip():
            raise SchemaError(where, "must not be empty")
        if max_length is not None and len(value) > max_length:
            raise SchemaError(where, f"a string of {len(value)} characters (at most {max_length})")

    return check


def choice(*values: Any) -> Check:
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or value not in values:
            raise SchemaError(where, f"{_show(value)} is not one of {', '.join(map(str, values))}")

    return check


_HEX = re.compile(r"[0-9a-f]+")


def hex_digest(length: int = 64) -> Check:
    """A lower-case hexadecimal digest of ``length`` digits (a sha256 by default)."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, str) or len(value) != length or not _HEX.fullmatch(value):
            raise SchemaError(where, f"expected {length} hexadecimal digits, got {_show(value)}")

    return check


def relative_path(value: Any, where: str) -> None:
    """A path inside a folder, written the way dsdkit writes them: relative, ``/``-separated, no ``..``.

    Only the spelling is checked here; whether it *resolves* inside the folder (symlinks) is the reader's check,
    since it needs the disk.
    """
    if not isinstance(value, str) or not value:
        raise SchemaError(where, f"expected a relative path, got {_kind(value)} {_show(value)}")
    if "\x00" in value or "\\" in value:
        raise SchemaError(where, f"{_show(value)} holds a NUL or backslash; paths are written with '/'")
    if value.startswith("/") or re.match(r"[A-Za-z]:", value):
        raise SchemaError(where, f"{_show(value)} is an absolute path; it must stay inside the folder")
    if ".." in PurePosixPath(value).parts:
        raise SchemaError(where, f"{_show(value)} climbs out with '..'; it must stay inside the folder")


def optional(check: Check) -> Check:
    """``null`` or what ``check`` accepts."""

    def wrapped(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)

    return wrapped


def list_of(item: Check, min_length: int = 0, max_length: int | None = None, length: int | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise SchemaError(where, f"expected a list, got {_kind(value)} {_show(value)}")
        if length is not None and len(value) != length:
            raise SchemaError(where, f"expected {length} entries, got {len(value)}")
        if len(value) < min_length:
            raise SchemaError(where, f"expected at least {min_length} entries, got {len(value)}")
        if max_length is not None and len(value) > max_length:
            raise SchemaError(where, f"expected at most {max_length} entries, got {len(value)}")
        for index, entry in enumerate(value):
            item(entry, _join(where, index))

    return check


def dict_of(value_check: Check, key_check: Check | None = None, min_length: int = 0) -> Check:
    """An object whose every value fits ``value_check`` (and every key ``key_check``)."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(where, f"expected an object, got {_kind(value)} {_show(value)}")
        if len(value) < min_length:
            raise SchemaError(where, f"expected at least {min_length} entries, got {len(value)}")
        for key, entry in value.items():
            if key_check is not None:
                key_check(key, _join(where, "<key>"))
            value_check(entry, _join(where, key))

    return check


def record(required: Mapping[str, Check], optional: Mapping[str, Check] | None = None, extra: bool = True) -> Check:
    """An object with the ``required`` keys, maybe the ``optional`` ones (``null`` allowed only if their check
    allows it), and other keys only with ``extra`` (fields a newer dsdkit may add and this one ignores)."""
    optional = dict(optional or {})

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(where, f"expected an object, got {_kind(value)} {_show(value)}")
        missing = [key for key in required if key not in value]
        if missing:
            raise SchemaError(where, f"missing key(s) {', '.join(missing)}")
        if not extra:
            unknown = sorted(str(k) for k in value if k not in required and k not in optional)
            if unknown:
                raise SchemaError(where, f"unknown key(s) {', '.join(unknown)} (written by a newer dsdkit?)")
        for key, check_value in (*required.items(), *optional.items()):
            if key in value:
                check_value(value[key], _join(where, key))

    return check


def one_of(*checks: Check, what: str = "a known form") -> Check:
    """What at least one of ``checks`` accepts (a field written in an earlier and a later form); refused with
    the first check's problem when none does."""

    def check(value: Any, where: str) -> None:
        first = None
        for each in checks:
            try:
                each(value, where)
                return
            except SchemaError as exc:
                first = first or exc
        raise SchemaError(first.where, f"{first.problem} (none of {what})")

    return check


def all_of(*checks: Check) -> Check:
    """What every one of ``checks`` accepts."""

    def check(value: Any, where: str) -> None:
        for each in checks:
            each(value, where)

    return check


def _validate(check: Check, document: Any, where: str = "") -> None:
    check(document, where)


# -- the scoring section (bundles, adapters, jobs) ------------------------------------------------------------------


def _enum(enum) -> Check:
    return choice(*(member.value for member in enum))


#: Every field of :class:`~.config.ScoringConfig` with its type; missing ones take the config's defaults (files
#: of earlier versions lack later knobs), unknown ones are refused: this dsdkit cannot score what it does not know.
_SCORING_FIELDS: dict[str, Check] = {
    "preset": text(nonempty=True, max_length=64),
    "pooling": _enum(Pooling),
    "lse_lambda": number(0.0, 1e6, low_open=True),
    "tokens": _enum(TokenSet),
    "layers": _enum(LayerSet),
    "heads": _enum(HeadWeighting),
    "timesteps": _enum(TimestepTable),
    "num_timesteps": integer(1, 980),
    "noise_levels": list_of(number(0.0, 1.0, low_open=True), max_length=1000),
    "denoise_term": boolean,
    "attention_term": boolean,
    "uncond_in_attention": boolean,
    "normalize": _enum(Normalization),
    "resize": _enum(ResizeMode),
    "resolution": optional(integer(64, 16384)),
    "noise_seed": integer(0, 2**63 - 1),
}
scoring_section: Check = record({}, _SCORING_FIELDS, extra=False)


# -- bundle manifest -------------------------------------------------------------------------------------------------


def _dimension(value: Any, where: str) -> None:
    """A tensor dimension: a size, or the name of a dynamic axis (``"batch"``)."""
    if isinstance(value, str):
        return
    integer(0)(value, where)


_SHAPE = list_of(_dimension, max_length=16)
_TENSOR = record({"dtype": text(nonempty=True), "shape": _SHAPE})
_DIMS = list_of(integer(0), min_length=1, max_length=16)
_PROFILE = dict_of(record({"min": _DIMS, "opt": _DIMS, "max": _DIMS}), min_length=1)
_GRAPH = record(
    {
        "file": relative_path,
        "inputs": dict_of(_TENSOR, min_length=1),
        "outputs": dict_of(_TENSOR, min_length=1),
        "profile": _PROFILE,
        "precision": choice("fp32", "fp16"),
    },
    {"dynamic_axes": dict_of(anything), "tolerance": dict_of(anything)},
)
_FILE = record({"sha256": hex_digest(), "size": integer(0, 2**50)})
_PARITY_OUTPUT = record({"max_abs": number(0.0), "ok": boolean})
_MANIFEST = record(
    {
        "dsdkit_version": text(max_length=64),
        "model": record(
            {
                "source": text(),
                "identity": text(nonempty=True),
                "resolution": integer(8, 16384),
                "latent_shape": list_of(integer(1, 1 << 16), length=3),
                "text_length": integer(1, 10_000),
                "licence": text(),
            },
            {
                "hidden_size": integer(1),
                "prediction_type": text(),
                "test_model_random_weights": boolean,
                "context_tokens": choice("all", "words", "bos-words"),
                "licence_source": text(),
            },
        ),
        "adapter": optional(
            record({"file": text(nonempty=True), "sha256": hex_digest(), "header": dict_of(anything)})
        ),
        "scoring": scoring_section,
        "layers": list_of(text(nonempty=True), min_length=1, max_length=4096),
        "precision": choice("fp32", "fp16"),
        "export": record({"batch": list_of(integer(1, 4096), length=3), "exporter": text(), "opset": integer(1)}),
        "noise": record({"seed": integer(0, 2**63 - 1), "bank_size": integer(1, 1000)}),
        "tokenizer": record({"folder": relative_path}),
        # The three graphs every bundle has, and any other graph it lists (each gets a runner) checked the same way.
        "graphs": all_of(record({"text_encoder": _GRAPH, "image_encoder": _GRAPH, "scorer": _GRAPH}), dict_of(_GRAPH)),
        "files": dict_of(_FILE, key_check=relative_path, min_length=1),
    },
    {
        "created": text(),
        "shortlist": optional(
            record(
                {
                    "model": text(),
                    "identity": text(),
                    "folder": relative_path,
                    "graphs": record({"image": text(nonempty=True), "text": text(nonempty=True)}),
                    "embedding_dim": integer(1, 1 << 16),
                }
            )
        ),
        "engines": record(
            {"built": boolean},
            {
                "graphs": dict_of(record({"file": relative_path, "profile": _PROFILE})),
                "tensorrt": text(),
                "gpu": text(),
                "compute_capability": text(),
                "reason": text(),
            },
        ),
        "parity": record(
            {},
            {
                "graphs": dict_of(dict_of(_PARITY_OUTPUT, min_length=1)),
                "end_to_end": record(
                    {
                        "timesteps": list_of(integer()),
                        "matrix": list_of(integer(0), length=2),
                        "scores": record({"max_abs": number(0.0), "max_rel": number(0.0)}),
                        "ranking": record({"top1_agreement": number(0.0, 1.0), "spearman_mean": number(-1.0, 1.0)}),
                    }
                ),
            },
        ),
    },
)


def bundle_manifest(document: Any, path: str) -> dict[str, Any]:
    """Check a bundle's ``manifest.json`` (its ``format`` already checked by the reader); returns it.

    Raises:
        BundleError: one line naming the manifest, the field and what is wrong with it.
    """
    try:
        _validate(_MANIFEST, document)
        batch = document["export"]["batch"]
        if not batch[0] <= batch[1] <= batch[2]:
            raise SchemaError("export.batch", f"{batch} is not min <= opt <= max")
        engines = document.get("engines") or {}
        if engines.get("built"):
            for key in ("graphs", "tensorrt", "gpu", "compute_capability"):
                if key not in engines:
                    raise SchemaError("engines", f"built engines without {key!r}")
    except SchemaError as exc:
        raise BundleError(
            f"{path}: {exc} (a manifest edited or damaged after export); re-export the bundle with `dsdkit export`"
        ) from None
    return document


# -- resume state ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeState:
    """``<output>.partial/state.json`` of an interrupted match job (see :mod:`~.resume`), validated.

    Attributes:
        format: the state's format name.
        fingerprint: sha256 of the job the state belongs to.
        done_rows: image rows of ``scores.npy`` that are final.
        shape: the score array's shape (``[N, M]``, or ``[N, M, 3]`` for adaptive and pair jobs).
        notes: per note name, a JSON object (skipped images, decoder warnings, evaluations).
        digest: sha256 over the state and the done rows (``None`` in states written before it existed).
    """

    format: str
    fingerprint: str
    done_rows: int
    shape: tuple[int, ...]
    notes: dict[str, dict[str, Any]]
    digest: str | None


def _row_key(rows: int) -> Check:
    """A note key naming an image row: a decimal index below ``rows`` (JSON keys are strings)."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, str) or not value.isdigit() or int(value) >= rows:
            raise SchemaError(where, f"{_show(value)} is not an image index in [0, {rows})")

    return check


def resume_state(document: Any) -> ResumeState:
    """Check ``state.json`` on its own terms (types; rows done and note indices within its shape); returns it typed.
    Whether it belongs to the job at hand (fingerprint, shape) is the caller's check, after the digest.

    Raises:
        SchemaError: the state does not fit its format (the caller discards it and scores from the start).
    """
    _validate(
        record(
            {
                "format": text(nonempty=True),
                "fingerprint": hex_digest(),
                "done_rows": integer(0),
                "shape": list_of(integer(0, 1 << 40), min_length=2, max_length=3),
                "notes": dict_of(dict_of(anything)),
            },
            {"digest": hex_digest(), "dtype": choice("float64")},
        ),
        document,
    )
    rows = document["shape"][0]
    integer(0, rows)(document["done_rows"], "done_rows")
    notes = record(
        {},
        {
            "skipped_images": dict_of(text(max_length=10_000), key_check=_row_key(rows)),
            "image_warnings": dict_of(list_of(text(max_length=10_000)), key_check=_row_key(rows)),
            "evaluations": dict_of(integer(0)),
        },
    )
    _validate(notes, document["notes"], "notes")
    return ResumeState(
        format=document["format"],
        fingerprint=document["fingerprint"],
        done_rows=document["done_rows"],
        shape=tuple(document["shape"]),
        notes=document["notes"],
        digest=document.get("digest"),
    )


# -- sharded jobs ----------------------------------------------------------------------------------------------------

_FILE_RECORD = record(
    {}, {"sha256": hex_digest(), "size": integer(0), "mtime_ns": integer(), "unreadable": text()}, extra=False
)
_JOB = record(
    {
        "images": list_of(record({"name": text(), "path": text(nonempty=True), "file": _FILE_RECORD}), min_length=1),
        "captions": list_of(text(), min_length=1),
        "caption_where": list_of(text()),
        "caption_source": optional(record({"name": text(), "path": text(nonempty=True), "file": _FILE_RECORD})),
        "skipped_caption_lines": list_of(record({"where": text(), "reason": text()})),
        "engine": one_of(
            # An EngineSpec's JSON form (dsdkit.jobs.specs): what job manifests record now.
            record(
                {
                    "model": optional(text()),
                    "bundle": optional(text()),
                    "adapters": optional(text()),
                    "preset": optional(text()),
                    "knobs": dict_of(anything),
                    "backend": text(nonempty=True),
                    "batch_size": optional(integer(1, 1 << 20)),
                    "dtype": text(nonempty=True),
                    "compile": optional(text()),
                    "chunk_size": integer(1, 1 << 30),
                },
                {"device": optional(text()), "threads": optional(integer(1, 4096))},
            ),
            # The form of earlier versions (a resolved scoring config, S apart).
            record(
                {
                    "model": optional(text()),
                    "bundle": optional(text()),
                    "adapters": optional(text()),
                    "config": optional(scoring_section),
                    "backend": text(nonempty=True),
                    "batch_size": optional(integer(1, 1 << 20)),
                    "dtype": optional(text()),
                    "num_timesteps": optional(integer(1, 980)),
                    "compile": optional(text()),
                }
            ),
            what="an engine spec or the engine record of earlier versions",
        ),
        "scoring": record(
            {
                "chunk_size": integer(1, 1 << 30),
                "top_k": integer(1, 1 << 30),
                "adaptive": optional(text()),
                "per": choice("image", "caption"),
                "strict": boolean,
                "pairs": optional(
                    record(
                        {
                            "source": text(),
                            "pairs": list_of(list_of(integer(0), length=2)),
                            "duplicates": integer(0),
                        }
                    )
                ),
            }
        ),
        "identity": dict_of(anything),
        "shards": list_of(list_of(integer(0), length=2), min_length=1),
        "fingerprint": hex_digest(),
    },
    {
        "content_hash": boolean,
        "dsdkit_version": text(),
        "created": text(),
        "shortlist": optional(
            record(
                {"spec": dict_of(anything), "file": relative_path, "sha256": hex_digest(), "stage": dict_of(anything)}
            )
        ),
    },
)


def job_manifest(document: Any, path: str) -> dict[str, Any]:
    """Check a job's ``job.json`` (its ``format`` already checked by the reader): types, and ids that point into
    the job (caption origins per caption, pairs within the images and captions, shards that tile the images).

    Raises:
        JobError: one line naming the manifest and the field; the job must be planned again.
    """
    try:
        _validate(_JOB, document)
        images, captions = len(document["images"]), len(document["captions"])
        if len(document["caption_where"]) != captions:
            raise SchemaError("caption_where", f"{len(document['caption_where'])} entries for {captions} captions")
        pairs = document["scoring"]["pairs"]
        for index, (i, j) in enumerate(pairs["pairs"] if pairs else []):
            if i >= images or j >= captions:
                raise SchemaError(f"scoring.pairs.pairs[{index}]", f"[{i}, {j}] is outside {images} x {captions}")
        expected = 0
        for index, (start, stop) in enumerate(document["shards"]):
            if start != expected or stop <= start:
                raise SchemaError(f"shards[{index}]", f"[{start}, {stop}) does not continue the shards before it")
            expected = stop
        if expected != images:
            raise SchemaError("shards", f"cover {expected} images, the job has {images}")
    except SchemaError as exc:
        raise JobError(f"{path}: damaged job manifest ({exc}); plan the job again with dsdkit plan") from None
    return document


def done_marker(
    document: Any, path: str, fingerprint: str, index: int, num_shards: int, images: Sequence[int], part: str
) -> dict[str, Any]:
    """Check a shard's done marker against its job: the shard it names, its image range, its row labels.

    The ``image_ids`` label the part's rows, so they must be exactly the shard's images that were not skipped, in
    order: a swapped or duplicated id, or one outside the shard, is refused (it would put scores under the wrong
    image). ``fingerprint`` is checked by the caller first, which names "another job" more helpfully.

    Raises:
        JobError: one line naming the marker and the field; the shard must be scored again.
    """
    start, stop = int(images[0]), int(images[1])
    in_shard = integer(start, stop - 1)
    entry = record({"index": in_shard, "image": text()}, {"reason": text(), "warnings": list_of(text())})
    check = record(
        {
            "shard": choice(index),
            "shards": choice(num_shards),
            "images": choice([start, stop]),
            "rows": integer(0, stop - start),
            "image_ids": list_of(in_shard, max_length=stop - start),
            "unet_evaluations": integer(0),
            "evaluations": dict_of(integer(0)),
            "skipped": list_of(entry),
            "image_warnings": list_of(entry),
            "part": choice(part),
            "part_bytes": integer(0),
            "part_sha256": hex_digest(),
        },
        {"truncated_captions": dict_of(integer(0)), "seconds": optional(number(0.0))},
    )
    try:
        _validate(check, document)
        ids = document["image_ids"]
        if any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
            raise SchemaError("image_ids", "not strictly increasing (swapped or duplicated ids)")
        if len(ids) != document["rows"]:
            raise SchemaError("image_ids", f"{len(ids)} ids for {document['rows']} rows")
        skipped = {entry["index"] for entry in document["skipped"]}
        if skipped & set(ids) or len(skipped) + len(ids) != stop - start:
            raise SchemaError("image_ids", f"with the skipped ones they are not the shard's images [{start}, {stop})")
    except SchemaError as exc:
        raise JobError(
            f"{path}: damaged done marker ({exc}); delete it and its part to score the shard again"
        ) from None
    return document


# -- adapter headers -------------------------------------------------------------------------------------------------

_ADAPTER = record(
    {
        "kind": choice("kv-prompt", "lora"),
        "adapter": record(
            {"kind": choice("kv-prompt", "lora")},
            {
                "rank": optional(integer(1, 1 << 16)),
                "feature_grid": integer(1, 1024),
                "hidden": integer(1, 1 << 20),
                "init_seed": integer(0),
            },
        ),
        "layers": list_of(text(nonempty=True), min_length=1, max_length=4096),
        "base_model": text(nonempty=True),
        "scoring": scoring_section,
    },
    {"dsdkit_version": text(), "parameters": integer(0)},
)


def adapter_header(document: Any, path: str) -> dict[str, Any]:
    """Check an adapter file's JSON header (its ``format`` already checked by the reader); returns it.

    Raises:
        ModelError: one line naming the file and the field.
    """
    try:
        _validate(_ADAPTER, document)
        if document["adapter"]["kind"] != document["kind"]:
            found = document["adapter"]["kind"]
            raise SchemaError("adapter.kind", f"{found!r} differs from kind {document['kind']!r}")
    except SchemaError as exc:
        raise ModelError(f"{path}: damaged adapter header ({exc}); re-save or re-train the adapter") from None
    return document


# -- RefCOCOg --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefcocogRef:
    """One referring-expression record of RefCOCOg's ``refs(google).p``, validated."""

    image_id: int
    sentences: tuple[str, ...]
    split: str | None
    ref_id: int | str | None


_REF = record(
    {
        # COCO ids are written as 12 digits into the image file name.
        "image_id": integer(0, 10**12 - 1),
        "sentences": list_of(record({"sent": text(max_length=10_000)}), max_length=10_000),
    },
    {"split": optional(text(max_length=64)), "ref_id": optional(anything)},
)


def refcocog_ref(value: Any) -> RefcocogRef:
    """Check one record of a RefCOCOg pickle (already read with the restricted unpickler).

    Raises:
        SchemaError: the record does not fit (the reader skips it and reports it with the file's bad rows).
    """
    _validate(_REF, value)
    ref_id = value.get("ref_id")
    if ref_id is not None and (isinstance(ref_id, bool) or not isinstance(ref_id, (int, str))):
        raise SchemaError("ref_id", f"expected an integer or a string, got {_kind(ref_id)}")
    return RefcocogRef(value["image_id"], tuple(s["sent"] for s in value["sentences"]), value.get("split"), ref_id)
